"""The commit protocol between runs of one output (pipeline/moderation/flags.py), on local disk, without a
cluster: ownership of a date, what an older run may still do, what a sweep may delete."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from pipeline.ingest.storage import open_store
from pipeline.moderation import flags as F
from pipeline.schemas import error_rows

DAY = "2026-06-01"


def _stage(out, run_id: str, keys: list[str], version: str = "v000001") -> None:
    out.write_text(f"{F.staging_key(run_id)}/started", str(time.time()))
    F.write_staged(out, run_id, "part.parquet", error_rows(keys, ["read_error"] * len(keys), ["gone"] * len(keys),
                                                           model_version="m", gallery_version=version, run_id=run_id))


def test_the_newest_claim_owns_the_date_and_the_older_run_publishes_nothing(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    older, newer = "20260601T000001-aaaa", "20260601T000002-bbbb"
    for run, keys in ((older, ["a", "b"]), (newer, ["a", "b", "c"])):
        F.claim_partition(out, DAY, run)
        _stage(out, run, keys)
    with pytest.raises(F.PartitionTakenError, match=f"run {newer} .* run {older} published nothing"):
        F.commit_partition(out, DAY, older, {"run_id": older})
    assert not out.exists(f"dt={DAY}/_SUCCESS") and not out.exists(f"{F.staging_key(older)}/committing")
    F.verify_staged(out, newer, 3, {"a", "b", "c"}, "v000001")
    F.commit_partition(out, DAY, newer, {"run_id": newer})
    df = pd.read_parquet(tmp_path / "flags" / f"dt={DAY}")
    assert sorted(df["image_key"]) == ["a", "b", "c"] and set(df["run_id"]) == {newer}
    assert not (tmp_path / "flags" / "_staging").exists()  # the older run's staging went with the commit


def test_verify_refuses_wrong_keys_and_mixed_gallery_versions(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    _stage(out, "r1", ["a", "b"])
    with pytest.raises(F.CommitError, match="staged keys differ from the inputs"):
        F.verify_staged(out, "r1", 2, {"a", "c"})
    F.write_staged(out, "r1", "late.parquet", error_rows(["c"], ["read_error"], ["gone"], model_version="m",
                                                         gallery_version="v000002", run_id="r1"))
    with pytest.raises(F.CommitError, match="gallery versions .* pinned v000001"):
        F.verify_staged(out, "r1", 3, {"a", "b", "c"}, "v000001")


def test_a_commit_in_progress_is_waited_for_and_a_stale_one_is_not(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    busy, mine = "20260601T000001-aaaa", "20260601T000002-bbbb"
    _stage(out, busy, ["a"])
    out.write_text(f"{F.staging_key(busy)}/committing", str(time.time() - 1000))  # killed mid-commit
    F.claim_partition(out, DAY, mine)
    _stage(out, mine, ["a"])
    t = time.time()
    F.commit_partition(out, DAY, mine, {"run_id": mine}, stale_s=60)
    assert time.time() - t < 10 and not out.exists(F.staging_key(busy))


def test_sweep_keeps_runs_that_may_be_alive(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    long_owner, dead_loser, fresh = "20260602T000001-aaaa", "20260603T000001-bbbb", "20260604T000001-cccc"
    for run in (long_owner, dead_loser, fresh):
        _stage(out, run, ["a"])
    for run in (long_owner, dead_loser):
        out.write_text(f"{F.staging_key(run)}/started", str(time.time() - 7200))  # two hours ago
    F.claim_partition(out, "2026-06-02", long_owner)       # still owns its date: may be a long run
    F.claim_partition(out, "2026-06-03", "20260603T000009-dddd")  # a newer run of that date exists
    assert F.sweep_staging(out, keep="20260605T000000-eeee") == [dead_loser]
    assert out.exists(F.staging_key(long_owner)) and out.exists(F.staging_key(fresh))


def test_a_superseded_run_still_writing_never_fails_the_owners_commit(tmp_path) -> None:
    """The older run of a date is still finishing (its last Ray tasks write into its staging)
    while the newer one commits and removes that staging: the commit must succeed."""
    import threading

    out = open_store(str(tmp_path / "flags"), create=True)
    older, newer = "20260601T000001-aaaa", "20260601T000002-bbbb"
    for run in (older, newer):
        F.claim_partition(out, DAY, run)
        _stage(out, run, ["a", "b"])
    stop, written = threading.Event(), []
    late = tmp_path / "flags" / "_staging" / older / "data"

    def keep_writing() -> None:  # a straggler: files keep appearing in the older run's staging
        while not stop.is_set():
            late.mkdir(parents=True, exist_ok=True)
            (late / f"late-{len(written)}.parquet").write_bytes(b"x")
            written.append(1)

    th = threading.Thread(target=keep_writing, daemon=True)
    th.start()
    try:
        while len(written) < 50:
            time.sleep(0.001)
        F.commit_partition(out, DAY, newer, {"run_id": newer})
    finally:
        stop.set()
        th.join()
    assert out.exists(f"dt={DAY}/_SUCCESS") and not out.exists(F.staging_key(newer))
    assert sorted(pd.read_parquet(tmp_path / "flags" / f"dt={DAY}")["image_key"]) == ["a", "b"]
    F.sweep_staging(out, keep=newer, dt=DAY)  # what the straggler left is removed by a later sweep
    assert not out.exists(F.staging_key(older))


def test_the_sweep_after_a_commit_never_removes_the_live_owners_staging(tmp_path) -> None:
    """Run A committed the date; run B claimed it meanwhile and is staging: A's cleanup removes
    the superseded run's staging and its own, and keeps B's."""
    out = open_store(str(tmp_path / "flags"), create=True)
    loser, a, b = "20260601T000001-aaaa", "20260601T000002-bbbb", "20260601T000003-cccc"
    for run in (loser, a, b):
        F.claim_partition(out, DAY, run)
        _stage(out, run, ["a"])
    assert F.sweep_staging(out, keep=a, dt=DAY) == [loser, a]
    assert out.exists(F.staging_key(b))


# --------------------------------------------------------------------------------------------
# Best-effort steps that fail leave a trace in the log (they do not raise)
# --------------------------------------------------------------------------------------------
def test_abandon_that_cannot_remove_staging_logs_a_warning(tmp_path, monkeypatch, caplog) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    _stage(out, "r1", ["a"])

    def refuse(key: str) -> None:
        raise PermissionError(f"denied: {key}")

    monkeypatch.setattr(out, "delete_dir", refuse)
    with caplog.at_level("WARNING", logger="pipeline.moderation.staging"):
        F.abandon(out, "r1")  # best effort: never raises over the run's own failure
    (rec,) = [r for r in caplog.records if r.name == "pipeline.moderation.staging"]
    assert rec.levelname == "WARNING" and "run r1: could not remove its staging _staging/r1" in rec.getMessage()
    assert isinstance(rec.exc_info[1], PermissionError)
    assert out.exists(F.staging_key("r1"))


def test_an_unreadable_timing_record_is_left_out_with_a_warning(tmp_path, caplog) -> None:
    import json

    from jobs.runtime.run import sum_timings

    st = open_store(str(tmp_path / "timings"), create=True)
    st.write_text("a.json", json.dumps({"survivors": 3, "decoded": 5, "seconds": {"search": 0.5}}))
    st.write_text("b.json", '{"survivors": 4, "deco')  # half-written by a killed actor
    with caplog.at_level("WARNING", logger="jobs.runtime.run"):
        tot = sum_timings(st)
    assert tot == {"survivors": 3, "decoded": 5, "search": 0.5}
    (rec,) = [r for r in caplog.records if r.name == "jobs.runtime.run"]
    assert "timing record b.json unreadable" in rec.getMessage() and rec.exc_info is not None


def test_day_range_is_inclusive_and_checks_both_dates() -> None:
    from pipeline.errors import UsageError

    assert F.day_range("2028-02-27", "2028-03-01") == ["2028-02-27", "2028-02-28", "2028-02-29", "2028-03-01"]
    assert F.day_range(DAY, DAY) == [DAY]
    with pytest.raises(UsageError, match="--to 2026-05-31 is before --from 2026-06-01"):
        F.day_range(DAY, "2026-05-31")
    for date_from, date_to, flag in (("2026-6-01", DAY, "--from"), (DAY, "2026-06-31", "--to")):
        with pytest.raises(UsageError, match=flag):
            F.day_range(date_from, date_to)


# --------------------------------------------------------------------------------------------
# Partitions: days and hours
# --------------------------------------------------------------------------------------------
def test_partition_names_days_and_hours() -> None:
    import datetime as dt

    from pipeline.errors import UsageError

    assert F.valid_partition("2026-06-01T07") == "2026-06-01T07" and F.valid_partition(DAY) == DAY
    assert F.partition_key("2026-06-01T07") == "dt=2026-06-01/hour=07" and F.partition_key(DAY) == "dt=2026-06-01"
    assert F.compact("2026-06-01T07") == "20260601h07" and F.compact(DAY) == "20260601"
    from pipeline.moderation.partitions import conflicts, from_compact

    assert from_compact("20260601h07T101010-abcd") == "2026-06-01T07" and from_compact("20260601-ab12") == DAY
    assert from_compact("retro-x") is None and from_compact("20261301T000000-a") is None
    for bad in ("2026-06-01T24", "2026-06-01T7", "2026-06-01 07", "2026-06-31T01"):
        with pytest.raises(UsageError):
            F.valid_partition(bad, "--at")
    assert F.partition_range("2026-06-01T22", "2026-06-02T01") == [
        "2026-06-01T22", "2026-06-01T23", "2026-06-02T00", "2026-06-02T01"]
    assert F.partition_range(DAY, "2026-06-02") == [DAY, "2026-06-02"]
    with pytest.raises(UsageError, match="two days .* or two hours"):
        F.partition_range(DAY, "2026-06-01T05")
    assert F.previous_hour(dt.datetime(2026, 6, 2, 0, 14, tzinfo=dt.UTC)) == "2026-06-01T23"
    assert F.owner_key("2026-06-01T07") != F.owner_key(DAY)
    assert conflicts(DAY, "2026-06-01T07") and not conflicts("2026-06-01T06", "2026-06-01T07")


def test_a_day_and_its_hours_are_not_mixed_unless_asked_and_a_mixed_day_reads_both(tmp_path) -> None:
    from pipeline.errors import UsageError
    from pipeline.moderation.partitions import check_mixed_day

    out = open_store(str(tmp_path / "flags"), create=True)
    hour = "2026-06-01T07"
    for part, run, keys in ((hour, "20260601h07T000001-aaaa", ["a", "b"]), ("2026-06-01T08", "20260601h08T000001-bbbb", ["c"])):
        F.claim_partition(out, part, run)
        _stage(out, run, keys)
        F.commit_partition(out, part, run, {"run_id": run})
    with pytest.raises(UsageError, match="dt=2026-06-01 already holds hourly partitions .*--allow-mixed-day"):
        check_mixed_day(out, DAY, allow=False)
    check_mixed_day(out, DAY, allow=True)
    day_run = "20260601T000001-cccc"
    F.claim_partition(out, DAY, day_run)
    _stage(out, day_run, ["a", "d"])  # a day run that read "a" too: a mixed day holds its row twice
    F.commit_partition(out, DAY, day_run, {"run_id": day_run})
    with pytest.raises(UsageError, match="dt=2026-06-01 already holds a day partition"):
        check_mixed_day(out, "2026-06-01T09", allow=False)
    assert out.exists(f"dt={DAY}/_SUCCESS") and out.exists("dt=2026-06-01/hour=07/_SUCCESS")
    df = F.read_flags(out.uri, DAY)
    assert sorted(zip(df["image_key"], df["hour"].fillna(-1).astype(int))) == [
        ("a", -1), ("a", 7), ("b", 7), ("c", 8), ("d", -1)]
    assert sorted(F.read_flags(out.uri, hour)["image_key"]) == ["a", "b"]
    assert len(pd.read_parquet(tmp_path / "flags", filters=[("dt", "=", DAY)])) == 5
