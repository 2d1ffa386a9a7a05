"""Staging: where runs write before a commit, and which staging may be removed, by whom, when.

Everything staged lives under ``O/_staging/`` (``_``-prefixed: hive readers never see it), in one
of two forms, each named after the partition it belongs to (:func:`~pipeline.moderation.partitions.compact`):

* ``_staging/<run_id>/`` — a run staged in one pass (``modscan retro``): ``started``,
  ``committing``, ``data/``.
* ``_staging/<stage>/`` — the stage of a chunked run (``modscan moderate``), named
  ``<partition>-<fingerprint>-<creator>`` (:func:`stage_name`). It outlives its driver: a rerun of
  the partition with the same fingerprint joins it and skips the chunks recorded there
  (:mod:`pipeline.moderation.resume`). It holds ``plan.json``, ``chunks/cNNNNNN.json``, ``void``
  once its chunks were published, and one attempt folder per run that worked in it:
  ``<stage>/<run_id>/`` with ``started``, ``committing``, ``timings/``, ``data/``.

Who removes what; the live owner's staging, and a stage it may be resuming from, never:

* after a commit, the committer removes every staging of its partition when it still owns the
  partition; when a newer run claimed it meanwhile, only what that run cannot be using;
* a run that failed keeps a stage while it owns the partition (the rerun resumes from it); once
  superseded it removes its own attempt unless a chunk record names it;
* any run sweeps staging of other partitions older than an hour that nothing can use any more.

Removal is robust and best effort: a writer that is still finishing (a superseded run's last Ray
tasks) adds files while a folder is deleted, which is retried; what still cannot be removed is
logged and left for a later sweep. A cleanup never fails a run.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass

from pipeline.ingest.storage import Store
from pipeline.moderation.partitions import compact, conflicts, from_compact, partition_owner

log = logging.getLogger(__name__)

STAGING = "_staging"
CHUNKS = "chunks"
VOID = "void"
PLAN = "plan.json"
COMMIT_STALE_S = 120.0   # a committing heartbeat older than this belongs to a dead run (MODSCAN_COMMIT_STALE_S)


def commit_stale_s(stale_s: float | None = None) -> float:
    """``stale_s`` if given, else ``$MODSCAN_COMMIT_STALE_S``, else :data:`COMMIT_STALE_S`: the age
    at which a committing heartbeat is taken for a dead run's. Raise it where one object-store write
    can take longer than a minute; every run writing one output must use the same value."""
    return stale_s if stale_s is not None else float(os.environ.get("MODSCAN_COMMIT_STALE_S", COMMIT_STALE_S))


def staging_key(run_id: str) -> str:
    """The folder of a run staged in one pass."""
    return f"{STAGING}/{run_id}"


def stage_key(stage: str) -> str:
    return f"{STAGING}/{stage}"


def attempt_key(stage: str, run_id: str) -> str:
    """The folder of ``run_id``'s attempt in a chunked run's stage."""
    return f"{STAGING}/{stage}/{run_id}"


def stage_name(part: str, fingerprint: str, run_id: str) -> str:
    """The name of a new stage of ``part`` for ``fingerprint``, created by ``run_id``."""
    return f"{compact(part)}-{fingerprint[:12]}-{run_id.rsplit('-', 1)[-1][:8]}"


@dataclass(frozen=True)
class Staged:
    """One folder under ``_staging``: a chunked run's stage, or a run staged in one pass."""

    name: str
    part: str
    is_stage: bool

    @property
    def key(self) -> str:
        return stage_key(self.name)


def staged_folders(out: Store) -> list[Staged]:
    """Every staging folder under ``out`` whose name starts with a partition (others are not ours)."""
    found = []
    for d in out.list_dirs(STAGING):
        name = posixpath.basename(d)
        part = from_compact(name)
        if part is not None:
            found.append(Staged(name, part, name[len(compact(part))] == "-"))
    return found


