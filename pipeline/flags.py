"""Flags output: staged writes, verification and the atomic commit of one ``dt=`` partition.

Protocol for a run of date D with id R under output root O:

1. Ray writes Parquet files to ``O/_staging/R/data/`` (``_``-prefixed folders are ignored by
   pyarrow/pandas/DuckDB hive discovery, so readers never see staged rows).
2. :func:`verify_staged` reads back only the key/status columns: one row per input key, no
   duplicates, the expected row count. Any mismatch fails the run *before* anything is visible.
3. :func:`commit_partition` swaps the partition in:
   * local disk: ``dt=D`` is renamed away and the staged folder renamed into place (two renames);
     ``_run.json`` is inside before the swap and ``_SUCCESS`` is written last.
   * S3 (no rename): ``_SUCCESS`` is deleted first, old data objects deleted, staged objects
     copied in, then ``_run.json`` and ``_SUCCESS``. Readers that need consistency on S3 read a
     partition only when ``_SUCCESS`` exists (or read exactly the files ``_run.json`` lists).
4. Staging is removed. A killed run leaves only ``_staging/R``: the next run of any date sweeps
   staging folders older than an hour, and the committed partitions are untouched.

A rerun of D therefore *replaces* the partition: rows are never duplicated.
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.schemas import FILE_SCHEMA, FLAG_SCHEMA
from pipeline.storage import Store

SUCCESS = "_SUCCESS"
RUN_JSON = "_run.json"
STAGING = "_staging"


class CommitError(RuntimeError):
    """The staged output is incomplete or inconsistent; nothing was published."""


def partition_key(dt: str) -> str:
    _dt.date.fromisoformat(dt)  # validates YYYY-MM-DD
    return f"dt={dt}"


def staging_key(run_id: str) -> str:
    return f"{STAGING}/{run_id}"


def is_committed(out: Store, dt: str) -> bool:
    return out.exists(f"{partition_key(dt)}/{SUCCESS}")


def read_run(out: Store, dt: str) -> dict[str, Any] | None:
    k = f"{partition_key(dt)}/{RUN_JSON}"
    return json.loads(out.read_text(k)) if out.exists(k) else None


def verify_staged(out: Store, run_id: str, expected_keys: int | None) -> dict[str, Any]:
    """Counts from the staged files; raises :class:`CommitError` on duplicates or lost rows."""
    data = out.child(staging_key(run_id) + "/data")
    files = [k for k in data.list() if k.endswith(".parquet")]
    if not files and expected_keys:
        raise CommitError(f"run {run_id}: no staged Parquet files but {expected_keys} inputs")
    cols = ["image_key", "status", "action", "error_code", "bank"]
    tables = [pq.read_table(data.path(k), columns=cols, filesystem=out.fs) for k in files]
    t = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in cols})
    keys = t.column("image_key").to_pylist()
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise CommitError(f"run {run_id}: {len(dup)} image keys have more than one row (e.g. {dup[:3]})")
    if expected_keys is not None and len(keys) != expected_keys:
        raise CommitError(f"run {run_id}: {len(keys)} rows staged for {expected_keys} inputs")
    by = lambda c: dict(Counter(v for v in t.column(c).to_pylist() if v is not None))  # noqa: E731
    return {"rows": len(keys), "files": [posixpath.basename(f) for f in files], "by_status": by("status"),
            "by_action": by("action"), "by_error_code": by("error_code"), "by_bank": by("bank")}


def sweep_staging(out: Store, older_than_s: float = 3600.0, keep: str | None = None,
                  dt: str | None = None) -> list[str]:
    """Delete staging folders of killed runs: any earlier run of the same ``dt`` (one writer per
    partition), and runs of other dates older than ``older_than_s``."""
    removed = []
    for d in out.list_dirs(STAGING):
        run = posixpath.basename(d)
        if run == keep:
            continue
        info = out.fs.get_file_info(out.path(f"{STAGING}/{run}/started"))
        started = None
        if info.type.name == "File":
            try:
                started = float(out.read_text(f"{STAGING}/{run}/started"))
            except ValueError:
                started = None
        same_dt = dt is not None and run.startswith(dt.replace("-", "") + "T")
        if same_dt or started is None or time.time() - started > older_than_s:
            out.delete_dir(f"{STAGING}/{run}")
            removed.append(run)
    return removed


def commit_partition(out: Store, dt: str, run_id: str, run_info: dict[str, Any]) -> str:
    """Publish the staged files of ``run_id`` as partition ``dt`` (replacing any previous one)."""
    part = partition_key(dt)
    stage = staging_key(run_id)
    files = [k for k in out.child(stage + "/data").list() if k.endswith(".parquet")]
    run_info = {**run_info, "files": [f"part-{run_id}-{i:05d}.parquet" for i in range(len(files))]}
    if out.is_local:
        # Build the complete partition folder in staging, then swap it in with renames.
        newdir = f"{stage}/{part}"
        for i, k in enumerate(files):
            out.move(f"{stage}/data/{k}", f"{newdir}/part-{run_id}-{i:05d}.parquet")
        out.write_text(f"{newdir}/{RUN_JSON}", json.dumps(run_info, indent=2, default=str) + "\n")
        if not files:
            out.fs.create_dir(out.path(newdir))
        old = f"{stage}/replaced"
        if out.exists(part):
            out.move(part, old)
        out.move(newdir, part)
        out.write_text(f"{part}/{SUCCESS}", run_id + "\n")
        out.delete_dir(old)
    else:
        out.delete_file(f"{part}/{SUCCESS}")
        for k in list(out.list(part)):
            out.delete_file(k)
        for i, k in enumerate(files):
            out.move(f"{stage}/data/{k}", f"{part}/part-{run_id}-{i:05d}.parquet")
        out.write_text(f"{part}/{RUN_JSON}", json.dumps(run_info, indent=2, default=str) + "\n")
        out.write_text(f"{part}/{SUCCESS}", run_id + "\n")
    out.delete_dir(stage)
    if not list(out.list(STAGING)):
        out.delete_dir(STAGING)  # also the S3 directory marker object
    return out.full_uri(part)


def read_flags(uri: str, dt: str | None = None) -> "Any":
    """Read committed flags into pandas (the recommender's view): partitions with ``_SUCCESS`` only."""
    from pipeline.storage import open_store

    out = open_store(uri)
    parts = [posixpath.basename(d) for d in out.list_dirs() if posixpath.basename(d).startswith("dt=")]
    frames = []
    for p in parts:
        d = p[3:]
        if (dt is None or d == dt) and is_committed(out, d):
            ds = pads.dataset(out.path(p), filesystem=out.fs, format="parquet", schema=FILE_SCHEMA)
            t = ds.to_table()
            t = t.add_column(t.schema.get_field_index("image_sha256") + 1, "dt", pa.array([d] * len(t), pa.string()))
            frames.append(t.cast(FLAG_SCHEMA).to_pandas())
    import pandas as pd

    return pd.concat(frames, ignore_index=True) if frames else FLAG_SCHEMA.empty_table().to_pandas()
