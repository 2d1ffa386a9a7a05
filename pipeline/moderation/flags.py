"""Flags output: staged writes, verification and the atomic commit of one partition (a day
``dt=D/`` or an hour ``dt=D/hour=HH/``, :mod:`pipeline.moderation.partitions`).

Protocol for a run R of partition P under output root O:

0. :func:`claim_partition` writes ``O/_owners/<P>`` = R before the run stages anything (last
   writer wins): the newest run of a partition owns it. An older run of the same partition still
   running fails with :class:`PartitionTakenError` (at its next chunk, or at commit) and publishes
   nothing, so two concurrent runs never publish a mixed partition: the later one wins.
1. Rows are staged under ``O/_staging/`` (``_``-prefixed folders are ignored by pyarrow, pandas and
   DuckDB hive discovery, so readers never see staged rows; layout and cleanup rules:
   :mod:`pipeline.moderation.staging`). A chunked run records each finished chunk, so that a
   rerun after a killed driver runs only the rest (:mod:`pipeline.moderation.resume`).
2. :func:`verify_staged` reads back only the key/status columns of the files to publish: one row
   per input key, no duplicates, exactly the expected keys. Any mismatch fails the run *before*
   anything is visible.
3. :func:`commit_partition` publishes them, while R still owns P and after any run that began
   committing P (or, for a day, one of its hours) earlier has finished (its ``committing``
   heartbeat is removed or stale). Staged files are copied, never moved (a hard link on local
   disk, a server-side copy on S3): a commit that fails half-way leaves the staging whole, and the
   rerun resumes from it.
   * local disk: the new partition folder is built in staging and swapped in by two renames;
     ``_run.json`` is inside before the swap and ``_SUCCESS`` is written last.
   * S3 (no rename), and a day folder that also holds hours: ``_SUCCESS`` is deleted first, the
     partition's old files deleted, the staged files copied in, then ``_run.json`` and ``_SUCCESS``.
     Readers that need consistency read a partition only when ``_SUCCESS`` exists (or read exactly
     the files ``_run.json`` lists). A write that fails half-way leaves the partition without
     ``_SUCCESS``: unpublished, and the next run of P replaces it.
4. The staging of P is removed while R still owns P (:func:`pipeline.moderation.staging.clean_partition`).

A rerun of P therefore *replaces* the partition: rows are never duplicated.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.errors import ModscanError
from pipeline.ingest.storage import Store
from pipeline.moderation.partitions import (
    HOUR_DIR,
    OWNERS,
    RUN_JSON,
    SUCCESS,
    CommitError,
    PartitionTakenError,
    check_owner,
    claim_partition,
    committed_partitions,
    compact,
    day_range,
    hour_partition,
    hour_partitions,
    is_committed,
    is_hourly,
    owner_key,
    partition_key,
    partition_owner,
    partition_range,
    previous_hour,
    split_partition,
    taken_error,
    valid_date,
    valid_partition,
)
from pipeline.moderation.staging import (
    COMMIT_STALE_S,
    STAGING,
    VOID,
    abandon,
    clean_partition,
    clear_heartbeat,
    committing_heartbeat_age,
    prune_staging,
    removed,
    stage_key,
    staging_key,
    sweep_staging,
    wait_for_other_commits,
    write_heartbeat,
)
from pipeline.schemas import FILE_SCHEMA, FLAG_SCHEMA

log = logging.getLogger(__name__)

__all__ = [  # the commit protocol's names, importable from here as before partitions and staging had modules
    "COMMIT_STALE_S", "HOUR_DIR", "OWNERS", "RUN_JSON", "STAGING", "SUCCESS", "CommitError", "PartitionTakenError", "abandon",
    "check_owner", "claim_partition", "commit_partition", "committed_partitions", "committing_heartbeat_age",
    "compact", "day_range", "hour_partition", "hour_partitions", "is_committed", "is_hourly", "partition_range",
    "previous_hour", "split_partition", "owner_key", "partition_key", "partition_owner", "read_flags", "read_run",
    "read_staged", "staging_key", "sweep_staging", "taken_error", "valid_date", "valid_partition", "verify_staged",
    "wait_for_commits", "write_staged",
]


def read_run(out: Store, part: str) -> dict[str, Any] | None:
    k = f"{partition_key(part)}/{RUN_JSON}"
    return json.loads(out.read_text(k)) if out.exists(k) else None


def _data_files(out: Store, folder: str) -> list[str]:
    """The staged Parquet files of ``folder`` (keys under the output root)."""
    return [f"{folder}/data/{k}" for k in out.child(f"{folder}/data").list() if k.endswith(".parquet")]


def read_staged(out: Store, run_id: str, columns: list[str], files: list[str] | None = None) -> tuple[list[str], pa.Table]:
    """(files, ``columns`` of them, concatenated): what a verification reads back (the flags' and the
    signatures' alike). ``files``: keys under the output root (a chunked run's); default: every
    staged Parquet file of ``run_id`` staged in one pass."""
    files = _data_files(out, staging_key(run_id)) if files is None else files
    tables = [pq.read_table(out.path(k), columns=columns, filesystem=out.fs) for k in files]
    t = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})
    return files, t


def write_staged(out: Store, run_id: str, name: str, table: pa.Table, schema: pa.Schema = FILE_SCHEMA,
                 folder: str | None = None) -> str:
    """Add a Parquet file of rows written by the driver (not by Ray) to a run's staging (``folder``: a
    chunked run's attempt; default: ``run_id``'s folder), cast to ``schema`` (flag rows by default;
    signatures pass theirs). -> its key."""
    buf = pa.BufferOutputStream()
    pq.write_table(table.cast(schema), buf)
    key = f"{folder or staging_key(run_id)}/data/{name}"
    out.write_bytes(key, buf.getvalue().to_pybytes())
    return key


def verify_staged(out: Store, run_id: str, expected_keys: int | None, input_keys: set[str] | None = None,
                  gallery_version: str | None = None, files: list[str] | None = None) -> dict[str, Any]:
    """Counts from the staged files (``files``, default: ``run_id``'s, see :func:`read_staged`);
    raises :class:`CommitError` on duplicates, lost rows, (when ``input_keys`` is given) a staged
    key that is not one of the inputs, or (when ``gallery_version`` is given) a row decided with
    another gallery version."""
    cols = ["image_key", "status", "action", "error_code", "bank"] + (["gallery_version"] if gallery_version else [])
    files, t = read_staged(out, run_id, cols, files)
    if not files and expected_keys:
        raise CommitError(f"run {run_id}: no staged Parquet files but {expected_keys} inputs")
    keys = t.column("image_key").to_pylist()
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise CommitError(f"run {run_id}: {len(dup)} image keys have more than one row (e.g. {dup[:3]})")
    if expected_keys is not None and len(keys) != expected_keys:
        raise CommitError(f"run {run_id}: {len(keys)} rows staged for {expected_keys} inputs")
    if input_keys is not None:
        unknown = set(keys) - input_keys
        if unknown or len(input_keys) != len(keys):
            lost = input_keys - set(keys)
            raise CommitError(f"run {run_id}: staged keys differ from the inputs ({len(lost)} without a row, "
                              f"e.g. {sorted(lost)[:3]}; {len(unknown)} unknown, e.g. {sorted(unknown)[:3]})")
    by = lambda c: dict(Counter(v for v in t.column(c).to_pylist() if v is not None))
    if gallery_version and set(by("gallery_version")) - {gallery_version}:
        raise CommitError(f"run {run_id}: rows decided with gallery versions {by('gallery_version')}, "
                          f"the run pinned {gallery_version}")
    return {"rows": len(keys), "files": [posixpath.basename(f) for f in files], "by_status": by("status"),
            "by_action": by("action"), "by_error_code": by("error_code"), "by_bank": by("bank")}


def wait_for_commits(out: Store, part: str, run_id: str, stale_s: float | None = None) -> None:
    """Return once no other run of ``part`` is committing (a retro run reads the partition it will
    replace only after this, so it never reads one half-swapped)."""
    wait_for_other_commits(out, part, run_id, time.time(), stale_s)


def _publish_local(out: Store, part: str, folder: str, files: list[str], names: list[str], info: str) -> None:
    """Build the partition folder in staging (hard links to the staged files) and swap it in."""
    newdir = f"{folder}/{part}"
    for k, name in zip(files, names):
        out.copy(k, f"{newdir}/{name}")
    out.write_text(f"{newdir}/{RUN_JSON}", info)
    old = f"{folder}/replaced"
    if out.exists(part):
        out.move(part, old)
    out.move(newdir, part)
    out.write_text(f"{part}/{SUCCESS}", posixpath.basename(folder) + "\n")
    if out.exists(old):
        out.delete_dir(old)


def _publish_in_place(out: Store, part: str, folder: str, files: list[str], names: list[str], info: str,
                      beat: Any) -> None:
    """S3 (no rename), or a local day folder that also holds hours: replace the partition's own
    files (never a ``hour=HH/`` folder under a day), ``_SUCCESS`` removed first and written last."""
    out.delete_file(f"{part}/{SUCCESS}")
    for k in list(out.list(part, recursive=False)):
        out.delete_file(k)
        beat()
    for k, name in zip(files, names):
        out.copy(k, f"{part}/{name}")
        beat()
    out.write_text(f"{part}/{RUN_JSON}", info)
    out.write_text(f"{part}/{SUCCESS}", posixpath.basename(folder) + "\n")


def commit_partition(out: Store, dt: str, run_id: str, run_info: dict[str, Any],
                     stale_s: float | None = None, schema: pa.Schema = FILE_SCHEMA, *,
                     folder: str | None = None, files: list[str] | None = None, stage: str | None = None,
                     clean_up: bool = True) -> str:
    """Publish staged files of ``run_id`` as partition ``dt`` (a day or an hour), replacing any
    previous one. ``folder``: the run's staging folder (a chunked run's attempt; default:
    ``run_id``'s); ``files``: the Parquet files to publish, keys under the output root (default:
    every one of ``folder``); ``stage``: a chunked run's stage, made void once published;
    ``schema``: of the empty file a partition without rows gets (flags by default; signatures
    pass theirs); ``clean_up``: remove the partition's staging afterwards (see
    :func:`clean_up_after_commit`).

    Refuses with :class:`PartitionTakenError` when a newer run of ``dt`` owns the partition.
    """
    part, folder = partition_key(dt), folder or staging_key(run_id)
    since = time.time()
    check_owner(out, dt, run_id)
    write_heartbeat(out, folder, since)
    wait_for_other_commits(out, dt, run_id, since, stale_s)
    try:
        # A newer run that claimed dt before the heartbeat above waits for this commit; one that
        # claimed after it sees the heartbeat. Either way only one run writes dt at a time.
        check_owner(out, dt, run_id)
    except PartitionTakenError:
        clear_heartbeat(out, folder)
        raise
    files = _data_files(out, folder) if files is None else list(files)
    if not files:
        # A partition with no rows still gets one (empty) file: readers then get the schema, and
        # `pd.read_parquet(root, filters=[("dt", "=", D)])` returns an empty frame, not an error.
        files = [write_staged(out, run_id, "empty.parquet", schema.empty_table(), schema, folder)]
    names = [f"part-{run_id}-{i:05d}.parquet" for i in range(len(files))]
    info = json.dumps({**run_info, "files": names}, indent=2, default=str) + "\n"
    day_with_hours = split_partition(dt)[1] is None and bool(hour_partitions(out, dt))
    if out.is_local and not day_with_hours:
        _publish_local(out, part, folder, files, names, info)
    else:
        _publish_in_place(out, part, folder, files, names, info, lambda: write_heartbeat(out, folder, since))
    if clean_up:
        clean_up_after_commit(out, dt, run_id, stage, folder)
    return out.full_uri(part)


def clean_up_after_commit(out: Store, dt: str, run_id: str, stage: str | None = None, folder: str | None = None) -> None:
    """After ``run_id`` published ``dt``: its stage (if any) is made void, so that no later run
    resumes from it, then the partition's staging is removed while ``run_id`` still owns it (one
    that claimed it meanwhile keeps its own and anything it may be resuming from). Never raises:
    the partition is published, and what a superseded run is still writing into is left for a
    later sweep rather than failing the run that committed."""
    try:
        if stage is not None:
            out.write_text(f"{stage_key(stage)}/{VOID}", run_id + "\n")
        if folder is not None:
            clear_heartbeat(out, folder)
        clean_partition(out, dt, committer=run_id)
        prune_staging(out, stage)
    except Exception:
        log.warning("run %s: cleaning up the staging of %s failed (a later sweep retries)", run_id,
                    partition_key(dt), exc_info=True)


def remove_own_attempt(out: Store, stage: str, run_id: str, folder: str, records: Store | None = None) -> None:
    """After a superseded chunked run failed: remove its attempt folder in ``out`` unless a chunk
    record of the stage names it (the owner may be resuming from those chunks; ``records``: the
    store holding the records, the flags root, when ``out`` is the signatures root), then the stage
    and ``_staging`` folders if empty."""
    from pipeline.moderation.resume import read_records

    try:
        if all(r.run_id != run_id for r in read_records(records or out, stage).values()):
            removed(out, folder)
        prune_staging(out, stage)
    except Exception:
        log.warning("run %s: could not remove its attempt %s (a later sweep removes it)", run_id, folder, exc_info=True)


def _read_partition(out: Store, part: str) -> pa.Table:
    """The rows of one committed partition (its own files: a day's never include its hours')."""
    files = [out.path(k) for k in out.list(partition_key(part), recursive=False) if k.endswith(".parquet")]
    t = pads.dataset(files, filesystem=out.fs, format="parquet", schema=FILE_SCHEMA).to_table()
    dt, hour = split_partition(part)
    i = t.schema.get_field_index("image_sha256") + 1
    t = t.add_column(i, "dt", pa.array([dt] * len(t), pa.string()))
    return t.add_column(i + 1, "hour", pa.array([hour] * len(t), pa.int32()))


def _days(out: Store) -> list[str]:
    days = []
    for d in out.list_dirs():
        name = posixpath.basename(d)
        if name.startswith("dt="):
            try:
                days.append(valid_date(name[3:]))
            except ModscanError:  # not a partition of ours
                continue
    return days


def read_flags(uri: str, dt: str | None = None) -> Any:
    """Read committed flags into pandas (the recommender's view): partitions with ``_SUCCESS`` only.

    ``dt``: a day ``YYYY-MM-DD`` reads that day: its day partition and each of its hourly ones; an
    hour ``YYYY-MM-DDTHH`` reads that hour only; None reads everything. ``hour`` is null on the rows
    of day partitions. A day that holds both forms (written with ``--allow-mixed-day``) gives the
    rows of both."""
    from pipeline.ingest.storage import open_store

    out = open_store(uri)
    if dt is not None and "T" in dt:
        parts = [valid_partition(dt)] if is_committed(out, dt) else []
    else:
        parts = [p for d in _days(out) if dt is None or d == dt for p in committed_partitions(out, d)]
    frames = [_read_partition(out, p).cast(FLAG_SCHEMA).to_pandas() for p in parts]
    import pandas as pd

    return pd.concat(frames, ignore_index=True) if frames else FLAG_SCHEMA.empty_table().to_pandas()
