"""pipeline/ops/ (explain, review_decisions, review_page), with pipeline/moderation/floodguard.py and
pipeline/gallery/audit.py: the operator's tools against one real gallery built with the shipped model
(one module-scoped world, so they share a file).

``modscan lookup`` (same decisions as the job's Moderator, the rule that decided), ``modscan review
apply`` (validation with line numbers, one version, vectors reused, disabled references), the
append-only audit log, the flood guard on staged files, the reviewer-safe review page (rendered by
headless Chromium), and the same tools on a moto S3 server.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import photo
from PIL import Image

from models.augment import apply_named
from pipeline import gallery as G
from pipeline.gallery import audit as A
from pipeline.moderation import flags as F

DAY = "2026-04-02"
N_PLAIN = 8           # plain gradient uploads: all match the over-broad near-uniform reference
FLOOD_LIMIT = 5       # max_matches_per_reference in these tests (< N_PLAIN)


def _jpeg(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", quality=92)


def _near_blank(rng: np.random.Generator, h: int, w: int, level: np.ndarray, gradient: float = 0.0,
                noise: float = 2.5) -> Image.Image:
    a = np.ones((h, w, 3), np.float32) * level + rng.normal(0, noise, (h, w, 3)) + np.linspace(0, gradient, w)[None, :, None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_world(root: Path) -> dict[str, Path]:
    """Reference folders, a banks list and one day of uploads (local files)."""
    rng = np.random.default_rng(0)
    r = random.Random(3)
    refs = root / "refs"
    for n in ("astronaut", "rocket", "camera"):
        _jpeg(Image.fromarray(photo(n)), refs / "violence" / f"{n}.jpg")
    # the over-broad reference: a plain light-grey gradient someone added to a sensitive bank (varied
    # enough to pass the decoder's low-content check, generic enough to match every plain background)
    _jpeg(_near_blank(rng, 300, 400, np.array([210, 210, 210]), 60.0, 4.0), refs / "violence" / "plain-gradient.jpg")
    _jpeg(Image.fromarray(photo("chelsea")), refs / "spam" / "chelsea.jpg")
    _jpeg(Image.fromarray(photo("camera")), refs / "fp" / "camera.jpg")   # known false positive: allow wins
    up = root / "uploads"
    for i in range(N_PLAIN):  # plain grey gradient backgrounds (wallpapers, text-post backgrounds): not low content
        _jpeg(_near_blank(rng, 240 + 10 * i, 320, np.full(3, rng.uniform(200, 220)), 50.0 + 3 * i, 4.0), up / f"plain-{i:02d}.jpg")
    _jpeg(_near_blank(rng, 200, 300, np.array([120, 160, 200])), up / "flat.jpg")  # low content: never searched
    _jpeg(apply_named(Image.fromarray(photo("rocket")), ["flip"], r), up / "copy-rocket-flip.jpg")
    _jpeg(apply_named(Image.fromarray(photo("chelsea")), ["flip"], r), up / "copy-chelsea-flip.jpg")
    _jpeg(apply_named(Image.fromarray(photo("camera")), ["flip"], r), up / "copy-camera-flip.jpg")
    for n in ("coins", "horse"):
        _jpeg(Image.fromarray(photo(n)), up / f"other-{n}.jpg")
    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, format="JPEG")
    (up / "broken-truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return {"refs": refs, "uploads": up}


def banks_for(refs: str) -> list:
    from pipeline.gallery.banks import Bank

    return [Bank("violence", f"{refs}/violence", "sensitive/violence", "filter"),
            Bank("spam", f"{refs}/spam", "low_quality/spam", "downrank"),
            Bank("fp", f"{refs}/fp", "allow/known_false_positive", "allow")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, shipped_model_dir):
    from models.card import read_card
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    root = tmp_path_factory.mktemp("operator")
    w = make_world(root)
    extract = local_extractor(None)
    card = read_card(None)
    gal = root / "gallery"
    v, stats = G.build(open_store(str(gal), create=True), banks_for(str(w["refs"])), card, extract, n_shards=2,
                       who="builder", note="initial banks")
    assert v == "v000001" and stats["violence"]["added"] == 4 and stats["fp"]["new_membership"] == 1
    e = G.read_content(open_store(str(gal)))[1].entries
    ref = {Path(u).stem: int(i) for i, u in zip(e["id"], e["source_uri"])}
    uploads = sorted(str(p) for p in w["uploads"].iterdir())
    return {**w, "root": root, "gallery": gal, "card": card, "extract": extract, "ref": ref, "uploads_list": uploads}


@pytest.fixture()
def fresh(world, tmp_path):
    """A private copy of the built gallery (tests that write versions must not share one)."""
    dst = tmp_path / "gallery"
    shutil.copytree(world["gallery"], dst)
    return dst


@pytest.fixture(scope="module")
def fx():
    from pipeline.features import FeatureExtractor

    return FeatureExtractor(None)


@pytest.fixture(scope="module")
def moderated(world):
    """The job's own Moderator stage on every upload (no Ray): the flag rows the job would stage."""
    return _moderate_rows(str(world["gallery"]), world["uploads_list"], world["uploads"], "run-local")


