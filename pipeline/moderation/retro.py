"""Retro-matching without Ray: what changed between two gallery versions, the coarse pass of the
stored signatures over the added references, and the copy-on-write merge of a day's partition.

* :func:`diff_versions`: references added and changed/removed between version ``since`` and
  ``current``, by (sha256, bank) membership (so ids reassigned by a rebuild still compare right).
  A reference is *added* when a membership exists now that did not, or its bank's fine threshold
  went down or its bank or reference was enabled again (it may match uploads it did not match);
  it is *changed* when a membership is gone, disabled, or its bank's action, category or
  threshold changed (past flags that name it are re-decided).
* :func:`coarse_vectors`: the gallery-side 128-d coarse vectors of given ids, read from only the
  shards that hold them.
* :class:`RetroMatcher`: a stage (plain class, one output row per input row) over signature rows:
  ``hit`` when a stored feature reaches the coarse threshold against one added reference, or the
  upload's past flag names a changed reference.
* :func:`merge_rows`: the re-decided rows of a file against its committed rows: a row whose
  decision did not change is carried over unchanged; a changed row gets the new decision with
  ``decided_by_run`` and ``previous_action``, and keeps the ``run_id`` of the run that read it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.gallery.manifest import Manifest
from pipeline.gallery.store import read_manifest, read_verified
from pipeline.ingest.storage import Store
from pipeline.moderation.signatures import decode_features
from pipeline.schemas import FILE_SCHEMA, Action, Status

# The stored query features are float16: a cosine computed from them differs from the fresh
# float32 one by up to ~1e-3. The coarse pass uses a threshold this much lower, so that it never
# drops an upload a fresh run would send to the rerank; the survivors are then decided by the real
# Moderator at full precision.
FLOAT16_MARGIN = 0.01
DECISION = ("status", "action", "bank", "reference_id")
FLAGGED = {Action.FILTER.value, Action.DOWNRANK.value, Action.REVIEW.value}


@dataclass(frozen=True)
class GalleryDiff:
    """What changed between two gallery versions, as the retro pass needs it."""

    since: str
    current: str
    added_ids: tuple[int, ...]        # ids in ``current`` to match the stored signatures against
    changed_ids: tuple[int, ...]      # ids in ``since`` whose past flags are re-decided
    added: list[dict[str, Any]] = field(default_factory=list)     # {id, bank, sha256, why}
    changed: list[dict[str, Any]] = field(default_factory=list)   # {id, bank, sha256, why}

    @property
    def empty(self) -> bool:
        return not self.added_ids and not self.changed_ids

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since, "current": self.current, "references_added": self.added,
                "references_removed_or_changed": self.changed}


def _entries(store: Store, m: Manifest) -> pd.DataFrame:
    vstore = store.child(f"versions/{m.version}")
    return pq.read_table(io.BytesIO(read_verified(vstore, m.entries.file, m.entries.sha256))).to_pandas()


def _active(store: Store, m: Manifest) -> dict[tuple[str, str], tuple[int, str, str, float]]:
    """(sha256, bank) -> (id, category, action, fine threshold) of every membership that can match."""
    disabled = m.disabled_in_force()
    out = {}
    for gid, bank, sha in zip(*(_entries(store, m)[c].tolist() for c in ("id", "bank", "sha256"))):
        b = m.banks[bank].bank
        if not b.enabled or int(gid) in disabled:
            continue
        thr = float(b.fine_threshold if b.fine_threshold is not None else m.model.fine_threshold)
        out[(sha, bank)] = (int(gid), b.category, b.action, thr)
    return out


def diff_versions(store: Store, since: str, current: str | None = None) -> GalleryDiff:
    """References added and changed between gallery versions ``since`` and ``current`` (default CURRENT)."""
    old_m, new_m = read_manifest(store, since), read_manifest(store, current)
    old, new = _active(store, old_m), _active(store, new_m)
    added: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for key, (gid, _cat, _act, thr) in sorted(new.items()):
        prev = old.get(key)
        if prev is None or thr < prev[3]:
            added.append({"id": gid, "bank": key[1], "sha256": key[0], "why": "new" if prev is None else "threshold"})
    for key, (gid, cat, act, thr) in sorted(old.items()):
        now = new.get(key)
        why = ("removed" if now is None else "action" if (now[1], now[2]) != (cat, act) else "threshold"
               if now[3] > thr else "id" if now[0] != gid else None)
        if why:
            changed.append({"id": gid, "bank": key[1], "sha256": key[0], "why": why})
    return GalleryDiff(old_m.version, new_m.version, tuple(sorted({a["id"] for a in added})),
                       tuple(sorted({c["id"] for c in changed})), added, changed)


def _reconstruct(index: Any, gid: int) -> np.ndarray:
    import faiss

    if isinstance(index, faiss.IndexIDMap2):
        return index.reconstruct(int(gid))  # type: ignore[return-value]  # faiss's stub: the torch overload comes first
    ivf = faiss.extract_index_ivf(index)  # IVF: reconstruct by id needs a direct map
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # faiss's stub omits DirectMap
    return index.reconstruct(int(gid))


def coarse_vectors(store: Store, version: str, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, ``(n, coarse_dim)`` float32) gallery-side coarse vectors of ``ids`` in ``version``,
    read (verified) from the shards that hold them (``id % n_shards``) only."""
    import faiss

    m = read_manifest(store, version)
    ids = sorted(set(int(i) for i in ids))
    vstore = store.child(f"versions/{m.version}")
    by_shard: dict[int, list[int]] = {}
    for gid in ids:
        by_shard.setdefault(gid % len(m.shards), []).append(gid)
    out_ids, vecs = [], []
    for s, gids in sorted(by_shard.items()):
        sh = m.shards[s]
        index = faiss.deserialize_index(np.frombuffer(read_verified(vstore, sh.index, sh.index_sha256), np.uint8))
        for gid in gids:
            out_ids.append(gid)
            vecs.append(_reconstruct(index, gid))
    dim = m.model.coarse_dim
    return np.asarray(out_ids, np.int64), (np.vstack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32))