def attempts(out: Store, f: Staged) -> list[tuple[str, str]]:
    """(run id, folder) of every run that staged in ``f``."""
    if not f.is_stage:
        return [(f.name, f.key)]
    return [(posixpath.basename(d), d) for d in out.list_dirs(f.key) if posixpath.basename(d) != CHUNKS]


def mark_started(out: Store, folder: str) -> None:
    out.write_text(f"{folder}/started", str(time.time()))


def started_at(out: Store, folder: str) -> float | None:
    """When the run of ``folder`` started staging there (its ``started`` record), None if unknown."""
    try:
        return float(out.read_text(f"{folder}/started")) if out.exists(f"{folder}/started") else None
    except (FileNotFoundError, ValueError):  # removed meanwhile, or not ours
        return None


# --------------------------------------------------------------------------------------------
# Commit heartbeats: who is committing which partition right now
# --------------------------------------------------------------------------------------------
def write_heartbeat(out: Store, folder: str, since: float) -> None:
    """Record that the run of ``folder`` is committing, since ``since`` (refreshed while it copies)."""
    out.write_text(f"{folder}/committing", f"{time.time()} {since}")


def read_heartbeat(out: Store, folder: str) -> tuple[float, float] | None:
    """(seconds since the last refresh, when the commit began) of ``folder``'s run; None if it is not committing."""
    k = f"{folder}/committing"
    try:
        values = [float(v) for v in out.read_text(k).split()] if out.exists(k) else []
    except (FileNotFoundError, ValueError):  # removed between the two calls, or half-written locally
        return None
    return (max(0.0, time.time() - values[0]), values[-1]) if values else None


def clear_heartbeat(out: Store, folder: str) -> None:
    out.delete_file(f"{folder}/committing")


def committing_heartbeat_age(out: Store, run_id: str) -> float | None:
    """Seconds since ``run_id`` (staged in one pass) last reported progress of its commit; None if it is not committing."""
    hb = read_heartbeat(out, staging_key(run_id))
    return hb[0] if hb else None


def _committing(out: Store, folder: str, stale_s: float | None = None) -> bool:
    hb = read_heartbeat(out, folder)
    return hb is not None and hb[0] < commit_stale_s(stale_s)


def wait_for_other_commits(out: Store, part: str, run_id: str, since: float, stale_s: float | None = None) -> None:
    """Return once no run of a partition that conflicts with ``part`` (the same one, or a day and
    one of its hours) that began committing before ``since`` still commits. The earlier commit goes
    first, so two commits never wait for each other; a heartbeat older than ``stale_s`` belongs to
    a killed run (:func:`commit_stale_s`)."""
    stale_s = commit_stale_s(stale_s)
    while True:
        busy = []
        for f in staged_folders(out):
            if not conflicts(f.part, part):
                continue
            for run, folder in attempts(out, f):
                hb = read_heartbeat(out, folder) if run != run_id else None
                if hb is not None and hb[0] < stale_s and (hb[1], run) < (since, run_id):
                    busy.append(run)
        if not busy:
            return
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------
def remove_staging(out: Store, key: str, tries: int = 6) -> None:
    """Delete the staging folder ``key`` and everything under it, robustly: a writer that is still
    finishing can add a file while the folder is deleted, which fails the delete with "Directory
    not empty"; that is retried with a short backoff. Absent is the state asked for. Raises the
    last error when the folder still cannot be removed (a permission error at once)."""
    for i in range(tries):
        try:
            out.delete_dir(key)
            return
        except FileNotFoundError:  # removed by someone else meanwhile
            return
        except OSError as e:
            if isinstance(e, PermissionError) or i == tries - 1:
                raise
            time.sleep(0.05 * 2 ** i)


def removed(out: Store, key: str) -> bool:
    """:func:`remove_staging` for a cleanup: a folder that cannot be removed now is logged and left
    for a later sweep, never an error."""
    try:
        remove_staging(out, key)
        return True
    except OSError:
        log.warning("could not remove staging %s (a writer may still be finishing; a later sweep removes it)",
                    key, exc_info=True)
        return False