def _moderate_rows(gallery_uri: str, uris: list[str], root: Path | str, run_id: str):
    from models.card import read_card
    from pipeline.ingest.decode import DecodeConfig, Decoder
    from pipeline.ingest.fetch import Fetcher
    from pipeline.moderation.moderator import Moderator, RunContext

    card = read_card(None)
    arr = np.asarray(uris, dtype=object)
    dec = Decoder(DecodeConfig(low_res=card.config.low_res, high_res=card.config.high_res))(
        Fetcher()({"image_key": arr, "uri": arr}))
    rel = [u[len(str(root)) + 1:] for u in uris]
    dec["image_key"] = np.asarray(rel, dtype=object)  # the job's keys are relative to the input prefix
    return Moderator(gallery_uri, RunContext(DAY, run_id))(dec)


def _load(gallery: Path | str, fx) -> G.GalleryIndex:
    """Open a gallery the way the job's Moderator does (model id checked, background bank given)."""
    return G.open_gallery(str(gallery), fx)


def _lookup(gallery: Path | str, images: list[str], fx, **kw):
    from pipeline.ops.explain import explain

    return {Path(e.image).name: e for e in explain(images, _load(gallery, fx), fx, **kw).explanations}


# ---------------------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------------------
def test_lookup_makes_the_jobs_decisions_and_names_the_rule(world, moderated, fx) -> None:
    from pipeline.ops.explain import Rule

    ex = _lookup(world["gallery"], world["uploads_list"], fx, top_k=3)
    rows = {Path(r["image_key"]).name: r for r in moderated.to_pylist()}
    assert set(ex) == set(rows) and len(ex) == N_PLAIN + 7
    for name, e in ex.items():  # same decision as the job's Moderator for every upload
        r, d = rows[name], e.decision
        assert (d.status, d.action, d.bank, d.reference_id) == (r["status"], r["action"], r["bank"], r["reference_id"]), name
        assert (d.match_rule, d.inliers) == (r["match_rule"], r["inliers"]), name  # verification: the same rule
        if r["fine_score"] is not None:
            assert d.fine_score == pytest.approx(r["fine_score"], abs=1e-3)
            assert d.fine_score_raw == pytest.approx(r["fine_score_raw"], abs=1e-3)
    ref = world["ref"]
    assert ex["copy-rocket-flip.jpg"].decision.rule == Rule.BANK_THRESHOLD.value
    assert ex["copy-rocket-flip.jpg"].decision.reference_id == ref["rocket"]
    assert ex["copy-chelsea-flip.jpg"].decision.action == "downrank"
    cam = ex["copy-camera-flip.jpg"]
    assert (cam.decision.status, cam.decision.bank, cam.decision.rule) == ("clean", "fp", Rule.ALLOW_LIST_PRECEDENCE.value)
    top = cam.candidates[0]  # camera is in the blocking and the allow bank: both memberships shown, both pass
    assert top.reference_id == ref["camera"] and top.reranked_by_job
    assert {(m.bank, m.verdict) for m in top.memberships} == {("violence", "passes"), ("fp", "passes")}
    assert all(ex[f"plain-{i:02d}.jpg"].decision.reference_id == ref["plain-gradient"] for i in range(N_PLAIN))
    flat = ex["flat.jpg"]
    assert flat.decode.low_content and (flat.decision.status, flat.decision.rule) == ("low_content", Rule.LOW_CONTENT.value)
    assert flat.candidates and not any(c.reranked_by_job for c in flat.candidates)
    broken = ex["broken-truncated.jpg"]
    assert not broken.decode.ok and broken.decode.error_code == "truncated"
    assert broken.decision.rule == Rule.DECODE_ERROR.value and broken.candidates == ()
    coins = ex["other-coins.jpg"]
    assert coins.decision.status == "clean" and coins.decision.rule in (Rule.BELOW_FINE_THRESHOLD.value,
                                                                         Rule.NO_COARSE_CANDIDATE.value)
    # every shown candidate is ranked by coarse score, whatever the coarse threshold
    assert [c.rank for c in coins.candidates] == [1, 2, 3]
    assert coins.candidates[0].coarse_score >= coins.candidates[-1].coarse_score