class RetroMatcher:
    """Signature rows -> the same rows with ``hit`` (re-decide this upload), ``best_id`` and
    ``best_score`` (the best added reference's coarse cosine, NaN without one).

    ``ids``/``vectors``: the added references' coarse vectors (a small exact faiss index);
    ``threshold``: the gallery's coarse threshold (``FLOAT16_MARGIN`` is taken off it);
    ``flagged``: ``"dt/key"`` of uploads whose past flag names a changed reference."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, threshold: float,
                 flagged: Iterable[str] = ()) -> None:
        import faiss

        self.ids = np.asarray(ids, np.int64)
        self.index = faiss.IndexFlatIP(vectors.shape[1] if len(vectors) else 128)
        if len(vectors):
            self.index.add(np.ascontiguousarray(vectors, np.float32))
        self.threshold = float(threshold) - FLOAT16_MARGIN
        self.flagged = set(flagged)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = [str(k) for k in batch["image_key"]]
        dts = [str(d) for d in batch["dt"]]
        n = len(keys)
        best_id, best = np.full(n, -1, np.int64), np.full(n, np.nan, np.float32)
        if self.index.ntotal and n:
            D, I = self.index.search(decode_features(list(batch["coarse_feature"])), 1)
            best, best_id = D[:, 0].astype(np.float32), self.ids[I[:, 0]]
        hit = np.nan_to_num(best, nan=-np.inf) >= self.threshold
        hit |= np.asarray([f"{d}/{k}" in self.flagged for d, k in zip(dts, keys)], bool)
        return {"dt": np.asarray(dts, object), "image_key": np.asarray(keys, object),
                "image_uri": np.asarray(batch["image_uri"], object), "hit": hit, "best_id": best_id,
                "best_score": best}


def flagged_by(table: pa.Table, changed_ids: Iterable[int]) -> list[str]:
    """Keys of the rows of a flags table whose ``reference_id`` is one of ``changed_ids``."""
    changed = set(int(i) for i in changed_ids)
    return [k for k, r in zip(table.column("image_key").to_pylist(), table.column("reference_id").to_pylist())
            if r is not None and int(r) in changed]


@dataclass
class MergeCounts:
    re_decided: int = 0      # rows a re-decision was computed for
    changed: int = 0         # rows whose decision changed
    newly_flagged: int = 0   # action none -> filter/downrank/review
    cleared: int = 0         # filter/downrank/review -> none
    repointed: int = 0       # still flagged, with another reference, bank or action
    reread_errors: int = 0   # re-read or decode failed: the committed row is kept

    def add(self, other: MergeCounts) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def _decision(row: dict[str, Any]) -> tuple:
    return tuple(row.get(c) for c in DECISION)


def merge_rows(committed: pa.Table, redecided: dict[str, dict[str, Any]], retro_run: str
               ) -> tuple[pa.Table, MergeCounts]:
    """One committed file's rows with the re-decided rows (by key) merged in (see module doc)."""
    counts = MergeCounts()
    rows = committed.cast(FILE_SCHEMA).to_pylist()
    for i, old in enumerate(rows):
        new = redecided.get(old["image_key"])
        if new is None:
            continue
        counts.re_decided += 1
        if new["status"] == Status.ERROR.value:
            counts.reread_errors += 1
            continue
        if _decision(new) == _decision(old):
            continue
        counts.changed += 1
        was, now = old["action"] in FLAGGED, new["action"] in FLAGGED
        counts.newly_flagged += int(now and not was)
        counts.cleared += int(was and not now)
        counts.repointed += int(was and now)
        rows[i] = {**new, "image_key": old["image_key"], "run_id": old["run_id"], "decided_by_run": retro_run,
                   "previous_action": old["action"]}
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA), counts
