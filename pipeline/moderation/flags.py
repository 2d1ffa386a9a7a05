"""Flags output: staged writes, verification and the atomic commit of one ``dt=`` partition.

Protocol for a run of date D with id R under output root O:

0. :func:`claim_partition` writes ``O/_owners/dt=D`` = R before the run starts (last writer
   wins): the newest run of a date owns its partition. An older run of the same date still
   running fails at commit with :class:`PartitionTakenError` and publishes nothing, so two
   concurrent runs never publish a mixed partition: the later one wins, the other fails clearly.
1. Ray writes Parquet files to ``O/_staging/R/data/`` (``_``-prefixed folders are ignored by
   pyarrow/pandas/DuckDB hive discovery, so readers never see staged rows).
2. :func:`verify_staged` reads back only the key/status columns: one row per input key, no
   duplicates, exactly the expected keys. Any mismatch fails the run *before* anything is visible.
3. :func:`commit_partition` swaps the partition in, while R still owns it and after any run that
   was already committing D has finished (its ``committing`` heartbeat is removed or stale):
   * local disk: ``dt=D`` is renamed away and the staged folder renamed into place (two renames);
     ``_run.json`` is inside before the swap and ``_SUCCESS`` is written last.
   * S3 (no rename): ``_SUCCESS`` is deleted first, old data objects deleted, staged objects
     copied in, then ``_run.json`` and ``_SUCCESS``. Readers that need consistency on S3 read a
     partition only when ``_SUCCESS`` exists (or read exactly the files ``_run.json`` lists).
     A write that fails half-way leaves the partition without ``_SUCCESS``: unpublished, and the
     next run of D replaces it.
4. Staging is removed, with the staging folders of older runs of D (they can no longer commit).
   A killed run leaves only ``_staging/R``: the next run of D removes it, and runs of other dates
   sweep staging folders older than an hour.

A rerun of D therefore *replaces* the partition: rows are never duplicated.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import posixpath
import re
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.errors import ModscanError, UsageError
from pipeline.ingest.storage import Store
from pipeline.schemas import FILE_SCHEMA, FLAG_SCHEMA

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
RUN_JSON = "_run.json"
STAGING = "_staging"
OWNERS = "_owners"
COMMIT_STALE_S = 120.0   # a committing heartbeat older than this belongs to a dead run

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class CommitError(ModscanError, RuntimeError):
    """The staged output is incomplete or inconsistent; nothing was published."""


class PartitionTakenError(CommitError):
    """A newer run of the same date owns the partition; this run published nothing."""


def valid_date(value: object, what: str = "date") -> str:
    """The one date check (``--date``, ``--from``/``--to``, ``nightly``, partitions): strictly
    ``YYYY-MM-DD`` and a real calendar date. ``date.fromisoformat`` alone also accepts
    ``20260205`` and ``2026-W05-4``, which would write a second partition for the same day."""
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise UsageError(f"{what} {value!r} is not a date in the form YYYY-MM-DD (e.g. 2026-02-05)")
    try:
        _dt.date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a real calendar date") from None
    return value


def day_range(date_from: str, date_to: str) -> list[str]:
    """Every day from ``date_from`` to ``date_to``, both included (``--from``/``--to`` of ``backfill``
    and ``retro``), each checked by :func:`valid_date`; ``date_to`` before ``date_from`` is a usage error."""
    d0 = _dt.date.fromisoformat(valid_date(date_from, "--from"))
    d1 = _dt.date.fromisoformat(valid_date(date_to, "--to"))
    if d1 < d0:
        raise UsageError(f"--to {date_to} is before --from {date_from}")
    return [(d0 + _dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


def partition_key(dt: str) -> str:
    return f"dt={valid_date(dt)}"


def staging_key(run_id: str) -> str:
    return f"{STAGING}/{run_id}"


def is_committed(out: Store, dt: str) -> bool:
    return out.exists(f"{partition_key(dt)}/{SUCCESS}")


def read_run(out: Store, dt: str) -> dict[str, Any] | None:
    k = f"{partition_key(dt)}/{RUN_JSON}"
    return json.loads(out.read_text(k)) if out.exists(k) else None


def verify_staged(out: Store, run_id: str, expected_keys: int | None,
                  input_keys: set[str] | None = None, gallery_version: str | None = None) -> dict[str, Any]:
    """Counts from the staged files; raises :class:`CommitError` on duplicates, lost rows, (when
    ``input_keys`` is given) a staged key that is not one of the inputs, or (when
    ``gallery_version`` is given) a row decided with another gallery version."""
    cols = ["image_key", "status", "action", "error_code", "bank"] + (["gallery_version"] if gallery_version else [])
    files, t = read_staged(out, run_id, cols)
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


def read_staged(out: Store, run_id: str, columns: list[str]) -> tuple[list[str], pa.Table]:
    """(file names, ``columns`` of every staged Parquet file of ``run_id``, concatenated): what a
    verification reads back (the flags' and the signatures' alike)."""
    data = out.child(staging_key(run_id) + "/data")
    files = [k for k in data.list() if k.endswith(".parquet")]
    tables = [pq.read_table(data.path(k), columns=columns, filesystem=out.fs) for k in files]
    t = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})
    return files, t


def write_staged(out: Store, run_id: str, name: str, table: pa.Table, schema: pa.Schema = FILE_SCHEMA) -> None:
    """Add a Parquet file of rows written by the driver (not by Ray) to a run's staging, cast to
    ``schema`` (flag rows by default; signatures pass theirs)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table.cast(schema), buf)
    out.write_bytes(f"{staging_key(run_id)}/data/{name}", buf.getvalue().to_pybytes())


