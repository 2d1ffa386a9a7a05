"""pipeline/ops/review_decisions.py (``modscan review apply``): validation with line numbers and
nothing applied on an error, one version with stored vectors reused, disabled references and their
expiry; and the operator's tools (lookup, flood guard, review page, review apply, audit log) together
against a gallery and flags on a moto S3 server (the shared world of ``operator_world.py``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os

import numpy as np
import pytest
from operator_world import DAY, FLOOD_LIMIT, N_PLAIN, banks_for, decisions_csv, lookup, moderate_rows, stage_rows

from pipeline import gallery as G
from pipeline.gallery import audit as A
from pipeline.moderation import flags as F


def test_malformed_decisions_are_reported_by_line_and_nothing_is_applied(ops_world, fresh) -> None:
    from pipeline.ingest.storage import open_store
    from pipeline.ops.review_decisions import DecisionFileError, apply_decisions

    store = open_store(str(fresh))
    before = {k: store.read_bytes(k) for k in store.list()}
    rocket = ops_world["ref"]["rocket"]
    text = decisions_csv(
        "plain-01.jpg,,false_positive,alice,not violence,fp,,run-1",        # 2: fine on its own
        ",999,disable_reference,bob,gone,,,",                                # 3: unknown reference
        f",{rocket},disable_reference,,no reviewer,,,",                      # 4: empty reviewer
        f",{rocket},delete,carol,x,,,",                                      # 5: unknown decision
        f",{rocket},disable_reference,dan,old,,2020-01-01,",                 # 6: until in the past
        "copy-chelsea-flip.jpg,,confirmed,erin,spam,fp,,",                  # 7: confirmed into an allow bank
        '"../../etc/passwd",,confirmed,frank,"multi\nline note",spam,,',     # 8-9: key escapes --input
        f",{rocket},enable_reference,gina,not disabled,,,",                  # 10: nothing to enable
        "plain-02.jpg,abc,false_positive,hal,x,,,",                          # 11: reference_id not an int
        "only,three,fields")                                                 # 12: short row
    with pytest.raises(DecisionFileError) as e:
        apply_decisions(store, text, "DECISIONS.csv", ops_world["card"], ops_world["extract"], input_uri=str(ops_world["uploads"]))
    msg = str(e.value)
    assert "nothing applied" in msg
    for expected in ("DECISIONS.csv:3: reference #999 is not in the gallery",
                     "DECISIONS.csv:4: reviewer is empty",
                     "DECISIONS.csv:5: decision 'delete' must be one of",
                     "DECISIONS.csv:6: until 2020-01-01 is not in the future",
                     "DECISIONS.csv:7: confirmed adds the upload to a blocking bank; 'fp' is an allow bank",
                     "DECISIONS.csv:8: key escapes its root",
                     f"DECISIONS.csv:10: reference #{rocket} is not disabled",
                     "DECISIONS.csv:11: reference_id 'abc' is not an integer",
                     "DECISIONS.csv:12: 3 fields, the header has 8"):
        assert expected in msg, (expected, msg)
    assert "DECISIONS.csv:2:" not in msg
    with pytest.raises(DecisionFileError, match=r"DECISIONS.csv:1: unknown columns \['colour'\]"):
        apply_decisions(store, "decision,reviewer,note,reference_id,colour\n", "DECISIONS.csv", ops_world["card"],
                        ops_world["extract"])
    # an upload that cannot be decoded fails the whole file, with its line
    with pytest.raises(DecisionFileError, match=r"DECISIONS.csv:3: upload .*broken-truncated.jpg cannot be added: truncated"):
        apply_decisions(store, decisions_csv("plain-01.jpg,,false_positive,alice,ok,fp,,",
                                    "broken-truncated.jpg,,confirmed,bob,x,spam,,"),
                        "DECISIONS.csv", ops_world["card"], ops_world["extract"], input_uri=str(ops_world["uploads"]))
    assert {k: store.read_bytes(k) for k in store.list()} == before  # nothing written at all


def test_review_apply_writes_one_version_reusing_vectors(ops_world, fresh, fx) -> None:
    from pipeline.ingest.storage import open_store
    from pipeline.ops.explain import Rule
    from pipeline.ops.review_decisions import apply_decisions

    store = open_store(str(fresh))
    ref, up = ops_world["ref"], ops_world["uploads"]
    _, before = G.read_content(store)
    text = decisions_csv("plain-01.jpg,,false_positive,alice,plain backgrounds are not violence,fp,,run-1",
                f"copy-chelsea-flip.jpg,{ref['chelsea']},confirmed,bob,same spam template,,,run-1",
                f",{ref['rocket']},disable_reference,carol,\"appeal pending, see ticket 12\",,2099-01-01,run-1")
    res = apply_decisions(store, text, "DECISIONS.csv", ops_world["card"], ops_world["extract"], input_uri=str(up))
    assert (res.version, res.parent) == ("v000002", "v000001") and G.list_versions(store) == ["v000001", "v000002"]
    assert res.added == {"fp": {"added": 1, "already_present": 0, "new_membership": 0, "rejected": 0},
                         "spam": {"added": 1, "already_present": 0, "new_membership": 0, "rejected": 0}}
    m, after = G.read_content(store)
    keep = np.isin(after.ids, before.ids)  # stored vectors carried over bit for bit
    np.testing.assert_array_equal(after.coarse[keep][np.argsort(after.ids[keep])], before.coarse[np.argsort(before.ids)])
    assert len(after.ids) == len(before.ids) + 2
    assert m.disabled_references[0].id == ref["rocket"]
    assert m.disabled_references[0].until == "2099-01-01T00:00:00+00:00"
    ex = lookup(fresh, [str(up / n) for n in ("plain-01.jpg", "copy-chelsea-flip.jpg", "copy-rocket-flip.jpg",
                                               "plain-03.jpg")], fx)
    assert (ex["plain-01.jpg"].decision.rule, ex["plain-01.jpg"].decision.bank) == (Rule.ALLOW_LIST_PRECEDENCE.value, "fp")
    ch = ex["copy-chelsea-flip.jpg"].decision  # now matches its own bytes in the spam bank
    assert ch.bank == "spam" and ch.reference_id not in ref.values() and ch.fine_score_raw > 0.99
    rk = ex["copy-rocket-flip.jpg"].decision
    assert (rk.status, rk.rule) == ("clean", Rule.DISABLED_REFERENCE.value) and "appeal pending" in rk.detail
    assert ex["plain-03.jpg"].decision.status == "matched"  # the allow entry is one upload, not the whole reference
    # second review: re-enable the rocket, switch off the over-broad reference indefinitely
    res2 = apply_decisions(store, decisions_csv(f",{ref['rocket']},enable_reference,dan,appeal rejected,,,",
                                       f"plain-03.jpg,{ref['plain-gradient']},false_positive,erin,matches every blank photo,,,run-2"),
                           "DECISIONS-2.csv", ops_world["card"], ops_world["extract"], input_uri=str(up))
    assert res2.version == "v000003" and res2.added == {}
    ex = lookup(fresh, [str(up / "copy-rocket-flip.jpg"), str(up / "plain-05.jpg")], fx)
    assert ex["copy-rocket-flip.jpg"].decision.status == "matched"
    assert ex["plain-05.jpg"].decision.rule == Rule.DISABLED_REFERENCE.value
    assert [d.id for d in G.read_manifest(store).disabled_references] == [ref["plain-gradient"]]


def test_disabled_until_expires(ops_world) -> None:

    from pipeline.ingest.storage import open_store

    m = dataclasses.replace(G.read_manifest(open_store(str(ops_world["gallery"]))), disabled_references=(
        G.DisabledReference(1, "2030-01-01T00:00:00+00:00", "ann", None, "appeal", None),
        G.DisabledReference(2, None, "bob", None, "over-broad", None)))
    assert set(m.disabled_in_force(dt.datetime(2029, 12, 31, 23, 59, tzinfo=dt.UTC))) == {1, 2}
    assert set(m.disabled_in_force(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))) == {2}


def test_tools_against_a_gallery_and_flags_on_s3(ops_world, s3_server, capsys) -> None:
    import boto3

    from jobs.cli import main
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.floodguard import guard_staged
    from pipeline.ops.review_page import write_review

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for b in ("gal", "uploads", "flags", "reviews"):
        s3.create_bucket(Bucket=b)
    for p in ops_world["uploads"].iterdir():
        s3.put_object(Bucket="uploads", Key=f"{DAY}/{p.name}", Body=p.read_bytes())
    gal_uri, up_uri = "s3://gal/main", f"s3://uploads/{DAY}"
    G.build(open_store(gal_uri), banks_for(str(ops_world["refs"])), ops_world["card"], ops_world["extract"], n_shards=2)
    ref = ops_world["ref"]  # same banks, same order: same ids as the local gallery
    # lookup: an S3 upload against the S3 gallery
    assert main(["lookup", f"{up_uri}/copy-rocket-flip.jpg", "--gallery", gal_uri, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["explanations"][0]["decision"]
    assert (d["rule"], d["reference_id"]) == ("bank_threshold", ref["rocket"])
    # flood guard + commit + review page, with staging and output on S3
    out = open_store("s3://flags/out")
    rows = moderate_rows(gal_uri, [f"{up_uri}/{n}" for n in sorted(os.listdir(ops_world["uploads"]))], up_uri, "r-s3")
    stage_rows(out, "r-s3", rows)
    rep = guard_staged(out, "r-s3", FLOOD_LIMIT)
    assert [h.reference_id for h in rep.held] == [ref["plain-gradient"]] and rep.held_rows == N_PLAIN
    F.commit_partition(out, DAY, "r-s3", {"counts": F.verify_staged(out, "r-s3", len(rows))})
    df = F.read_flags("s3://flags/out", DAY)
    assert int((df["action"] == "review").sum()) == N_PLAIN
    page_uri = write_review(out, DAY, "r-s3", up_uri, gal_uri)
    page = out.read_text(page_uri[len("s3://flags/out/"):])
    assert "HELD by the flood guard" in page and 'class="sens"' in page
    # review apply: decisions file on S3, relative keys under the run's input
    s3.put_object(Bucket="reviews", Key="2026-04-02.csv", Body=decisions_csv(
        f"plain-00.jpg,{ref['plain-gradient']},false_positive,alice,matches blank photos,,,r-s3").encode())
    assert main(["review", "apply", "s3://reviews/2026-04-02.csv", "--gallery", gal_uri, "--input", up_uri,
                 "--who", "ops"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["version"], res["decisions"][0]["effect"]) == ("v000002", "disable")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="gal", Prefix="main/audit/")["Contents"]]
    assert len(keys) == 2 and keys[1].endswith("-v000002-" + keys[1].split("-")[-1])
    assert [r.action for r in A.read_log(open_store(gal_uri))] == ["build", "review_apply"]
    assert A.verify_log(open_store(gal_uri)) == []
    assert main(["gallery", "info", gal_uri]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["disabled_references"][0]["id"] == ref["plain-gradient"] and info["audit"]["recent"][-1]["who"] == "alice"