def prune(out: Store, key: str) -> None:
    """Remove the folder ``key`` if nothing is left in it. Locally that is ``rmdir``, which refuses a
    folder another run has just written into; on S3 the folder is only the directory marker
    pyarrow leaves behind when the last object under it goes."""
    if out.is_local:
        try:
            os.rmdir(out.path(key))
        except OSError:  # not empty (another run stages), or already gone
            pass
    elif not list(out.list(key)) and not out.list_dirs(key):
        removed(out, key)


def prune_staging(out: Store, stage: str | None = None) -> None:
    """Prune a stage folder (when given), then ``_staging`` itself, where they are empty."""
    if stage is not None:
        prune(out, stage_key(stage))
    prune(out, STAGING)


def _removable(out: Store, f: Staged, keep_run: str | None, placed: bool) -> bool:
    """Whether ``f`` can go while ``keep_run`` (None: nobody) must keep its staging: it holds no
    attempt of ``keep_run``, none of its runs is committing now, and, for a stage, ``keep_run``
    already staged elsewhere (a run between its claim and its first write may be joining it)."""
    runs = attempts(out, f)
    if any(run == keep_run for run, _ in runs) or any(_committing(out, folder) for _, folder in runs):
        return False
    return not (f.is_stage and keep_run is not None and not placed and not out.exists(f"{f.key}/{VOID}"))


def clean_partition(out: Store, part: str, committer: str | None = None) -> list[str]:
    """Remove the staging of partition ``part`` that nothing can use any more. ``committer``: the run
    that has just published it, which removes everything of ``part`` while it still owns it; any
    other caller keeps the live owner's staging and every stage the owner may be resuming from."""
    owner = partition_owner(out, part)
    keep_run = None if owner is None or owner == committer else owner
    folders = [f for f in staged_folders(out) if f.part == part]
    placed = any(run == keep_run for f in folders for run, _ in attempts(out, f))
    gone = []
    for f in folders:
        if _removable(out, f, keep_run, placed) and removed(out, f.key):
            gone.append(f.name)
    return gone


def _last_started(out: Store, f: Staged) -> float | None:
    times = [t for _, folder in attempts(out, f) if (t := started_at(out, folder)) is not None]
    return max(times) if times else None


def sweep_staging(out: Store, older_than_s: float = 3600.0, keep: str | None = None,
                  dt: str | None = None) -> list[str]:
    """Remove staging that nothing can use any more, never the live owner's: with ``dt``, that of
    partition ``dt`` (:func:`clean_partition`, ``keep`` as the committer); and staging of other
    partitions whose newest run started more than ``older_than_s`` ago (a void stage at any
    age). A run that is committing right now, or a long run that still owns its partition, is
    never touched: a killed owner's stage waits for the rerun that resumes from it. -> the
    folders removed."""
    gone = clean_partition(out, dt, committer=keep) if dt is not None else []
    owners: dict[str, str | None] = {}
    for f in staged_folders(out):
        if f.name == keep or f.name in gone or (dt is not None and f.part == dt):
            continue
        if f.part not in owners:
            owners[f.part] = partition_owner(out, f.part)
        void = f.is_stage and out.exists(f"{f.key}/{VOID}")
        started = _last_started(out, f)
        if not void and started is not None and time.time() - started <= older_than_s:
            continue
        folders = [g for g in staged_folders(out) if g.part == f.part]
        placed = any(run == owners[f.part] for g in folders for run, _ in attempts(out, g))
        if (void or _removable(out, f, owners[f.part], placed)) and removed(out, f.key):
            gone.append(f.name)
    return gone


def abandon(out: Store, run_id: str) -> None:
    """Remove the staging of a run staged in one pass after it failed (best effort: the next run
    sweeps what is left, so a failure here is logged, not raised: the run's own failure is the
    one to report)."""
    try:
        remove_staging(out, staging_key(run_id))
        prune_staging(out)
    except Exception:
        log.warning("run %s: could not remove its staging %s (the next run sweeps it)", run_id,
                    staging_key(run_id), exc_info=True)