def _run_dt(run_id: str) -> str:
    """The compact date a run id starts with (``20260501T...``)."""
    return run_id.split("T", 1)[0]


def _owns_its_date(out: Store, run: str) -> bool:
    """Whether ``run`` (id ``YYYYMMDDT...``) is still the owner of its date: it may be alive."""
    d = _run_dt(run)
    if len(d) != 8 or not d.isdigit():
        return False
    try:
        return partition_owner(out, f"{d[:4]}-{d[4:6]}-{d[6:]}") == run
    except ModscanError:  # not a real date: not a run of ours
        return False


def remove_staging(out: Store, key: str, attempts: int = 6) -> None:
    """Delete the staging folder ``key`` and everything under it, robustly: a writer that is still
    finishing (a superseded run's last Ray tasks, a straggling actor) can add a file while the
    folder is being deleted, which fails the delete with "Directory not empty". That is retried
    with a short backoff; absent is the state asked for. Raises the last error when the folder
    still cannot be removed (a permission error at once)."""
    for i in range(attempts):
        try:
            out.delete_dir(key)
            return
        except FileNotFoundError:  # removed by someone else meanwhile
            return
        except OSError as e:
            if isinstance(e, PermissionError) or i == attempts - 1:
                raise
            time.sleep(0.05 * 2 ** i)


def _removed(out: Store, key: str) -> bool:
    """:func:`remove_staging` for a sweep: a folder that cannot be removed now is logged and left
    for a later sweep, never an error (a cleanup must not fail a run)."""
    try:
        remove_staging(out, key)
        return True
    except OSError:
        log.warning("could not remove staging %s (a writer may still be finishing; a later sweep removes it)",
                    key, exc_info=True)
        return False


def _started(out: Store, run: str) -> float | None:
    """When ``run`` claimed its date (its staging's ``started`` record), None if it has none."""
    try:
        return float(out.read_text(f"{STAGING}/{run}/started")) if out.exists(f"{STAGING}/{run}/started") else None
    except (FileNotFoundError, ValueError):
        return None


