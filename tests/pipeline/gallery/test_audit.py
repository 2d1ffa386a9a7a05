"""pipeline/gallery/audit.py: the append-only audit log survives add, remove and review apply, is
never rewritten, and a rewritten record is caught by the chain (``modscan gallery info``)."""

from __future__ import annotations

import json
import os

from operator_world import decisions_csv

from pipeline import gallery as G
from pipeline.gallery import audit as A


def test_audit_log_survives_add_remove_apply_and_is_never_rewritten(ops_world, fresh, capsys) -> None:
    from jobs.cli import main
    from pipeline.ingest.storage import open_store
    from pipeline.ops.review_decisions import apply_decisions

    store = open_store(str(fresh))

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {k: (store.read_bytes(k), os.stat(store.path(k)).st_mtime_ns) for k in A.list_keys(store)}

    snaps = [snapshot()]
    G.add(store, "spam", [str(ops_world["uploads"] / "other-coins.jpg")], ops_world["card"], ops_world["extract"],
          who="ops-anna", note="coins are a spam template now")
    snaps.append(snapshot())
    G.remove(store, ops_world["card"], ids=[ops_world["ref"]["astronaut"]], who="ops-ben", note="licence expired")
    snaps.append(snapshot())
    apply_decisions(store, decisions_csv(f",{ops_world['ref']['plain-gradient']},disable_reference,rita,over-broad,,2099-06-01,run-9"),
                    "DECISIONS.csv", ops_world["card"], ops_world["extract"], who="ops-cli")
    snaps.append(snapshot())
    for older, newer in zip(snaps, snaps[1:]):
        assert len(newer) == len(older) + 1                     # one record per operation
        assert all(newer[k] == v for k, v in older.items())     # old records: same bytes, never touched
    recs = A.read_log(store)
    assert [r.action for r in recs] == ["build", "add", "remove", "review_apply"]
    assert [r.version for r in recs] == G.list_versions(store)
    assert [r.parent for r in recs[1:]] == [r.version for r in recs[:-1]]
    assert (recs[1].who, recs[1].note, recs[1].details["added"]) == ("ops-anna", "coins are a spam template now", 1)
    assert recs[2].details["ids"] == [ops_world["ref"]["astronaut"]]
    ch = recs[3].changes[0]
    assert (recs[3].who, recs[3].run_id, ch["reviewer"], ch["note"], ch["disabled_until"]) == (
        "ops-cli", "run-9", "rita", "over-broad", "2099-06-01T00:00:00+00:00")
    assert A.verify_log(store) == []
    assert main(["gallery", "info", str(fresh)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["audit"]["records"] == 4 and info["audit"]["chain_problems"] == []
    assert info["disabled_references"][0]["in_force"] is True
    assert info["disabled_references"][0]["until"] == "2099-06-01T00:00:00+00:00"
    last = info["audit"]["recent"][-1]
    assert (last["who"], last["note"], last["decision"], last["disabled_until"]) == (
        "rita", "over-broad", "disable_reference", "2099-06-01T00:00:00+00:00")
    # a rewritten record is detected by the chain
    k = A.list_keys(store)[1]
    store.write_text(k, store.read_text(k).replace("ops-anna", "someone-else"))
    assert any("prev_sha256 does not match" in p for p in A.verify_log(store))
