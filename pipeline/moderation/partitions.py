"""Partitions of the flags output and who owns them: a day ``dt=YYYY-MM-DD/`` or an hour
``dt=YYYY-MM-DD/hour=HH/`` (UTC), and the run lock between runs of one partition.

A partition is named by its text everywhere in the code: ``2026-05-07`` (a day) or
``2026-05-07T13`` (13:00-14:00 UTC of that day). :func:`partition_key` turns it into the hive
path, :func:`compact` into the prefix of run ids and staging folders (``20260507``,
``20260507h13``). A day and its hours can both exist; a run refuses to write one form of a date
that already holds the other unless it is asked to (``--allow-mixed-day``): a day-level reader
then reads the rows of both.

Ownership: :func:`claim_partition` writes ``O/_owners/<partition key>`` = run id before the run
stages anything (last writer wins): the newest run of a partition owns it, an older one still
running publishes nothing (:class:`PartitionTakenError`).
"""

from __future__ import annotations

import datetime as _dt
import posixpath
import re

from pipeline.errors import ModscanError, UsageError
from pipeline.ingest.storage import Store

SUCCESS = "_SUCCESS"
RUN_JSON = "_run.json"
OWNERS = "_owners"
HOUR_DIR = "hour="

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_HOUR = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2})")
_COMPACT = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})(?:h([0-9]{2}))?")


class CommitError(ModscanError, RuntimeError):
    """The staged output is incomplete or inconsistent; nothing was published."""


class PartitionTakenError(CommitError):
    """A newer run of the same partition owns it; this run published nothing."""


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


def valid_hour(value: object, what: str = "--hour") -> int:
    """An hour of the day, ``0``-``23`` (``"07"`` and ``7`` alike)."""
    text = str(value)
    if not re.fullmatch(r"[0-9]{1,2}", text) or not 0 <= int(text) <= 23:
        raise UsageError(f"{what} {value!r} is not an hour 00-23")
    return int(text)


def hour_partition(dt: str, hour: object) -> str:
    """The partition of hour ``hour`` of day ``dt``: ``YYYY-MM-DDTHH``."""
    return f"{valid_date(dt)}T{valid_hour(hour):02d}"


def valid_partition(value: object, what: str = "partition") -> str:
    """A day ``YYYY-MM-DD`` or an hour ``YYYY-MM-DDTHH``, checked; -> the same text."""
    m = _HOUR.fullmatch(value) if isinstance(value, str) else None
    if m:
        return hour_partition(valid_date(m.group(1), what), valid_hour(m.group(2), what))
    if isinstance(value, str) and "T" in value:
        raise UsageError(f"{what} {value!r} is not an hour in the form YYYY-MM-DDTHH (e.g. 2026-02-05T13)")
    return valid_date(value, what)


def split_partition(part: str) -> tuple[str, int | None]:
    """``2026-05-07`` -> (``2026-05-07``, None); ``2026-05-07T13`` -> (``2026-05-07``, 13)."""
    part = valid_partition(part)
    dt, _, hour = part.partition("T")
    return dt, (int(hour) if hour else None)


def is_hourly(part: str) -> bool:
    return split_partition(part)[1] is not None


def partition_key(part: str) -> str:
    """The hive path of a partition: ``dt=2026-05-07`` or ``dt=2026-05-07/hour=13``."""
    dt, hour = split_partition(part)
    return f"dt={dt}" if hour is None else f"dt={dt}/{HOUR_DIR}{hour:02d}"


def compact(part: str) -> str:
    """The prefix of run ids and staging folders: ``20260507`` or ``20260507h13``."""
    dt, hour = split_partition(part)
    return dt.replace("-", "") + ("" if hour is None else f"h{hour:02d}")


def from_compact(text: str) -> str | None:
    """The partition a run id or staging folder name starts with (:func:`compact`), else None."""
    m = _COMPACT.match(text)
    if not m or len(text) == m.end() or text[m.end()] not in "T-":
        return None
    part = f"{m.group(1)}-{m.group(2)}-{m.group(3)}" + (f"T{m.group(4)}" if m.group(4) else "")
    try:
        return valid_partition(part)
    except UsageError:  # not a real date: not a name of ours
        return None


def conflicts(a: str, b: str) -> bool:
    """Whether commits of partitions ``a`` and ``b`` touch the same folder: the same partition, or a
    day and one of its hours (the day's commit replaces files in ``dt=D/``, next to ``hour=HH/``)."""
    (da, ha), (db, hb) = split_partition(a), split_partition(b)
    return da == db and (ha == hb or ha is None or hb is None)