def sweep_staging(out: Store, older_than_s: float = 3600.0, keep: str | None = None,
                  dt: str | None = None) -> list[str]:
    """Delete staging folders of runs that can no longer publish, never a live owner's: with
    ``dt`` every run of that date that is not its current owner (called by a run once it
    committed ``dt``: a run claims its date before it stages anything, so a run of ``dt`` that
    does not own it now has been superseded for good), and runs of other dates older than
    ``older_than_s`` that no longer own their date. A run that is committing right now, or a long
    run that still owns its date, is never touched: a killed owner's staging goes when the next
    run of its date commits. Best effort: a folder that cannot be removed now is left for a
    later sweep (:func:`remove_staging`)."""
    removed = []
    owners: dict[str, str | None] = {}
    for d in out.list_dirs(STAGING):
        run = posixpath.basename(d)
        age = committing_heartbeat_age(out, run)
        if run == keep or (age is not None and age < COMMIT_STALE_S):
            continue
        same_dt = dt is not None and _run_dt(run) == dt.replace("-", "")
        if same_dt:
            if dt not in owners:
                owners[dt] = partition_owner(out, dt)
            if owners[dt] == run:  # claimed after the caller committed: the live owner
                continue
        elif _owns_its_date(out, run):
            continue
        started = _started(out, run)
        if (same_dt or started is None or time.time() - started > older_than_s) and _removed(out, f"{STAGING}/{run}"):
            removed.append(run)
    return removed


# --------------------------------------------------------------------------------------------
# Ownership of a partition between concurrent runs of one date
# --------------------------------------------------------------------------------------------
def owner_key(dt: str) -> str:
    return f"{OWNERS}/{partition_key(dt)}"


def claim_partition(out: Store, dt: str, run_id: str) -> None:
    """Make ``run_id`` the owner of ``dt``: the newest run of a date wins (a rerun is the operator's
    latest intent; a killed run must not block it). An S3 PUT is atomic, so the key names exactly
    one run at any time."""
    out.write_text(owner_key(dt), run_id + "\n")


def partition_owner(out: Store, dt: str) -> str | None:
    k = owner_key(dt)
    return (out.read_text(k).strip() or None) if out.exists(k) else None


def taken_error(out: Store, dt: str, run_id: str) -> PartitionTakenError | None:
    """The error to raise when another run owns ``dt``, else None. A date nobody claimed (a caller
    that commits without :func:`claim_partition`) is not contended."""
    owner = partition_owner(out, dt)
    if owner is None or owner == run_id:
        return None
    return PartitionTakenError(
        f"dt={dt}: run {owner} of the same date started after run {run_id} and owns the "
        f"partition now; run {run_id} published nothing")


def check_owner(out: Store, dt: str, run_id: str) -> None:
    """Raise :class:`PartitionTakenError` unless ``run_id`` still owns ``dt``."""
    err = taken_error(out, dt, run_id)
    if err is not None:
        raise err


def _heartbeat(out: Store, run_id: str) -> None:
    out.write_text(f"{staging_key(run_id)}/committing", str(time.time()))


def committing_heartbeat_age(out: Store, run_id: str) -> float | None:
    """Seconds since ``run_id`` last reported progress of its commit; None if it is not committing."""
    k = f"{staging_key(run_id)}/committing"
    try:
        return max(0.0, time.time() - float(out.read_text(k))) if out.exists(k) else None
    except (FileNotFoundError, ValueError):  # removed between the two calls, or half-written locally
        return None


def _wait_for_other_commits(out: Store, dt: str, run_id: str, stale_s: float) -> None:
    """Wait while another run of ``dt`` is committing (it checked ownership before this run
    claimed the date). A heartbeat older than ``stale_s`` belongs to a killed run."""
    prefix = dt.replace("-", "")
    while True:
        busy = []
        for d in out.list_dirs(STAGING):
            run = posixpath.basename(d)
            if run != run_id and _run_dt(run) == prefix:
                age = committing_heartbeat_age(out, run)
                if age is not None and age < stale_s:
                    busy.append(run)
        if not busy:
            return
        time.sleep(0.5)


def _release_staging(out: Store, run_id: str) -> None:
    """Remove a run's own staging, then the ``_staging`` folder itself when nothing else is in it.
    Locally that is ``rmdir``, which refuses a folder another run has just written into; on S3 the
    folder is only the directory marker pyarrow leaves behind."""
    remove_staging(out, staging_key(run_id))
    if out.is_local:
        try:
            os.rmdir(out.path(STAGING))
        except OSError:  # not empty (another run stages), or already gone
            pass
    elif not list(out.list(STAGING)) and not out.list_dirs(STAGING):
        _removed(out, STAGING)  # the S3 directory marker object