def test_lookup_rules_for_a_disabled_bank_and_the_coarse_stage(world, fx) -> None:
    from pipeline.ops.explain import Rule, explain

    base = _load(world["gallery"], fx)
    rec = base.manifest.banks["violence"]
    banks = {**base.manifest.banks, "violence": dataclasses.replace(rec, bank=dataclasses.replace(rec.bank, enabled=False))}
    off = G.GalleryIndex(dataclasses.replace(base.manifest, banks=banks), base.cascade, base.entries, base.params,
                         base.background)
    e = explain([str(world["uploads"] / "copy-rocket-flip.jpg")], off, fx).explanations[0]
    assert (e.decision.status, e.decision.rule) == ("clean", Rule.DISABLED_BANK.value)
    assert "violence" in e.decision.detail
    strict = G.GalleryIndex(base.manifest, base.cascade, base.entries,
                            dataclasses.replace(base.params, coarse_threshold=0.999), base.background)
    e = explain([str(world["uploads"] / "other-horse.jpg")], strict, fx).explanations[0]
    assert e.decision.rule == Rule.NO_COARSE_CANDIDATE.value
    assert e.candidates and not any(c.reranked_by_job for c in e.candidates)
    assert {m.verdict for c in e.candidates for m in c.memberships} == {"not_reranked"}


