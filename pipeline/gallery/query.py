"""The query side of a gallery: a loaded, verified version (:class:`GalleryIndex`), the cascade
over it (coarse for every query, rerank for survivors, score normalisation) and the bank rules
that turn candidates into one :class:`Match` per query. Reads versions through
:mod:`pipeline.gallery.store`; knows nothing of how they are built or updated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeIndex, CascadeParams, ScoreNorm, background_term
from pipeline.gallery.store import GalleryIntegrityError, check_model, disabled_in_force, load_streaming, read_manifest
from pipeline.ingest.storage import Store, open_store
from pipeline.schemas import Action, Status


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


class _Hit(NamedTuple):
    """One (query, gallery entry, bank) pair that reached its bank's fine threshold."""

    fine: float
    gid: int
    bank: str
    category: str
    action: str
    coarse: float


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
    """A loaded, verified gallery version: cascade search plus the bank rules."""

    def __init__(self, manifest: dict[str, Any], cascade: CascadeIndex, entries: pd.DataFrame,
                 params: CascadeParams, background: np.ndarray | None = None) -> None:
        self.manifest, self.cascade, self.params = manifest, cascade, params
        # (N, rerank_dim) background features of the query model, for score normalisation
        self.background = background if params.norm.beta else None
        self.banks = {n: Bank.from_dict(b) for n, b in manifest["banks"].items()}
        self.entries = entries
        # References disabled by review decisions, as of load time: a job keeps one view for its
        # whole run, like it keeps one gallery version.
        self.disabled: dict[int, dict[str, Any]] = disabled_in_force(manifest)
        self._members: dict[int, list[tuple[str, str, str, float]]] = {}
        for gid, bank in zip(entries["id"].tolist(), entries["bank"].tolist()):
            b = self.banks[bank]
            if not b.enabled or int(gid) in self.disabled:
                continue
            self._members.setdefault(int(gid), []).append((bank, b.category, b.action, self.bank_threshold(bank)))

    def bank_threshold(self, bank: str) -> float:
        """The fine threshold in force for ``bank``: its own, else the gallery's (or override)."""
        b = self.banks[bank]
        return float(b.fine_threshold if b.fine_threshold is not None else self.params.fine_threshold)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @classmethod
    def load(cls, uri_or_store: str | Store, model_id: str | None = None, version: str | None = None,
             use_gpu: bool | None = None, overrides: dict[str, float] | None = None,
             background: np.ndarray | None = None, nprobe: int | None = None,
             ef_search: int | None = None) -> GalleryIndex:
        """Load and verify a version (default: ``CURRENT``); refuse a model-id mismatch.

        ``background`` is the query model's background bank (512-d); the manifest's ``norm``
        settings say how it normalises fine scores. A gallery whose ``norm.beta > 0`` loads without
        one (to inspect it) but refuses to score: its thresholds were calibrated on normalised scores.
        """
        store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
        m = read_manifest(store, version)
        if model_id is not None:
            check_model(m, model_id)
        cascade, entries = load_streaming(store, m, use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search)
        t = {**m["thresholds"], **(overrides or {})}
        norm = ScoreNorm.from_dict({**m["thresholds"].get("norm", {}), **(overrides or {}).get("norm", {})})
        params = CascadeParams(float(t["coarse"]), float(t["fine"]), int(t.get("rerank_k", 500)), norm)
        return cls(m, cascade, entries, params, background)

    def coarse(self, xq128: np.ndarray) -> CoarseHits:
        """Stage 1 for every upload: ``D, I`` ``(B, rerank_k)`` above the coarse threshold."""
        return CoarseHits(*self.cascade.coarse(xq128, self.params.rerank_k, self.params.coarse_threshold))

    def rerank(self, xq512: np.ndarray, I: np.ndarray) -> np.ndarray:
        """Stage 2 for survivors only: fine scores of their candidates."""
        return self.cascade.rerank(xq512, I)

    def decide(self, D: np.ndarray, I: np.ndarray, F: np.ndarray | None,
               offset: np.ndarray | None = None) -> list[Match]:
        """Bank rules per query: an allow-list match at least as good as the best blocking match
        wins (no flag); otherwise the best blocking match above its bank's fine threshold decides
        (ties: filter over downrank). ``F`` is None when no query was reranked."""
        out = []
        off = np.zeros(len(I), np.float32) if offset is None else np.asarray(offset, np.float32)

        def raw(q: int, fine: float | None) -> float | None:
            return None if fine is None or not np.isfinite(fine) else float(fine + off[q])

        for q in range(len(I)):
            valid = I[q] >= 0
            best_coarse = float(D[q][valid].max()) if valid.any() else None
            if F is None or not valid.any():
                out.append(Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse))
                continue
            best_block: _Hit | None = None
            best_allow: _Hit | None = None
            for j in np.nonzero(valid)[0]:
                gid, fine, crs = int(I[q, j]), float(F[q, j]), float(D[q, j])
                for bank, category, action, thr in self._members.get(gid, ()):
                    if fine < thr:
                        continue
                    hit = _Hit(fine, gid, bank, category, action, crs)
                    if action == Action.ALLOW.value:
                        if best_allow is None or fine > best_allow.fine:
                            best_allow = hit
                    elif best_block is None or (fine, action == Action.FILTER.value) > (
                            best_block.fine, best_block.action == Action.FILTER.value):
                        best_block = hit
            best_fine = float(F[q][valid].max())
            if best_block is not None and (best_allow is None or best_allow.fine < best_block.fine):
                b = best_block
                out.append(Match(Status.MATCHED.value, b.action, b.bank, b.category, b.gid, b.coarse, b.fine, raw(q, b.fine)))
            elif best_block is not None and best_allow is not None:
                a = best_allow
                out.append(Match(Status.CLEAN.value, Action.NONE.value, a.bank, a.category, a.gid, a.coarse, a.fine,
                                 raw(q, a.fine)))
            else:
                out.append(Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse,
                                 fine_score=best_fine, fine_score_raw=raw(q, best_fine)))
        return out

    def normalise(self, xq512: np.ndarray, F: np.ndarray) -> FineScores:
        """Raw fine scores ``(B, k)`` of queries ``(B, rerank_dim)`` -> (normalised, offset ``(B,)``)."""
        norm = self.params.norm
        if norm.beta and self.background is None:
            raise GalleryIntegrityError(
                f"gallery {self.version} normalises fine scores (beta={norm.beta}) but was loaded without a "
                f"background bank: load it with the query model's bank (FeatureExtractor.background)")
        offset = norm.beta * background_term(xq512, self.background, norm.k) if norm.beta else np.zeros(len(F), np.float32)
        return FineScores((F - offset[:, None]).astype(np.float32), offset.astype(np.float32))

    def candidates(self, xq128: np.ndarray, rerank_fn: Callable[[np.ndarray], np.ndarray]) -> Candidates:
        """The cascade for a batch: coarse for all; ``rerank_fn(rows)`` -> 512-d queries, called only
        for the rows with a coarse candidate, whose fine scores are then normalised."""
        D, I = self.coarse(xq128)
        survivors = I[:, 0] >= 0
        F = np.full(I.shape, -np.inf, np.float32)
        offset = np.zeros(len(I), np.float32)
        if survivors.any():
            rows = np.nonzero(survivors)[0]
            xq512 = rerank_fn(rows)
            F[rows], offset[rows] = self.normalise(xq512, self.rerank(xq512, I[rows]))
        return Candidates(D, I, F, survivors, offset)

    def search(self, xq128: np.ndarray, rerank_fn: Callable[[np.ndarray], np.ndarray]) -> SearchResult:
        """Cascade + bank rules: one :class:`Match` per query, and the survivor mask."""
        c = self.candidates(xq128, rerank_fn)
        return SearchResult(self.decide(c.D, c.I, c.F, c.offset), c.survivors)