def abandon(out: Store, run_id: str) -> None:
    """Remove a run's staging after it failed (best effort: the next run sweeps what is left, so
    a failure here is logged, not raised: the run's own failure is the one to report)."""
    try:
        _release_staging(out, run_id)
    except Exception:
        log.warning("run %s: could not remove its staging %s (the next run sweeps it)", run_id,
                    staging_key(run_id), exc_info=True)


def _clean_up_after_commit(out: Store, dt: str, run_id: str) -> None:
    """After ``run_id`` published ``dt``: remove the staging of the runs of ``dt`` it superseded
    and its own. Never raises: the partition is published, and a folder a superseded run is
    still writing into is left for a later sweep rather than failing the run that committed."""
    try:
        sweep_staging(out, keep=run_id, dt=dt)  # older runs of dt can no longer publish
    except Exception:
        log.warning("run %s: sweeping the staging of superseded runs of dt=%s failed (a later sweep retries)",
                    run_id, dt, exc_info=True)
    abandon(out, run_id)


def wait_for_commits(out: Store, dt: str, run_id: str, stale_s: float = COMMIT_STALE_S) -> None:
    """Return once no other run of ``dt`` is committing (a retro run reads the partition it will
    replace only after this, so it never reads one half-swapped)."""
    _wait_for_other_commits(out, dt, run_id, stale_s)


def commit_partition(out: Store, dt: str, run_id: str, run_info: dict[str, Any],
                     stale_s: float = COMMIT_STALE_S, schema: pa.Schema = FILE_SCHEMA) -> str:
    """Publish the staged files of ``run_id`` as partition ``dt`` (replacing any previous one).
    ``schema``: of the empty file a day without rows gets (flags by default; signatures pass theirs).

    Refuses with :class:`PartitionTakenError` when a newer run of ``dt`` owns the partition.
    """
    part = partition_key(dt)
    stage = staging_key(run_id)
    check_owner(out, dt, run_id)
    _heartbeat(out, run_id)
    _wait_for_other_commits(out, dt, run_id, stale_s)
    try:
        # A newer run that claimed dt before the heartbeat above would wait for this commit; one
        # that claimed after it sees the heartbeat. Either way only one run writes dt at a time.
        check_owner(out, dt, run_id)
    except PartitionTakenError:
        out.delete_file(f"{stage}/committing")
        raise
    files = [k for k in out.child(stage + "/data").list() if k.endswith(".parquet")]
    if not files:
        # A day with no rows still gets one (empty) file: readers then get the schema, and
        # `pd.read_parquet(root, filters=[("dt", "=", D)])` returns an empty frame, not an error.
        write_staged(out, run_id, "empty.parquet", schema.empty_table(), schema)
        files = ["empty.parquet"]
    run_info = {**run_info, "files": [f"part-{run_id}-{i:05d}.parquet" for i in range(len(files))]}
    if out.is_local:
        # Build the complete partition folder in staging, then swap it in with renames.
        newdir = f"{stage}/{part}"
        for i, k in enumerate(files):
            out.move(f"{stage}/data/{k}", f"{newdir}/part-{run_id}-{i:05d}.parquet")
        out.write_text(f"{newdir}/{RUN_JSON}", json.dumps(run_info, indent=2, default=str) + "\n")
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
            _heartbeat(out, run_id)
        for i, k in enumerate(files):
            out.move(f"{stage}/data/{k}", f"{part}/part-{run_id}-{i:05d}.parquet")
            _heartbeat(out, run_id)
        out.write_text(f"{part}/{RUN_JSON}", json.dumps(run_info, indent=2, default=str) + "\n")
        out.write_text(f"{part}/{SUCCESS}", run_id + "\n")
    _clean_up_after_commit(out, dt, run_id)
    return out.full_uri(part)


def read_flags(uri: str, dt: str | None = None) -> Any:
    """Read committed flags into pandas (the recommender's view): partitions with ``_SUCCESS`` only."""
    from pipeline.ingest.storage import open_store

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