def test_lookup_cli_table_and_json(world, capsys) -> None:
    from jobs.cli import main

    img = str(world["uploads"] / "copy-rocket-flip.jpg")
    assert main(["lookup", img, str(world["uploads"] / "broken-truncated.jpg"), "--gallery", str(world["gallery"]),
                 "--json", "--top-k", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gallery_version"] == "v000001" and len(out["explanations"]) == 2
    assert {b["bank"]: b["threshold"] for b in out["banks"]}["violence"] == pytest.approx(out["default_fine_threshold"])
    first = out["explanations"][0]
    assert first["decision"]["rule"] == "bank_threshold" and len(first["candidates"]) == 4
    assert out["explanations"][1]["decision"]["rule"] == "decode_error"
    assert main(["lookup", img, "--gallery", str(world["gallery"])]) == 0
    table = capsys.readouterr().out
    assert "rule      bank_threshold:" in table and "decision  matched / filter, bank violence" in table


def _ivf_gallery(root: Path, world, fx) -> str:
    """The world's references among the model's 1,000 background features (real photos and
    graphics: a crowd spread over the coarse space), in one IVF shard of 16 lists searched with
    ``nprobe = 1`` by default: which lists a query probes decides its candidates."""
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.index import CoarseIndexSpec
    from pipeline.ingest.storage import open_store

    refs = sorted(str(p) for p in world["refs"].rglob("*.jpg"))
    got = world["extract"](refs)
    bg, n = fx.background, len(fx.background.f128)
    ids = np.arange(n + len(refs), dtype=np.int64)
    coarse = np.vstack([bg.f128, np.stack([g["coarse"] for g in got])]).astype(np.float32)
    fine = np.vstack([bg.f512, np.stack([g["rerank"] for g in got])]).astype(np.float32)
    now = pd.Timestamp.now(tz="UTC")
    entries = pd.DataFrame({"id": ids, "bank": ["crowd"] * n + ["refs"] * len(refs),
                            "category": ["sensitive/crowd"] * n + ["sensitive/refs"] * len(refs), "action": "filter",
                            "source_uri": [f"bg/{i}" for i in range(n)] + refs,
                            "sha256": [f"{i:064x}" for i in ids], "added_at": now})
    banks = {"crowd": Bank("crowd", "-", "sensitive/crowd", "filter"), "refs": Bank("refs", "-", "sensitive/refs", "filter")}
    store = open_store(str(root), create=True)
    G.write_version(store, G.GalleryContent(ids, coarse, fine, entries, banks), G.VersionModel.from_card(world["card"]),
                    n_shards=1, coarse_spec=CoarseIndexSpec("ivf", ivf_nlist=16, nprobe=1))
    return str(root)


def test_lookup_with_a_job_config_searches_an_ivf_gallery_like_the_job(world, fx, tmp_path, capsys) -> None:
    """``modscan lookup --config`` and the job's Moderator, given the same job TOML (an ``nprobe``
    override, thresholds low enough that every upload is decided by its candidates), get the same
    coarse candidates and make the same decisions; without the override the candidates differ."""
    from dataclasses import replace

    from jobs.cli import main
    from jobs.job_config import JobConfig
    from pipeline.ingest.decode import DecodeConfig, Decoder
    from pipeline.ingest.fetch import Fetcher
    from pipeline.moderation.moderator import Moderator, RunContext

    gallery = _ivf_gallery(tmp_path / "ivf", world, fx)
    toml = tmp_path / "job.toml"
    toml.write_text("[job]\ncoarse_threshold = -1.0\nfine_threshold = -1.0\nrerank_k = 10\ncoarse_nprobe = 16\n")
    cfg = JobConfig.from_toml(str(toml))
    uploads = world["uploads_list"]
    assert main(["lookup", *uploads, "--gallery", gallery, "--config", str(toml), "--top-k", "10", "--json"]) == 0
    report = {e["image"]: e for e in json.loads(capsys.readouterr().out)["explanations"]}

    def job_moderator(nprobe: int | None) -> Moderator:  # the actor the job starts, with the job's kwargs
        return Moderator(gallery, RunContext(DAY, "run-ivf"), overrides=replace(cfg.query_overrides(), nprobe=nprobe),
                         precision=cfg.precision)

    arr = np.asarray(uploads, dtype=object)
    dec = Decoder(DecodeConfig.for_model(world["card"].config, base=cfg.decode))(Fetcher()({"image_key": arr, "uri": arr}))
    searched = np.nonzero(np.asarray(dec["ok"], bool) & ~np.asarray(dec["low_content"], bool))[0]
    assert len(searched) >= 10
    mod = job_moderator(cfg.coarse_nprobe)
    rows = mod(dec).to_pylist()
    xq = mod.fx.query_coarse(dec["low"][searched])
    hits = mod.gallery.coarse_hits(xq)
    for j, i in enumerate(searched):
        e = report[uploads[i]]
        assert [c["reference_id"] for c in e["candidates"]] == hits.I[j].tolist(), uploads[i]
        assert all(c["reranked_by_job"] for c in e["candidates"])
        d, r = e["decision"], rows[i]
        assert (d["status"], d["reference_id"]) == (r["status"], r["reference_id"]) == ("matched", d["reference_id"])
        assert d["fine_score"] == pytest.approx(r["fine_score"], abs=1e-3)
    plain = job_moderator(None).gallery.coarse_hits(xq)  # the manifest's nprobe = 1: other candidates
    assert (plain.I != hits.I).any(axis=1).sum() >= 3


# ---------------------------------------------------------------------------------------------
# review apply + audit log
# ---------------------------------------------------------------------------------------------
def _csv(*rows: str) -> str:
    return "image_key,reference_id,decision,reviewer,note,bank,until,run_id\n" + "\n".join(rows) + "\n"


def test_malformed_decisions_are_reported_by_line_and_nothing_is_applied(world, fresh) -> None:
    from pipeline.ingest.storage import open_store
    from pipeline.ops.review_decisions import DecisionFileError, apply_decisions

    store = open_store(str(fresh))
    before = {k: store.read_bytes(k) for k in store.list()}
    rocket = world["ref"]["rocket"]
    text = _csv(
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
        apply_decisions(store, text, "DECISIONS.csv", world["card"], world["extract"], input_uri=str(world["uploads"]))
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
        apply_decisions(store, "decision,reviewer,note,reference_id,colour\n", "DECISIONS.csv", world["card"],
                        world["extract"])
    # an upload that cannot be decoded fails the whole file, with its line
    with pytest.raises(DecisionFileError, match=r"DECISIONS.csv:3: upload .*broken-truncated.jpg cannot be added: truncated"):
        apply_decisions(store, _csv("plain-01.jpg,,false_positive,alice,ok,fp,,",
                                    "broken-truncated.jpg,,confirmed,bob,x,spam,,"),
                        "DECISIONS.csv", world["card"], world["extract"], input_uri=str(world["uploads"]))
    assert {k: store.read_bytes(k) for k in store.list()} == before  # nothing written at all


def test_review_apply_writes_one_version_reusing_vectors(world, fresh, fx) -> None:
    from pipeline.ingest.storage import open_store
    from pipeline.ops.explain import Rule
    from pipeline.ops.review_decisions import apply_decisions

    store = open_store(str(fresh))
    ref, up = world["ref"], world["uploads"]
    _, before = G.read_content(store)
    text = _csv("plain-01.jpg,,false_positive,alice,plain backgrounds are not violence,fp,,run-1",
                f"copy-chelsea-flip.jpg,{ref['chelsea']},confirmed,bob,same spam template,,,run-1",
                f",{ref['rocket']},disable_reference,carol,\"appeal pending, see ticket 12\",,2099-01-01,run-1")
    res = apply_decisions(store, text, "DECISIONS.csv", world["card"], world["extract"], input_uri=str(up))
    assert (res.version, res.parent) == ("v000002", "v000001") and G.list_versions(store) == ["v000001", "v000002"]
    assert res.added == {"fp": {"added": 1, "already_present": 0, "new_membership": 0, "rejected": 0},
                         "spam": {"added": 1, "already_present": 0, "new_membership": 0, "rejected": 0}}
    m, after = G.read_content(store)
    keep = np.isin(after.ids, before.ids)  # stored vectors carried over bit for bit
    np.testing.assert_array_equal(after.coarse[keep][np.argsort(after.ids[keep])], before.coarse[np.argsort(before.ids)])
    assert len(after.ids) == len(before.ids) + 2
    assert m.disabled_references[0].id == ref["rocket"]
    assert m.disabled_references[0].until == "2099-01-01T00:00:00+00:00"
    ex = _lookup(fresh, [str(up / n) for n in ("plain-01.jpg", "copy-chelsea-flip.jpg", "copy-rocket-flip.jpg",
                                               "plain-03.jpg")], fx)
    assert (ex["plain-01.jpg"].decision.rule, ex["plain-01.jpg"].decision.bank) == (Rule.ALLOW_LIST_PRECEDENCE.value, "fp")
    ch = ex["copy-chelsea-flip.jpg"].decision  # now matches its own bytes in the spam bank
    assert ch.bank == "spam" and ch.reference_id not in ref.values() and ch.fine_score_raw > 0.99
    rk = ex["copy-rocket-flip.jpg"].decision
    assert (rk.status, rk.rule) == ("clean", Rule.DISABLED_REFERENCE.value) and "appeal pending" in rk.detail
    assert ex["plain-03.jpg"].decision.status == "matched"  # the allow entry is one upload, not the whole reference
    # second review: re-enable the rocket, switch off the over-broad reference indefinitely
    res2 = apply_decisions(store, _csv(f",{ref['rocket']},enable_reference,dan,appeal rejected,,,",
                                       f"plain-03.jpg,{ref['plain-gradient']},false_positive,erin,matches every blank photo,,,run-2"),
                           "DECISIONS-2.csv", world["card"], world["extract"], input_uri=str(up))
    assert res2.version == "v000003" and res2.added == {}
    ex = _lookup(fresh, [str(up / "copy-rocket-flip.jpg"), str(up / "plain-05.jpg")], fx)
    assert ex["copy-rocket-flip.jpg"].decision.status == "matched"
    assert ex["plain-05.jpg"].decision.rule == Rule.DISABLED_REFERENCE.value
    assert [d.id for d in G.read_manifest(store).disabled_references] == [ref["plain-gradient"]]


def test_disabled_until_expires(world) -> None:
    import datetime as dt

    from pipeline.ingest.storage import open_store

    m = dataclasses.replace(G.read_manifest(open_store(str(world["gallery"]))), disabled_references=(
        G.DisabledReference(1, "2030-01-01T00:00:00+00:00", "ann", None, "appeal", None),
        G.DisabledReference(2, None, "bob", None, "over-broad", None)))
    assert set(m.disabled_in_force(dt.datetime(2029, 12, 31, 23, 59, tzinfo=dt.UTC))) == {1, 2}
    assert set(m.disabled_in_force(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))) == {2}


def test_audit_log_survives_add_remove_apply_and_is_never_rewritten(world, fresh, capsys) -> None:
    from jobs.cli import main
    from pipeline.ingest.storage import open_store
    from pipeline.ops.review_decisions import apply_decisions

    store = open_store(str(fresh))

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {k: (store.read_bytes(k), os.stat(store.path(k)).st_mtime_ns) for k in A.list_keys(store)}

    snaps = [snapshot()]
    G.add(store, "spam", [str(world["uploads"] / "other-coins.jpg")], world["card"], world["extract"],
          who="ops-anna", note="coins are a spam template now")
    snaps.append(snapshot())
    G.remove(store, world["card"], ids=[world["ref"]["astronaut"]], who="ops-ben", note="licence expired")
    snaps.append(snapshot())
    apply_decisions(store, _csv(f",{world['ref']['plain-gradient']},disable_reference,rita,over-broad,,2099-06-01,run-9"),
                    "DECISIONS.csv", world["card"], world["extract"], who="ops-cli")
    snaps.append(snapshot())
    for older, newer in zip(snaps, snaps[1:]):
        assert len(newer) == len(older) + 1                     # one record per operation
        assert all(newer[k] == v for k, v in older.items())     # old records: same bytes, never touched
    recs = A.read_log(store)
    assert [r.action for r in recs] == ["build", "add", "remove", "review_apply"]
    assert [r.version for r in recs] == G.list_versions(store)
    assert [r.parent for r in recs[1:]] == [r.version for r in recs[:-1]]
    assert (recs[1].who, recs[1].note, recs[1].details["added"]) == ("ops-anna", "coins are a spam template now", 1)
    assert recs[2].details["ids"] == [world["ref"]["astronaut"]]
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


# ---------------------------------------------------------------------------------------------
# flood guard + review page
# ---------------------------------------------------------------------------------------------
def _stage(out, run_id: str, table) -> None:
    """Claim the partition and stage rows the way the job does (several Parquet files under
    _staging/R/data/)."""
    F.claim_partition(out, DAY, run_id)
    for i in (0, 1):  # every other row: the held reference's rows end up in both files
        F.write_staged(out, run_id, f"{i:02d}.parquet", table.take(list(range(i, len(table), 2))))


@pytest.fixture(scope="module")
def committed(world, moderated, tmp_path_factory):
    """Moderator rows staged, flood-guarded, verified and committed; review page written."""
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.floodguard import guard_staged
    from pipeline.ops.review_page import write_review

    out = open_store(str(tmp_path_factory.mktemp("flags")), create=True)
    run_id = "20260402T000000-flood"
    _stage(out, run_id, moderated)
    report = guard_staged(out, run_id, FLOOD_LIMIT)
    counts = F.verify_staged(out, run_id, len(moderated))
    F.commit_partition(out, DAY, run_id, {"run_id": run_id, "counts": counts, "flood_guard": report.to_dict()})
    page = write_review(out, DAY, run_id, str(world["uploads"]), str(world["gallery"]))
    return {"out": out, "report": report, "counts": counts, "page": page, "run_id": run_id}


def test_flood_guard_holds_the_over_broad_reference(world, committed) -> None:
    ref, rep = world["ref"], committed["report"]
    assert [(h.reference_id, h.bank, h.matches, h.held_action) for h in rep.held] == [
        (ref["plain-gradient"], "violence", N_PLAIN, "filter")]
    assert rep.held_rows == N_PLAIN and rep.files_rewritten == 2  # its rows sat in both staged files
    assert rep.matches_per_reference[str(ref["plain-gradient"])] == N_PLAIN
    assert rep.matches_per_reference[str(ref["rocket"])] == 1
    assert rep.matches_per_bank == {"spam": 1, "violence": N_PLAIN + 1} and rep.allowed_per_bank == {"fp": 1}
    df = F.read_flags(committed["out"].uri, DAY)
    held = df[df["action"] == "review"]
    assert sorted(held["image_key"]) == [f"plain-{i:02d}.jpg" for i in range(N_PLAIN)]
    assert (held["status"] == "matched").all() and held["reason"].str.contains(
        f"reference #{ref['plain-gradient']} \\(violence\\) matched {N_PLAIN} uploads").all()
    assert held["reason"].str.contains(f"max_matches_per_reference={FLOOD_LIMIT}; held for review instead of filter").all()
    rocket = df[df["image_key"] == "copy-rocket-flip.jpg"].iloc[0]
    assert rocket["action"] == "filter" and pd.isna(rocket["reason"])  # one match: not held
    assert df.loc[df["action"] != "review", "reason"].isna().all()
    assert committed["counts"]["by_action"]["review"] == N_PLAIN  # the commit's counts see the final rows
    assert F.read_run(committed["out"], DAY)["flood_guard"]["held_rows"] == N_PLAIN


def test_flood_guard_off_and_under_the_limit_changes_nothing(world, moderated, tmp_path) -> None:
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.floodguard import guard_staged

    for limit in (0, N_PLAIN):  # 0: off; N_PLAIN: not *more* than the limit
        out = open_store(str(tmp_path / f"o{limit}"), create=True)
        _stage(out, "r", moderated)
        before = {k: out.read_bytes(k) for k in out.list()}
        rep = guard_staged(out, "r", limit)
        assert rep.held == () and rep.held_rows == 0 and rep.matches_per_bank["violence"] == N_PLAIN + 1
        assert {k: out.read_bytes(k) for k in out.list()} == before


def _page_html(committed) -> str:
    return committed["out"].read_text(f"_reviews/dt={DAY}/review-{committed['run_id']}.html")


def test_review_page_groups_by_reference_blurs_sensitive_and_shouts_about_held(world, committed) -> None:
    import re

    page = _page_html(committed)
    ref = world["ref"]
    assert 'class="held"' in page and "HELD by the flood guard" in page
    assert f"reference <code>#{ref['plain-gradient']}</code> (violence): <b>{N_PLAIN}</b> uploads held" in page
    # grouped by reference, busiest first, with counts
    groups = re.findall(r"ref #(\d+)</small></td><td>([a-z]+)<br><small>[^<]*</small></td><td><b>(\d+)</b>", page)
    assert groups[0] == (str(ref["plain-gradient"]), "violence", str(N_PLAIN))
    assert (str(ref["rocket"]), "violence", "1") in groups and (str(ref["chelsea"]), "spam", "1") in groups
    # sensitive thumbnails are wrapped in the click-to-reveal blur; spam ones are not
    spam_row = next(r for r in page.split("<tr>") if f"ref #{ref['chelsea']}</small>" in r)
    rocket_row = next(r for r in page.split("<tr>") if f"ref #{ref['rocket']}</small>" in r)
    assert 'class="sens"' in rocket_row and 'class="sens"' not in spam_row
    assert "filter:blur(14px) grayscale(1)" in page and "input:checked~img{filter:none}" in page
    # offline: nothing fetched from anywhere, every image inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "url(" not in page
    assert page.count('src="data:image/jpeg;base64,') >= N_PLAIN


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_path: Path, png: Path, size: tuple[int, int] = (1280, 1400)) -> Image.Image:
    """Render a local HTML file with headless Chromium, with a dead proxy so nothing could load from the
    network, and return the screenshot."""
    profile = png.parent / f".profile-{png.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--proxy-server=http://127.0.0.1:9", f"--window-size={size[0]},{size[1]}",
           f"--screenshot={png}", html_path.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return Image.open(png).convert("RGB")


def _reveal_stats(blurred: Image.Image, revealed: Image.Image) -> dict[str, float]:
    """Compare two screenshots of the same page where they differ (the sensitive thumbnails):
    area share and colour spread (max - min channel) in each."""
    b, r = (np.asarray(im, np.int16) for im in (blurred, revealed))
    diff = np.abs(b - r).max(axis=2) > 16
    spread = lambda a: float((a.max(axis=2) - a.min(axis=2))[diff].mean())
    return {"area": float(diff.mean()), "spread_blurred": spread(b), "spread_revealed": spread(r)}


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: apt-get install chromium)")
def test_review_page_in_headless_chromium_is_blurred_until_clicked(committed, tmp_path) -> None:
    page = _page_html(committed)
    blurred_html, revealed_html = tmp_path / "review.html", tmp_path / "revealed.html"
    blurred_html.write_text(page)
    # the state after clicking every sensitive thumbnail: each reveal checkbox ticked
    revealed_html.write_text(page.replace('<input type="checkbox">', '<input type="checkbox" checked>'))
    blurred = screenshot(blurred_html, tmp_path / "blurred.png")
    revealed = screenshot(revealed_html, tmp_path / "revealed.png")
    st = _reveal_stats(blurred, revealed)
    # a click changes a good part of the page: the sensitive thumbnails (the spam cat is the same in both)
    assert st["area"] > 0.05, st
    # by default the browser shows them grey (the blur and the grey come from the same CSS rule);
    # ticked, in colour
    assert st["spread_blurred"] < 2 and st["spread_revealed"] > 5, st