def day_range(date_from: str, date_to: str) -> list[str]:
    """Every day from ``date_from`` to ``date_to``, both included (``--from``/``--to`` of ``backfill``
    and ``retro``), each checked by :func:`valid_date`; ``date_to`` before ``date_from`` is a usage error."""
    d0 = _dt.date.fromisoformat(valid_date(date_from, "--from"))
    d1 = _dt.date.fromisoformat(valid_date(date_to, "--to"))
    if d1 < d0:
        raise UsageError(f"--to {date_to} is before --from {date_from}")
    return [(d0 + _dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


def partition_range(p_from: str, p_to: str) -> list[str]:
    """Days (two dates) or hours (two ``YYYY-MM-DDTHH``) from ``p_from`` to ``p_to``, both included."""
    hourly = [isinstance(p, str) and "T" in p for p in (p_from, p_to)]
    if not any(hourly):
        return day_range(p_from, p_to)
    if not all(hourly):
        raise UsageError(f"--from {p_from} and --to {p_to}: give two days (YYYY-MM-DD) or two hours (YYYY-MM-DDTHH)")
    t0 = _dt.datetime.fromisoformat(valid_partition(p_from, "--from") + ":00")
    t1 = _dt.datetime.fromisoformat(valid_partition(p_to, "--to") + ":00")
    if t1 < t0:
        raise UsageError(f"--to {p_to} is before --from {p_from}")
    n = int((t1 - t0).total_seconds() // 3600) + 1
    return [(t0 + _dt.timedelta(hours=i)).strftime("%Y-%m-%dT%H") for i in range(n)]


def previous_hour(now: _dt.datetime | None = None) -> str:
    """The last full hour before ``now`` (UTC): what ``modscan hourly`` moderates by default."""
    now = now or _dt.datetime.now(_dt.UTC)
    return (now.replace(minute=0, second=0, microsecond=0) - _dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H")


def is_committed(out: Store, part: str) -> bool:
    return out.exists(f"{partition_key(part)}/{SUCCESS}")


def hour_partitions(out: Store, dt: str) -> list[str]:
    """The hourly partitions of day ``dt`` that exist under ``out`` (committed or not), in order."""
    hours = []
    for d in out.list_dirs(partition_key(valid_date(dt))):
        name = posixpath.basename(d)
        if name.startswith(HOUR_DIR):
            try:
                hours.append(hour_partition(dt, name[len(HOUR_DIR):]))
            except UsageError:  # not one of ours
                continue
    return sorted(hours)


def committed_partitions(out: Store, dt: str) -> list[str]:
    """What a day-level reader of ``dt`` reads: the day partition and each hour of it, where committed."""
    return [p for p in [valid_date(dt), *hour_partitions(out, dt)] if is_committed(out, p)]


def has_day_files(out: Store, dt: str) -> bool:
    """Whether ``dt=D/`` holds a day partition's own files (not only ``hour=HH/`` folders)."""
    return any(True for _ in out.list(partition_key(valid_date(dt)), recursive=False))


def check_mixed_day(out: Store, part: str, allow: bool) -> None:
    """Refuse to write one form of a date that already holds the other (a day partition next to
    hourly ones), unless ``allow``: a day-level reader (``read_flags(uri, D)``, pandas'
    ``filters=[("dt", "=", D)]``) would read the rows of both."""
    dt, hour = split_partition(part)
    if allow:
        return
    if hour is not None and has_day_files(out, dt):
        raise UsageError(f"dt={dt} already holds a day partition: an hourly partition next to it would be read "
                         f"together with it by day-level readers; pass --allow-mixed-day to write it anyway")
    if hour is None and hour_partitions(out, dt):
        raise UsageError(f"dt={dt} already holds hourly partitions ({', '.join(hour_partitions(out, dt))}): a day "
                         f"partition next to them would be read together with them by day-level readers; pass "
                         f"--allow-mixed-day to write it anyway")


# --------------------------------------------------------------------------------------------
# Ownership of a partition between concurrent runs
# --------------------------------------------------------------------------------------------
def owner_key(part: str) -> str:
    """``_owners/dt=D`` for a day, ``_owners/dt=D_hour=HH`` for an hour: one flat key per partition
    (a day's key cannot also be the folder of its hours' keys on local disk)."""
    return f"{OWNERS}/{partition_key(part).replace('/', '_')}"


def claim_partition(out: Store, part: str, run_id: str) -> None:
    """Make ``run_id`` the owner of ``part``: the newest run of a partition wins (a rerun is the
    operator's latest intent; a killed run must not block it). An S3 PUT is atomic, so the key
    names exactly one run at any time."""
    out.write_text(owner_key(part), run_id + "\n")


def partition_owner(out: Store, part: str) -> str | None:
    k = owner_key(part)
    return (out.read_text(k).strip() or None) if out.exists(k) else None


def taken_error(out: Store, part: str, run_id: str) -> PartitionTakenError | None:
    """The error to raise when another run owns ``part``, else None. A partition nobody claimed (a
    caller that commits without :func:`claim_partition`) is not contended."""
    owner = partition_owner(out, part)
    if owner is None or owner == run_id:
        return None
    return PartitionTakenError(
        f"{partition_key(part)}: run {owner} of the same partition started after run {run_id} and owns "
        f"it now; run {run_id} published nothing")


def check_owner(out: Store, part: str, run_id: str) -> None:
    """Raise :class:`PartitionTakenError` unless ``run_id`` still owns ``part``."""
    err = taken_error(out, part, run_id)
    if err is not None:
        raise err
