"""pipeline/ops/explain.py (``modscan lookup``): the same decisions as the job's Moderator, the rule
that decided, the CLI's table and JSON, and a job config's coarse search (in the shared operator
world of ``operator_world.py``: a real gallery built with the shipped model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from operator_world import DAY, N_PLAIN, lookup, open_index

from pipeline import gallery as G


def test_lookup_makes_the_jobs_decisions_and_names_the_rule(ops_world, moderated, fx) -> None:
    from pipeline.ops.explain import Rule

    ex = lookup(ops_world["gallery"], ops_world["uploads_list"], fx, top_k=3)
    rows = {Path(r["image_key"]).name: r for r in moderated.to_pylist()}
    assert set(ex) == set(rows) and len(ex) == N_PLAIN + 7
    for name, e in ex.items():  # same decision as the job's Moderator for every upload
        r, d = rows[name], e.decision
        assert (d.status, d.action, d.bank, d.reference_id) == (r["status"], r["action"], r["bank"], r["reference_id"]), name
        assert (d.match_rule, d.inliers) == (r["match_rule"], r["inliers"]), name  # verification: the same rule
        if r["fine_score"] is not None:
            assert d.fine_score == pytest.approx(r["fine_score"], abs=1e-3)
            assert d.fine_score_raw == pytest.approx(r["fine_score_raw"], abs=1e-3)
    ref = ops_world["ref"]
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


def test_lookup_rules_for_a_disabled_bank_and_the_coarse_stage(ops_world, fx) -> None:
    from pipeline.ops.explain import Rule, explain

    base = open_index(ops_world["gallery"], fx)
    rec = base.manifest.banks["violence"]
    banks = {**base.manifest.banks, "violence": dataclasses.replace(rec, bank=dataclasses.replace(rec.bank, enabled=False))}
    off = G.GalleryIndex(dataclasses.replace(base.manifest, banks=banks), base.cascade, base.entries, base.params,
                         base.background)
    e = explain([str(ops_world["uploads"] / "copy-rocket-flip.jpg")], off, fx).explanations[0]
    assert (e.decision.status, e.decision.rule) == ("clean", Rule.DISABLED_BANK.value)
    assert "violence" in e.decision.detail
    strict = G.GalleryIndex(base.manifest, base.cascade, base.entries,
                            dataclasses.replace(base.params, coarse_threshold=0.999), base.background)
    e = explain([str(ops_world["uploads"] / "other-horse.jpg")], strict, fx).explanations[0]
    assert e.decision.rule == Rule.NO_COARSE_CANDIDATE.value
    assert e.candidates and not any(c.reranked_by_job for c in e.candidates)
    assert {m.verdict for c in e.candidates for m in c.memberships} == {"not_reranked"}


def test_lookup_cli_table_and_json(ops_world, capsys) -> None:
    from jobs.cli import main

    img = str(ops_world["uploads"] / "copy-rocket-flip.jpg")
    assert main(["lookup", img, str(ops_world["uploads"] / "broken-truncated.jpg"), "--gallery", str(ops_world["gallery"]),
                 "--json", "--top-k", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gallery_version"] == "v000001" and len(out["explanations"]) == 2
    assert {b["bank"]: b["threshold"] for b in out["banks"]}["violence"] == pytest.approx(out["default_fine_threshold"])
    first = out["explanations"][0]
    assert first["decision"]["rule"] == "bank_threshold" and len(first["candidates"]) == 4
    assert out["explanations"][1]["decision"]["rule"] == "decode_error"
    assert main(["lookup", img, "--gallery", str(ops_world["gallery"])]) == 0
    table = capsys.readouterr().out
    assert "rule      bank_threshold:" in table and "decision  matched / filter, bank violence" in table


def _ivf_gallery(root: Path, ops_world, fx) -> str:
    """The ops_world's references among the model's 1,000 background features (real photos and
    graphics: a crowd spread over the coarse space), in one IVF shard of 16 lists searched with
    ``nprobe = 1`` by default: which lists a query probes decides its candidates."""
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.index import CoarseIndexSpec
    from pipeline.ingest.storage import open_store

    refs = sorted(str(p) for p in ops_world["refs"].rglob("*.jpg"))
    got = ops_world["extract"](refs)
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
    G.write_version(store, G.GalleryContent(ids, coarse, fine, entries, banks), G.VersionModel.from_card(ops_world["card"]),
                    n_shards=1, coarse_spec=CoarseIndexSpec("ivf", ivf_nlist=16, nprobe=1))
    return str(root)


def test_lookup_with_a_job_config_searches_an_ivf_gallery_like_the_job(ops_world, fx, tmp_path, capsys) -> None:
    """``modscan lookup --config`` and the job's Moderator, given the same job TOML (an ``nprobe``
    override, thresholds low enough that every upload is decided by its candidates), get the same
    coarse candidates and make the same decisions; without the override the candidates differ."""
    from dataclasses import replace

    from jobs.cli import main
    from jobs.runtime.job_config import JobConfig
    from pipeline.ingest.decode import DecodeConfig, Decoder
    from pipeline.ingest.fetch import Fetcher
    from pipeline.moderation.moderator import Moderator, RunContext

    gallery = _ivf_gallery(tmp_path / "ivf", ops_world, fx)
    toml = tmp_path / "job.toml"
    toml.write_text("[job]\ncoarse_threshold = -1.0\nfine_threshold = -1.0\nrerank_k = 10\ncoarse_nprobe = 16\n")
    cfg = JobConfig.from_toml(str(toml))
    uploads = ops_world["uploads_list"]
    assert main(["lookup", *uploads, "--gallery", gallery, "--config", str(toml), "--top-k", "10", "--json"]) == 0
    report = {e["image"]: e for e in json.loads(capsys.readouterr().out)["explanations"]}

    def job_moderator(nprobe: int | None) -> Moderator:  # the actor the job starts, with the job's kwargs
        return Moderator(gallery, RunContext(DAY, "run-ivf"), overrides=replace(cfg.query_overrides(), nprobe=nprobe),
                         precision=cfg.precision)

    arr = np.asarray(uploads, dtype=object)
    dec = Decoder(DecodeConfig.for_model(ops_world["card"].config, base=cfg.decode))(Fetcher()({"image_key": arr, "uri": arr}))
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