# ---------------------------------------------------------------------------------------------
# the same tools on a real S3 endpoint (moto server)
# ---------------------------------------------------------------------------------------------
def test_tools_against_a_gallery_and_flags_on_s3(world, s3_server, capsys) -> None:
    import boto3

    from jobs.cli import main
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.floodguard import guard_staged
    from pipeline.ops.review_page import write_review

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for b in ("gal", "uploads", "flags", "reviews"):
        s3.create_bucket(Bucket=b)
    for p in world["uploads"].iterdir():
        s3.put_object(Bucket="uploads", Key=f"{DAY}/{p.name}", Body=p.read_bytes())
    gal_uri, up_uri = "s3://gal/main", f"s3://uploads/{DAY}"
    G.build(open_store(gal_uri), banks_for(str(world["refs"])), world["card"], world["extract"], n_shards=2)
    ref = world["ref"]  # same banks, same order: same ids as the local gallery
    # lookup: an S3 upload against the S3 gallery
    assert main(["lookup", f"{up_uri}/copy-rocket-flip.jpg", "--gallery", gal_uri, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["explanations"][0]["decision"]
    assert (d["rule"], d["reference_id"]) == ("bank_threshold", ref["rocket"])
    # flood guard + commit + review page, with staging and output on S3
    out = open_store("s3://flags/out")
    rows = _moderate_rows(gal_uri, [f"{up_uri}/{n}" for n in sorted(os.listdir(world["uploads"]))], up_uri, "r-s3")
    _stage(out, "r-s3", rows)
    rep = guard_staged(out, "r-s3", FLOOD_LIMIT)
    assert [h.reference_id for h in rep.held] == [ref["plain-gradient"]] and rep.held_rows == N_PLAIN
    F.commit_partition(out, DAY, "r-s3", {"counts": F.verify_staged(out, "r-s3", len(rows))})
    df = F.read_flags("s3://flags/out", DAY)
    assert int((df["action"] == "review").sum()) == N_PLAIN
    page_uri = write_review(out, DAY, "r-s3", up_uri, gal_uri)
    page = out.read_text(page_uri[len("s3://flags/out/"):])
    assert "HELD by the flood guard" in page and 'class="sens"' in page
    # review apply: decisions file on S3, relative keys under the run's input
    s3.put_object(Bucket="reviews", Key="2026-04-02.csv", Body=_csv(
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


# ---------------------------------------------------------------------------------------------
# the real job on a local Ray cluster: flood guard, _run.json, summary, metrics
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_job_holds_floods_and_writes_metrics(world, ray_local, tmp_path) -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from pushgateway_stub import pushgateway

    from jobs.job_config import JobConfig
    from jobs.run import moderate, summary
    from pipeline.ingest.storage import open_store

    with pushgateway() as gw:
        cfg = JobConfig(batch_size=8, max_matches_per_reference=FLOOD_LIMIT,
                        metrics_textfile=str(tmp_path / "textfile" / "modscan.prom"), metrics_pushgateway=gw.url)
        info = moderate(str(world["uploads"]), str(world["gallery"]), str(tmp_path / "flags"), DAY, cfg=cfg)
    fg = info["flood_guard"]
    assert [h["reference_id"] for h in fg["held"]] == [world["ref"]["plain-gradient"]] and fg["held_rows"] == N_PLAIN
    assert info["counts"]["by_action"]["review"] == N_PLAIN
    assert "!! HELD by the flood guard" in summary(info)
    assert F.read_run(open_store(str(tmp_path / "flags")), DAY)["flood_guard"]["held_rows"] == N_PLAIN
    text = (tmp_path / "textfile" / "modscan.prom").read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    val = lambda name, **lab: next(s.value for s in fams[name].samples if all(s.labels.get(k) == v for k, v in lab.items()))
    assert val("modscan_run_images") == N_PLAIN + 7
    assert val("modscan_run_rows_by_action", action="review") == N_PLAIN
    assert val("modscan_run_error_rows", error_code="truncated") == 1
    assert val("modscan_run_matches", bank="violence") == N_PLAIN + 1
    assert val("modscan_run_held_references") == 1
    assert val("modscan_last_success_partition_timestamp_seconds") == 1775088000.0  # 2026-04-02T00:00Z
    assert gw.requests == [("PUT", "/metrics/job/modscan", text)]
    assert info["metrics"]["textfile"].endswith("modscan.prom")

