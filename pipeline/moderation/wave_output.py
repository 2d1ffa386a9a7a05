"""The waves companion dataset: one row per upload of a partition (:data:`~pipeline.schemas.WAVE_SCHEMA`),
keyed by ``image_key``, committed beside the flags with the flags' own protocol.

Layout: ``OUTPUT/_waves/dt=D/`` (and ``dt=D/hour=HH/``) + ``_run.json`` + ``_SUCCESS``: ``_``-prefixed,
so hive discovery of the flags root never sees it, and the flags schema is unchanged. A waves run
claims the partition in the waves root, stages its one file, verifies it (exactly one row per key of
the committed flags partition it clustered, no other key) and publishes it with
:func:`pipeline.moderation.flags.commit_partition`: a reader sees the old clusters or the new ones,
never a mix, and a rerun replaces the partition.

The cluster assignment itself (:func:`assign`) is plain numpy over the partition's rows and the
accepted edges; :mod:`pipeline.moderation.waves` finds the edges.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.storage import Store, open_store
from pipeline.moderation import flags as F
from pipeline.moderation.signatures import committed_files, decode_features
from pipeline.moderation.waves import NOT_SEARCHED, REREAD_FAILED, SEARCHED, UnionFind, cluster_id
from pipeline.schemas import WAVE_SCHEMA

WAVES_DIR = "_waves"


def waves_root(output_uri: str, waves_uri: str | None = None) -> str:
    """Where a partition's waves go: ``waves_uri``, else ``OUTPUT/_waves``."""
    return waves_uri or output_uri.rstrip("/") + "/" + WAVES_DIR


@dataclass
class PartitionSignatures:
    """A committed partition's searched uploads, sorted by key: row ``i`` is ``keys[i]``."""

    keys: list[str]
    uris: list[str | None]
    sha256: list[str | None]
    x: np.ndarray              # (n, 128) float32 low-res query features


def read_signatures(sig: Store, part: str) -> PartitionSignatures:
    """The committed signatures of ``part``, sorted by key (row order is never identity: keys are)."""
    cols = ["image_key", "image_uri", "image_sha256", "coarse_feature"]
    tables = [pq.read_table(p, columns=cols, filesystem=sig.fs) for p in committed_files(sig, part)]
    if not tables:
        return PartitionSignatures([], [], [], np.zeros((0, 128), np.float32))
    t = pa.concat_tables(tables).sort_by("image_key")
    x = decode_features(t.column("coarse_feature"))
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # float16 storage: renormalise
    return PartitionSignatures(t.column("image_key").to_pylist(), t.column("image_uri").to_pylist(),
                               t.column("image_sha256").to_pylist(), x / np.maximum(norms, 1e-12))


@dataclass
class Edge:
    a: int
    b: int
    score: float | None
    rule: str


def _rank_key(t: float, key: str) -> tuple[bool, float, str]:
    """Upload time first (unknown ones after the known), then key."""
    return (bool(np.isnan(t)), 0.0 if np.isnan(t) else t, key)


def assign(part: str, keys: list[str], edges: list[Edge], uploaded_at: dict[int, float]) -> dict[str, np.ndarray]:
    """Clusters of the rows ``keys`` (sorted) joined by ``edges`` -> per row ``cluster_id``,
    ``size``, ``rank``, ``score``/``rule`` (its best edge: identical bytes, else the highest fine
    score). ``uploaded_at``: row -> POSIX seconds (NaN or absent: unknown, ranked after the known
    ones, then by key)."""
    n = len(keys)
    uf = UnionFind(n)
    best: dict[int, tuple[float, float | None, str]] = {}  # row -> (priority, score, rule)
    for e in edges:
        uf.union(e.a, e.b)
        prio = np.inf if e.score is None else float(e.score)
        for r in (e.a, e.b):
            if r not in best or prio > best[r][0]:
                best[r] = (prio, e.score, e.rule)
    labels = uf.labels()
    size = np.bincount(labels, minlength=n)[labels] if n else np.zeros(0, np.int64)
    rank = np.ones(n, np.int64)
    members: dict[int, list[int]] = {}
    for i, root in enumerate(labels):
        members.setdefault(int(root), []).append(i)
    for rows in members.values():
        if len(rows) > 1:
            order = sorted(rows, key=lambda i: _rank_key(uploaded_at.get(i, float("nan")), keys[i]))
            for r, i in enumerate(order, 1):
                rank[i] = r
    score = np.asarray([np.nan if best.get(i, (0, None))[1] is None else best[i][1] for i in range(n)], np.float32)
    rule = np.asarray([best[i][2] if i in best else None for i in range(n)], object)
    ids = np.asarray([cluster_id(part, keys[int(root)]) for root in labels], object)  # root = smallest key
    return {"cluster_id": ids, "size": size, "rank": rank, "score": score, "rule": rule}


