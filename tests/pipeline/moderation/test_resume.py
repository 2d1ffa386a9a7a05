"""Chunked runs that resume (pipeline/moderation/resume.py) and the staging they live in
(pipeline/moderation/staging.py), on local disk without a cluster: chunks, fingerprints, chunk
records, joining a stage, and which staging a cleanup may remove."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.ingest.storage import open_store
from pipeline.moderation import flags as F
from pipeline.moderation import resume as R
from pipeline.moderation import staging as S
from pipeline.schemas import FILE_SCHEMA, error_rows

DAY = "2026-07-01"


def _fp(**changes) -> R.Fingerprint:
    base = {"partition": DAY, "input_plan": "p" * 64, "keys": 10, "chunk_size": 4, "model_version": "m1",
            "gallery_version": "v000001", "settings": "s" * 64}
    return R.Fingerprint(**{**base, **changes})


def test_chunks_are_sorted_key_ranges_and_every_key_finds_its_own() -> None:
    keys = [f"k{i:03d}" for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)]
    c = R.Chunks.of_keys(keys, 4)
    assert c == R.Chunks.of_keys(list(reversed(keys)), 4)  # the order of the listing does not matter
    assert len(c) == 3 and c.counts == (4, 4, 2) and c.firsts == ("k000", "k004", "k008")
    members = {i: sorted(k for k in keys if c.of(k) == i) for i in range(3)}
    assert members == {0: ["k000", "k001", "k002", "k003"], 1: ["k004", "k005", "k006", "k007"], 2: ["k008", "k009"]}
    assert list(c.column(np.asarray(["k009", "k000"], object))) == [2, 0]
    assert len(R.Chunks.of_keys([], 4)) == 0


def test_a_fingerprint_says_in_one_line_what_changed() -> None:
    old = _fp()
    assert _fp().digest == old.digest
    why = _fp(gallery_version="v000002", model_version="m2").differences(old)
    assert why == "the model changed (m2, was m1); the pinned gallery version changed (v000002, was v000001)"
    assert "\n" not in why
    assert _fp(input_plan="q" * 64, keys=11).differences(old) == "the input plan changed (11 keys, was 10)"
    assert _fp(chunk_size=8).differences(old) == "chunk_size changed (8, was 4)"
    assert _fp(settings="t" * 64).differences(old) == "the job settings that shape decisions changed"
    assert R.plan_digest("prefix", ["a"], ["/x/a"], []) != R.plan_digest("prefix", ["a"], ["/y/a"], [])


def _record(out, stage: str, run: str, chunk: int, keys: list[str]) -> R.ChunkRecord:
    """Stage a chunk's rows as a run's attempt would, and record it."""
    folder = S.attempt_key(stage, run)
    key = F.write_staged(out, run, f"c{chunk:06d}-x.parquet",
                         error_rows(keys, ["read_error"] * len(keys), ["gone"] * len(keys), model_version="m1",
                                    gallery_version="v000001", run_id=run), folder=folder)
    rec = R.ChunkRecord(chunk, run, len(keys), (key,))
    out.write_text(R.record_key(stage, chunk), rec.to_json())
    return rec


def test_a_rerun_joins_the_stage_of_its_fingerprint_and_skips_its_recorded_chunks(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    killed, rerun, other = "20260701T000001-aaaaaaaa", "20260701T000002-bbbbbbbb", "20260701T000003-cccccccc"
    first = R.open_stage(out, _fp(), killed)
    assert first.done == {} and first.started_over is None and first.stage.startswith("20260701-")
    _record(out, first.stage, killed, 0, ["a", "b", "c", "d"])
    _record(out, first.stage, killed, 2, ["i", "j"])
    joined = R.open_stage(out, _fp(), rerun)
    assert joined.stage == first.stage and sorted(joined.done) == [0, 2] and joined.started_over is None
    assert out.exists(f"{S.attempt_key(first.stage, rerun)}/started")
    # a record whose files are gone (a cleanup, a commit that removed them) is a chunk to run again
    out.delete_file(joined.done[2].files[0])
    assert sorted(R.read_records(out, first.stage)) == [0]
    # another gallery version: a new stage, and the reason, in one line
    moved = R.open_stage(out, _fp(gallery_version="v000002"), other)
    assert moved.stage != first.stage and moved.done == {}
    assert moved.started_over == "the pinned gallery version changed (v000002, was v000001)"


def test_restart_starts_over_and_a_void_stage_is_never_resumed(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    a, b, c = "20260701T000001-aaaaaaaa", "20260701T000002-bbbbbbbb", "20260701T000003-cccccccc"
    first = R.open_stage(out, _fp(), a)
    _record(out, first.stage, a, 0, ["a"])
    fresh = R.open_stage(out, _fp(), b, restart=True)
    assert fresh.stage != first.stage and fresh.done == {} and fresh.started_over == "--restart" and fresh.restart
    out.write_text(f"{S.stage_key(first.stage)}/{S.VOID}", a)  # published by a
    assert R.open_stage(out, _fp(), c).stage == fresh.stage  # the live one of the same fingerprint


class _Echo:
    """A stand-in stage: one error row per input row, and a log of the batches it got."""

    calls: list[list[str]] = []

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __call__(self, batch):
        keys = [str(k) for k in batch["image_key"]]
        _Echo.calls.append(keys)
        return error_rows(keys, ["read_error"] * len(keys), ["x"] * len(keys), model_version="m1",
                          gallery_version="v000001", run_id=self.run_id)


def test_the_chunked_stage_writes_one_file_per_chunk_of_a_batch_named_by_its_keys(tmp_path) -> None:
    data = tmp_path / "data"
    stage = R.chunked(_Echo)(run_id="r1", chunk_data_uri=str(data))
    _Echo.calls = []
    batch = {"image_key": np.asarray(["a", "b", "e", "f", "c"], object), "chunk": np.asarray([0, 0, 1, 1, 0])}
    out = stage(batch)
    assert _Echo.calls == [["a", "b", "c"], ["e", "f"]]  # each chunk's rows go through the stage on their own
    assert list(out["chunk"]) == [0, 1] and list(out["rows"]) == [3, 2]
    assert sorted(p.name for p in data.iterdir()) == sorted(out["file"])
    assert out["file"][0] == R.chunk_file_name(0, ["a", "b", "c"]) and out["file"][0].startswith("c000000-")
    t = pq.read_table(data / out["file"][1])
    assert t.schema.equals(FILE_SCHEMA) and t.column("image_key").to_pylist() == ["e", "f"]
    assert list(stage(batch)["file"]) == list(out["file"])  # a retried batch rewrites the same files


def test_progress_records_a_chunk_once_every_key_has_its_row_and_only_while_owner(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    owner = {"ok": True}

    def check() -> None:
        if not owner["ok"]:
            raise F.PartitionTakenError("taken")

    p = R.ChunkProgress(out, "st", "r1", {0: 4, 1: 2}, check)
    assert p.add(0, "f1.parquet", 2) is None and p.add(0, "f1.parquet", 2) is None  # a retry: counted once
    rec = p.add(0, "f2.parquet", 2)
    assert rec is not None and rec.files == ("_staging/st/r1/data/f1.parquet", "_staging/st/r1/data/f2.parquet")
    assert json.loads(out.read_text(R.record_key("st", 0)))["rows"] == 4
    with pytest.raises(F.CommitError, match="chunk 1 got 3 rows for 2 keys"):
        p.add(1, "g.parquet", 3)
    owner["ok"] = False
    with pytest.raises(F.PartitionTakenError):
        p.add(1, "g.parquet", 2)
    assert not out.exists(R.record_key("st", 1)) and p.unfinished() == [1]


def _claimed_stage(out, run: str, fp: R.Fingerprint) -> R.Resume:
    F.claim_partition(out, fp.partition, run)
    return R.open_stage(out, fp, run)


def test_after_a_commit_the_owner_removes_every_staging_of_its_partition(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    old, new = "20260701T000001-aaaaaaaa", "20260701T000002-bbbbbbbb"
    superseded = _claimed_stage(out, old, _fp(gallery_version="v000000"))
    mine = _claimed_stage(out, new, _fp())
    _record(out, mine.stage, new, 0, ["a"])
    S.mark_started(out, S.attempt_key("20260702-000000000000-dddddddd", "20260702T000001-dddddddd"))  # another day
    F.clean_up_after_commit(out, DAY, new, mine.stage)
    left = {f.name for f in S.staged_folders(out)}
    assert left == {"20260702-000000000000-dddddddd"} and superseded.stage not in left


def test_a_cleanup_keeps_the_stage_a_newer_owner_may_be_resuming(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    a, b = "20260701T000001-aaaaaaaa", "20260701T000002-bbbbbbbb"
    st = _claimed_stage(out, a, _fp())
    _record(out, st.stage, a, 0, ["a"])
    F.claim_partition(out, DAY, b)  # b claimed: it may be about to join a's stage
    assert S.clean_partition(out, DAY, committer=a) == []
    R.open_stage(out, _fp(), b)  # b joined: a's stage is b's too
    assert S.clean_partition(out, DAY, committer=a) == []
    F.remove_own_attempt(out, st.stage, a, S.attempt_key(st.stage, a))  # a failed: its recorded chunk stays
    assert R.read_records(out, st.stage)[0].run_id == a
    # the signatures of a's chunks too: the flags' chunk records decide, not the signature root's
    sig = open_store(str(tmp_path / "flags" / "_signatures"), create=True)
    for run in (a, "20260701T000003-cccccccc"):
        S.mark_started(sig, S.attempt_key(st.stage, run))
        F.remove_own_attempt(sig, st.stage, run, S.attempt_key(st.stage, run), records=out)
    assert [r for r, _ in S.attempts(sig, S.staged_folders(sig)[0])] == [a]


def test_the_sweep_keeps_a_killed_owners_stage_and_removes_what_nothing_can_use(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    killed = _claimed_stage(out, "20260701T000001-aaaaaaaa", _fp())
    lost = _claimed_stage(out, "20260703T000001-bbbbbbbb", _fp(partition="2026-07-03", gallery_version="v0"))
    winner = _claimed_stage(out, "20260703T000002-cccccccc", _fp(partition="2026-07-03"))
    done = _claimed_stage(out, "20260704T000001-dddddddd", _fp(partition="2026-07-04"))
    out.write_text(f"{S.stage_key(done.stage)}/{S.VOID}", "x")
    for r in (killed, lost, winner):
        for _run, folder in S.attempts(out, next(f for f in S.staged_folders(out) if f.name == r.stage)):
            out.write_text(f"{folder}/started", str(time.time() - 7200))  # two hours ago
    gone = S.sweep_staging(out, keep="20260705T000000-eeeeeeee")
    assert sorted(gone) == sorted([lost.stage, done.stage])
    assert {f.name for f in S.staged_folders(out)} == {killed.stage, winner.stage}  # owners' stages stay
