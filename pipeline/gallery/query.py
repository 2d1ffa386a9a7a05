"""The query side of a gallery: :func:`open_gallery`, the one way to open a version for querying
(the job's Moderator, ``modscan lookup``, ``modscan evaluate`` and the benchmarks all call it);
the loaded, verified version (:class:`GalleryIndex`), the cascade over it (coarse for every
query, rerank for survivors, score normalisation) and the bank rules that turn candidates into
one :class:`Match` per query. Reads versions through :mod:`pipeline.gallery.loader`; knows
nothing of how they are built or updated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.gallery.hashlists import HashBanks, HashHit, HashQuery
from pipeline.gallery.index import CascadeIndex, CascadeParams, background_term
from pipeline.gallery.loader import load_streaming
from pipeline.gallery.manifest import DisabledReference, Manifest
from pipeline.gallery.members import Memberships
from pipeline.gallery.sharded import RemoteCascade, ShardServers
from pipeline.gallery.store import GalleryIntegrityError, read_keypoints, read_lists, read_manifest
from pipeline.gallery.verify import (
    CandidateVerifier,
    KeypointTable,
    MatchRule,
    QueryKeypoints,
    QueryKeypointsFn,
    VerifyParams,
)
from pipeline.ingest.storage import Store, open_store
from pipeline.schemas import Action, Status
from pipeline.signals.lists import HashEntry

if TYPE_CHECKING:
    from models.card import BackgroundBank
    from pipeline.gallery.nodecache import NodeCache


class QueryModel(Protocol):
    """What opening a gallery needs of the model that makes the queries: its ``version_id`` (the
    gallery must have been built with it) and its ``background`` bank (score normalisation).
    A :class:`~pipeline.features.FeatureExtractor` is one; :class:`ModelRef` is one for code
    that queries with features computed beforehand."""

    @property
    def version_id(self) -> str: ...

    @property
    def background(self) -> BackgroundBank | None: ...


@dataclass(frozen=True)
class ModelRef:
    """A :class:`QueryModel` without the network: a card's ``version_id`` and its background bank
    (:func:`models.card.load_background`)."""

    version_id: str
    background: BackgroundBank | None = None


@dataclass(frozen=True)
class QueryOverrides:
    """What a job config sets over a version's own query settings; None keeps the manifest's.

    The thresholds are ``[job] coarse_threshold``, ``fine_threshold`` and ``rerank_k``; ``nprobe``
    and ``ef_search`` are ``[job] coarse_nprobe`` / ``coarse_ef_search`` (lists an IVF coarse
    index searches, search breadth of an HNSW one; the manifest's ``coarse_index`` otherwise)."""

    coarse_threshold: float | None = None
    fine_threshold: float | None = None
    rerank_k: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    sure_threshold: float | None = None

    @classmethod
    def from_thresholds(cls, thresholds: Mapping[str, float] | None, nprobe: int | None = None,
                        ef_search: int | None = None) -> QueryOverrides:
        """From a job's threshold overrides dict (keys ``coarse``, ``fine``, ``sure``, ``rerank_k``,
        each optional: ``JobConfig.threshold_overrides()``) and its coarse search settings."""
        t = thresholds or {}
        rerank_k = t.get("rerank_k")
        return cls(t.get("coarse"), t.get("fine"), None if rerank_k is None else int(rerank_k), nprobe, ef_search, t.get("sure"))


def open_gallery(gallery: str | Store, model: QueryModel | None, *, version: str | None = None,
                 overrides: QueryOverrides = QueryOverrides(), cache: NodeCache | None = None,
                 servers: ShardServers | None = None) -> GalleryIndex:
    """Open a gallery version (default: ``CURRENT``) for querying, every file verified.

    ``model`` is the query model (:class:`QueryModel`): a version built with another model is
    refused (:class:`~pipeline.gallery.manifest.GalleryModelMismatch`) and its background bank
    normalises fine scores. ``None`` opens a version to inspect it: no model check and no bank, so
    a version whose ``norm.beta > 0`` refuses to score (its thresholds were calibrated on
    normalised scores). ``overrides`` are the job config's (:class:`QueryOverrides`).

    ``cache``: map the version from the node's cache (:mod:`pipeline.gallery.nodecache`: filled
    and verified once per node, shared by every process on it) instead of loading a private,
    verified copy into this process. The decisions are the same either way. ``servers``: the
    job's shard servers (:class:`~pipeline.gallery.sharded.ShardServers`) search and rerank,
    and this process holds no vectors; the rest comes from the node cache (``cache``, else the
    default one). The decisions are the same again."""
    store = open_store(gallery) if isinstance(gallery, str) else gallery
    if cache is not None or servers:
        if cache is None:
            from pipeline.gallery.nodecache import NodeCache
            cache = NodeCache()
        att = cache.attach(store, version)
        m = att.manifest
        if model is not None:
            m.check_model(model.version_id)
        cascade: CascadeIndex | RemoteCascade = RemoteCascade(servers, m) if servers else att.cascade(
            nprobe=overrides.nprobe, ef_search=overrides.ef_search)
        entries: pd.DataFrame | pa.Table = att.entries()
        lists: Mapping[str, Sequence[HashEntry]] = read_lists(att.store, m, checked=True, lazy=True)
        keypoints = read_keypoints(att.store, m, checked=True)
    else:
        m = read_manifest(store, version)
        if model is not None:
            m.check_model(model.version_id)
        cascade, entries = load_streaming(store, m, nprobe=overrides.nprobe, ef_search=overrides.ef_search)
        lists, keypoints = read_lists(store, m), read_keypoints(store, m)
    params = m.model.params(overrides.coarse_threshold, overrides.fine_threshold, overrides.rerank_k,
                            overrides.sure_threshold)
    bank = model.background if model is not None else None
    return GalleryIndex(m, cascade, entries, params, bank.f512 if bank is not None else None,
                        lists=lists, keypoints=keypoints)


@dataclass
class Match:
    """The decision for one query image."""

    status: str
    action: str
    bank: str | None = None
    category: str | None = None
    reference_id: int | None = None
    coarse_score: float | None = None
    fine_score: float | None = None      # normalised fine score: what the thresholds apply to
    fine_score_raw: float | None = None  # plain 512-d cosine of the same pair
    signal: str | None = None            # descriptor | pdq | md5: what decided (None: nothing matched)
    pdq_distance: int | None = None      # a pdq match's Hamming distance
    list_entry_id: str | None = None     # a hash match's list entry (its id, else its hash)
    list_metadata: str | None = None     # that entry's metadata (JSON text)
    note: str | None = None              # e.g. the pdq banks a low-quality upload hash was not matched against
    inliers: int | None = None           # RANSAC inliers of the deciding candidate (clean: of the best one rejected)
    rule: str | None = None              # MatchRule: how the descriptor decided (None: nothing reached a threshold)
    verified: tuple[tuple[int, int], ...] = ()  # (reference id, inliers) of every candidate verified for this query




# Signal strength, strongest first: an exact MD5 of the file, then PDQ by distance, then the
# descriptor by fine score (see GalleryIndex.decide_signals).
SIGNAL_RANK = {"md5": 2, "pdq": 1, "descriptor": 0}


class _Hit(NamedTuple):
    """One (query, gallery entry, bank) pair that reached its bank's fine threshold and was confirmed."""

    fine: float
    gid: int
    bank: str
    category: str
    action: str
    coarse: float
    rule: str
    inliers: int | None


class Candidates(NamedTuple):
    """The cascade's output for a batch of queries, ``(B, rerank_k)`` each.

    ``F`` is the normalised fine score (``-inf`` where not reranked); ``offset`` ``(B,)`` is what
    normalisation subtracted from each query's raw cosines (``F + offset`` = raw).
    """

    D: np.ndarray
    I: np.ndarray
    F: np.ndarray
    survivors: np.ndarray
    offset: np.ndarray


class CoarseHits(NamedTuple):
    """Stage 1 for a batch: coarse scores ``D`` and gallery ids ``I``, ``(B, rerank_k)``; ``I = -1``
    where fewer candidates passed the coarse threshold."""

    D: np.ndarray
    I: np.ndarray


class FineScores(NamedTuple):
    """Normalised fine scores ``F`` ``(B, k)`` and the ``offset`` ``(B,)`` subtracted from each
    query's raw cosines (``F + offset`` = raw)."""

    F: np.ndarray
    offset: np.ndarray


class SearchResult(NamedTuple):
    """One :class:`Match` per query, and which queries were reranked (``survivors`` ``(B,)``)."""

    matches: list[Match]
    survivors: np.ndarray


class GalleryIndex:
    """A loaded, verified gallery version: cascade search plus the bank rules. Open one with
    :func:`open_gallery`; the constructor is for versions assembled in memory (tests)."""

    def __init__(self, manifest: Manifest, cascade: CascadeIndex | RemoteCascade, entries: pd.DataFrame | pa.Table,
                 params: CascadeParams, background: np.ndarray | None = None,
                 lists: Mapping[str, Sequence[HashEntry]] | None = None,
                 keypoints: KeypointTable | None = None) -> None:
        self.manifest, self.cascade, self.params = manifest, cascade, params
        # the references' local features; without them every candidate below the sure threshold
        # is decided by the fine threshold alone (MatchRule.UNVERIFIABLE_REFERENCE)
        self.keypoints = keypoints
        self.verify_params = manifest.keypoints.params if manifest.keypoints is not None else VerifyParams()
        # verification work since load: seconds, queries whose keypoints were computed, pairs matched
        self.verify_stats: dict[str, float] = {"seconds": 0.0, "queries": 0, "pairs": 0}
        # (N, rerank_dim) background features of the query model, for score normalisation
        self.background = background if params.norm.beta else None
        self.banks = {n: b.bank for n, b in manifest.banks.items()}
        self._entries = entries
        self._entries_frame: pd.DataFrame | None = entries if isinstance(entries, pd.DataFrame) else None
        self.hash_banks = HashBanks(self.banks, lists or {})  # the enabled pdq/md5 banks, indexed
        # References disabled by review decisions, as of load time: a job keeps one view for its
        # whole run, like it keeps one gallery version.
        self.disabled: dict[int, DisabledReference] = manifest.disabled_in_force()
        self._members = Memberships.of(entries, self.banks, self.bank_threshold, self.disabled)

    @property
    def entries_table(self) -> pa.Table | pd.DataFrame:
        """The entries as loaded: a mapped Arrow table from the node cache, else a DataFrame."""
        return self._entries

    @property
    def entries(self) -> pd.DataFrame:
        """The entries (one row per id and bank) as a DataFrame, for tools (``lookup``, review):
        made on first use from a node-cache version's mapped table, which the job never needs."""
        if self._entries_frame is None:
            self._entries_frame = self._entries.to_pandas() if isinstance(self._entries, pa.Table) else self._entries
        return self._entries_frame

    def bank_threshold(self, bank: str) -> float:
        """The fine threshold in force for ``bank``: its own, else the gallery's (or override)."""
        b = self.banks[bank]
        return float(b.fine_threshold if b.fine_threshold is not None else self.params.fine_threshold)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_id(self) -> str:
        return self.manifest.model.model_id

    def coarse_hits(self, xq128: np.ndarray) -> CoarseHits:
        """Stage 1 for every upload: ``D, I`` ``(B, rerank_k)`` above the coarse threshold."""
        return CoarseHits(*self.cascade.search_coarse(xq128, self.params.rerank_k, self.params.coarse_threshold))

    def decide(self, D: np.ndarray, I: np.ndarray, F: np.ndarray | None, offset: np.ndarray | None = None,
               query_keypoints: QueryKeypointsFn | None = None) -> list[Match]:
        """Bank rules per query: an allow-list match at least as good as the best blocking match
        wins (no flag); otherwise the best blocking match decides (ties: filter over downrank).
        A candidate counts when its fine score reaches its bank's threshold and it is confirmed
        (:class:`MatchRule`: sure, verified, or a reference that cannot be verified).
        ``F`` is None when no query was reranked; ``query_keypoints(q)`` gives query ``q``'s
        keypoints for verification (None: candidates that need it are not confirmed)."""
        out = []
        off = np.zeros(len(I), np.float32) if offset is None else np.asarray(offset, np.float32)
        for q in range(len(I)):
            valid = I[q] >= 0
            best_coarse = float(D[q][valid].max()) if valid.any() else None
            if F is None or not valid.any():
                out.append(Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse))
                continue
            out.append(self._decide_one(q, D[q], I[q], F[q], float(off[q]), best_coarse, query_keypoints))
        return out

    def _decide_one(self, q: int, D: np.ndarray, I: np.ndarray, F: np.ndarray, off: float, best_coarse: float | None,
                    kp_fn: QueryKeypointsFn | None) -> Match:
        best_block: _Hit | None = None
        best_allow: _Hit | None = None
        rejected: tuple[float, int | None] | None = None  # best candidate verification turned down
        ver = CandidateVerifier(self.keypoints, self.verify_params, self.params.sure_threshold,
                                self.verify_stats, q, kp_fn)
        valid = np.nonzero(I >= 0)[0]
        valid = valid[F[valid] >= self._members.lowest]  # no bank's threshold is lower
        for j in valid[np.argsort(-F[valid], kind="stable")]:  # best fine first: verification is capped
            gid, fine, crs = int(I[j]), float(F[j]), float(D[j])
            for bank, category, action, thr in self._members.of_id(gid):
                if fine < thr:
                    continue
                rule, inl = ver.confirm(gid, fine, thr)
                if rule == MatchRule.VERIFICATION_FAILED.value:
                    if rejected is None:
                        rejected = (fine, inl)
                    continue
                hit = _Hit(fine, gid, bank, category, action, crs, rule, inl)
                if action == Action.ALLOW.value:
                    if best_allow is None or fine > best_allow.fine:
                        best_allow = hit
                elif best_block is None or (fine, action == Action.FILTER.value) > (
                        best_block.fine, best_block.action == Action.FILTER.value):
                    best_block = hit
        raw = lambda fine: None if not np.isfinite(fine) else float(fine + off)
        if best_block is not None and (best_allow is None or best_allow.fine < best_block.fine):
            b = best_block
            return Match(Status.MATCHED.value, b.action, b.bank, b.category, b.gid, b.coarse, b.fine, raw(b.fine),
                         inliers=b.inliers, rule=b.rule, verified=ver.record())
        if best_block is not None and best_allow is not None:
            a = best_allow
            return Match(Status.CLEAN.value, Action.NONE.value, a.bank, a.category, a.gid, a.coarse, a.fine, raw(a.fine),
                         inliers=a.inliers, rule=a.rule, verified=ver.record())
        best_fine = float(F[I >= 0].max())
        if rejected is not None:
            return Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse, fine_score=rejected[0],
                         fine_score_raw=raw(rejected[0]), inliers=rejected[1],
                         rule=MatchRule.VERIFICATION_FAILED.value, verified=ver.record())
        return Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse, fine_score=best_fine,
                     fine_score_raw=raw(best_fine))

    def normalise(self, xq512: np.ndarray, F: np.ndarray) -> FineScores:
        """Raw fine scores ``(B, k)`` of queries ``(B, rerank_dim)`` -> (normalised, offset ``(B,)``)."""
        norm = self.params.norm
        if norm.beta and self.background is None:
            raise GalleryIntegrityError(
                f"gallery {self.version} normalises fine scores (beta={norm.beta}) but was loaded without a "
                f"background bank: load it with the query model's bank (FeatureExtractor.background)")
        offset = norm.beta * background_term(xq512, self.background, norm.k) if norm.beta else np.zeros(len(F), np.float32)
        return FineScores((F - offset[:, None]).astype(np.float32), offset.astype(np.float32))

    def candidates(self, xq128: np.ndarray, fine_fn: Callable[[np.ndarray], np.ndarray]) -> Candidates:
        """The cascade for a batch: coarse for all; ``fine_fn(rows)`` -> the 512-d (fine) query
        features of those rows, called only for the rows with a coarse candidate, which are then
        reranked (fine scores of their candidates, normalised)."""
        D, I = self.coarse_hits(xq128)
        survivors = I[:, 0] >= 0
        F = np.full(I.shape, -np.inf, np.float32)
        offset = np.zeros(len(I), np.float32)
        if survivors.any():
            rows = np.nonzero(survivors)[0]
            xq512 = fine_fn(rows)
            F[rows], offset[rows] = self.normalise(xq512, self.cascade.score_fine(xq512, I[rows]))
        return Candidates(D, I, F, survivors, offset)

    def search(self, xq128: np.ndarray, fine_fn: Callable[[np.ndarray], np.ndarray],
               query_keypoints: QueryKeypointsFn | None = None) -> SearchResult:
        """Cascade + verification + bank rules: one :class:`Match` per query, and the survivor
        mask. ``query_keypoints(q)``: query ``q``'s keypoints, asked for only when one of its
        candidates needs verification (:meth:`decide`)."""
        c = self.candidates(xq128, fine_fn)
        return SearchResult(self.decide(c.D, c.I, c.F, c.offset, query_keypoints), c.survivors)

    def keypoints_from_bytes(self, datas: Any) -> QueryKeypointsFn:
        """A ``query_keypoints`` function over the uploads' encoded bytes (``datas[q]``; None: none)."""
        from pipeline.gallery.verify import grey_from_bytes, query_keypoints

        p = self.verify_params

        def fn(q: int) -> QueryKeypoints | None:
            data = datas[q]
            g = grey_from_bytes(data, p.side) if data is not None else None
            return None if g is None else query_keypoints(g, p)

        return fn

    def query_hashes(self, md5s: list[str | None], pdqs: list[str | None], qualities: list[int | None]) -> list[HashQuery]:
        """The hash banks' hits per upload (:meth:`pipeline.gallery.hashlists.HashBanks.query`)."""
        return self.hash_banks.query(md5s, pdqs, qualities)

    @staticmethod
    def decide_signals(base: Match | None, q: HashQuery) -> Match | None:
        """One decision across the descriptor's ``base`` (None: not searched) and the hash hits ``q``.

        The rule: the strongest blocking match wins, strength being (signal, closeness) in this
        order: an ``md5`` match (the same file) > a ``pdq`` match by smaller distance > a
        ``descriptor`` match by higher fine score; an allow match at least as strong as the best
        blocking one still wins (no flag). Equal strength: filter over downrank, then bank name,
        then reference id / list entry (ascending), so ties never depend on order of arrival."""
        blocks: list[tuple[tuple, Any]] = []
        allows: list[tuple[tuple, Any]] = []
        if base is not None and base.bank is not None:
            key = (SIGNAL_RANK["descriptor"], float(base.fine_score if base.fine_score is not None else -np.inf))
            (blocks if base.status == Status.MATCHED.value else allows).append((key, base))
        for h in q.hits:
            key = (SIGNAL_RANK[h.signal], -float(h.distance))
            (allows if h.action == Action.ALLOW.value else blocks).append((key, h))
        note = (f"pdq hash below the quality floor of bank(s) {', '.join(q.below_quality)}: not matched against them"
                if q.below_quality else None)

        def order(kv: tuple[tuple, Any]) -> tuple:
            key, x = kv
            ident = x.reference_id if isinstance(x, Match) else x.entry_idx
            return (-key[0], -key[1], x.action != Action.FILTER.value, x.bank, ident if ident is not None else -1)

        block = min(blocks, key=order) if blocks else None
        allow = min(allows, key=order) if allows else None
        if block is not None:
            wins = allow if allow is not None and allow[0] >= block[0] else block  # allow at least as strong
            x = wins[1]
            if isinstance(x, Match):
                return _with(x, signal="descriptor", note=note)
            matched = wins is block
            return _hash_match(base, x, Status.MATCHED.value if matched else Status.CLEAN.value,
                               x.action if matched else Action.NONE.value, note)
        if base is None:  # not searched (low content) and no blocking hash match
            return None
        return _with(base, signal="descriptor" if base.bank else None, note=note)

def _with(m: Match, **kw: Any) -> Match:
    return dataclasses.replace(m, **kw)


def _hash_match(base: Match | None, h: HashHit, status: str, action: str, note: str | None) -> Match:
    """The Match of a decision a hash hit made: its bank, the list entry and distance; the
    descriptor's best coarse score is kept (what the row's coarse_score always means)."""
    return Match(status, action, h.bank, h.category, None, base.coarse_score if base is not None else None,
                 signal=h.signal, pdq_distance=h.distance if h.signal == "pdq" else None,
                 list_entry_id=h.entry_key, list_metadata=h.entry.metadata, note=note)