def _timestamp(t: float | None) -> _dt.datetime | None:
    return None if t is None or np.isnan(t) else _dt.datetime.fromtimestamp(t, _dt.UTC)


def wave_table(part: str, flag_keys: list[str], sigs: PartitionSignatures, clusters: dict[str, np.ndarray],
               uploaded_at: dict[int, float], reread_failed: set[int], wave_min_size: int, run_id: str,
               flags_run_id: str) -> pa.Table:
    """One row per key of the flags partition (``flag_keys``): the clustered rows of ``sigs``, and
    each upload that was never searched (an error or low content) as a cluster of its own."""
    row_of = {k: i for i, k in enumerate(sigs.keys)}
    cols: dict[str, list[Any]] = {f.name: [] for f in WAVE_SCHEMA}
    for key in sorted(flag_keys):
        i = row_of.get(key)
        if i is None:
            vals = {"dup_cluster_id": cluster_id(part, key), "dup_cluster_size": 1, "dup_rank": 1, "wave": False,
                    "uploaded_at": None, "dup_score": None, "dup_edge": None, "dup_basis": NOT_SEARCHED,
                    "image_uri": None}
        else:
            size = int(clusters["size"][i])
            score = clusters["score"][i]
            vals = {"dup_cluster_id": str(clusters["cluster_id"][i]), "dup_cluster_size": size,
                    "dup_rank": int(clusters["rank"][i]), "wave": size >= wave_min_size,
                    "uploaded_at": _timestamp(uploaded_at.get(i)), "dup_score": None if np.isnan(score) else float(score),
                    "dup_edge": clusters["rule"][i], "dup_basis": REREAD_FAILED if i in reread_failed else SEARCHED,
                    "image_uri": sigs.uris[i]}
        for c, v in {"image_key": key, **vals, "run_id": run_id, "flags_run_id": flags_run_id}.items():
            cols[c].append(v)
    return pa.Table.from_pydict(cols, schema=WAVE_SCHEMA)


def verify_rows(table: pa.Table, expected: set[str], run_id: str) -> None:
    """:class:`~pipeline.moderation.flags.CommitError` unless ``table`` holds exactly one row per key of ``expected``."""
    keys = table.column("image_key").to_pylist()
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise F.CommitError(f"waves run {run_id}: {len(dup)} uploads have more than one row (e.g. {dup[:3]})")
    if set(keys) != expected:
        lost, extra = expected - set(keys), set(keys) - expected
        raise F.CommitError(f"waves run {run_id}: rows differ from the flags partition ({len(lost)} without one, "
                            f"e.g. {sorted(lost)[:3]}; {len(extra)} unknown, e.g. {sorted(extra)[:3]})")


def commit_waves(wstore: Store, part: str, run_id: str, table: pa.Table, expected: set[str],
                 info: dict[str, Any]) -> str:
    """Claim ``part`` in the waves root, stage ``table``, read it back and verify one row per
    expected key, publish by the flags' protocol. -> the partition's URI. A failure publishes
    nothing and removes the run's staging."""
    F.claim_partition(wstore, part, run_id)
    try:
        key = F.write_staged(wstore, run_id, "waves.parquet", table, WAVE_SCHEMA)
        back = pq.read_table(wstore.path(key), columns=["image_key"], filesystem=wstore.fs)
        verify_rows(back, expected, run_id)
        return F.commit_partition(wstore, part, run_id, info, schema=WAVE_SCHEMA)
    except Exception:
        F.abandon(wstore, run_id)
        raise


def read_waves(uri: str, part: str) -> Any:
    """A committed waves partition (``_SUCCESS`` only) into pandas; an empty frame when there is none."""
    st = open_store(uri)
    if not F.is_committed(st, part):
        return WAVE_SCHEMA.empty_table().to_pandas()
    files = [st.path(k) for k in st.list(F.partition_key(part), recursive=False) if k.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(p, filesystem=st.fs, schema=WAVE_SCHEMA) for p in files]).to_pandas()


def read_run_info(uri: str, part: str) -> dict[str, Any] | None:
    """The ``_run.json`` of a committed waves partition."""
    st = open_store(uri)
    return F.read_run(st, part) if F.is_committed(st, part) else None


def wave_members(uri: str, part: str, cid: str) -> Any:
    """The rows of cluster ``cid`` in committed partition ``part``, by rank; a ``ModscanError``
    naming the partition when it holds no such cluster."""
    from pipeline.errors import UsageError

    df = read_waves(uri, part)
    rows = df[df["dup_cluster_id"] == cid].sort_values("dup_rank")
    if rows.empty:
        where = F.partition_key(part)
        raise UsageError(f"no cluster {cid!r} in the committed waves of {where} under {uri} "
                         f"(run `modscan waves` for it, or check the id in its review page)")
    return rows


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, default=str) + "\n"
