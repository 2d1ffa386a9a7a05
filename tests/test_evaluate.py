"""Evaluation harness: deterministic built mode, prepared mode CSV validation, outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import photo
from PIL import Image

from pipeline.evaluate import GroundTruthError, built_benchmark, evaluate, prepared_benchmark

NAMES = ["astronaut", "rocket", "coffee", "camera", "chelsea", "horse", "coins", "clock", "moon", "page",
         "brick", "grass"]


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for n in NAMES:
        Image.fromarray(photo(n)).save(d / f"{n}.jpg", quality=92)
    return d


def test_built_mode_is_deterministic_for_a_seed(photos, tmp_path) -> None:
    a = built_benchmark(str(photos), tmp_path / "a", seed=3)
    b = built_benchmark(str(photos), tmp_path / "b", seed=3)
    c = built_benchmark(str(photos), tmp_path / "c", seed=4)
    assert a.gt == b.gt and a.edits == b.edits and sorted(a.gallery) == sorted(b.gallery)
    for q in a.queries:
        assert a.queries[q].read_bytes() == b.queries[q].read_bytes()
    assert (a.gt, a.edits) != (c.gt, c.edits)
    # references are in the gallery, negatives are not
    assert set(a.gt.values()) <= set(a.gallery)
    negs = [q for q in a.queries if q not in a.gt]
    assert negs and all(q.split("-")[2] not in a.gallery for q in negs)


def test_evaluate_writes_all_outputs(photos, tmp_path, tiny_model_dir) -> None:
    bench = built_benchmark(str(photos), tmp_path / "out", seed=0)
    m = evaluate(bench, tmp_path / "out", str(tiny_model_dir), seed=0)
    for f in ("predictions.parquet", "metrics.json", "report.md", "pr_curve.png"):
        assert (tmp_path / "out" / f).exists(), f
    pred = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert list(pred.columns) == ["query_id", "reference_id", "score", "rank", "stage"]
    assert pred.groupby("query_id")["rank"].max().max() <= 10
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for k in ("cascade", "exhaustive512", "coarse128_only", "pdq"):
        assert 0.0 <= saved[k]["micro_ap"] <= 1.0
    assert saved["thresholds"]["fine"] == m["thresholds"]["fine"]
    th = saved["thresholds"]
    # recall-parity coarse rule: the lowest calibration true-pair coarse score minus the margin
    assert th["coarse_calibration_pairs"] > 0
    assert th["coarse"] == pytest.approx(th["coarse_min_true_pair"] - th["coarse_margin"], abs=2e-4)
    # the cascade searches a subset of what exhaustive search sees: it can never rank better
    assert saved["cascade"]["recall_at_1"] <= saved["exhaustive512"]["recall_at_1"] + 1e-9
    trade = saved["coarse_tradeoff"]
    at_cal = [r for r in trade if r["coarse_threshold"] == th["coarse"]]
    assert at_cal and at_cal[0]["recall_at_1"] == pytest.approx(saved["cascade"]["recall_at_1"], abs=1e-3)
    assert at_cal[0]["survivors"] == pytest.approx(saved["coarse_survivors"]["all_test"], abs=1e-3)
    assert at_cal[0]["recall_at_fine_threshold"] == pytest.approx(saved["operating_point"]["recall"], abs=1e-3)
    surv = [r["survivors"] for r in trade]
    assert surv == sorted(surv, reverse=True)  # higher threshold, fewer high-res passes
    sep = saved["coarse_separation"]
    assert -1.0 <= sep["true_pair_min"] <= sep["true_pair_median"] <= 1.0
    assert "Coarse (128-d) separation" in (tmp_path / "out" / "report.md").read_text()
    assert set(saved["per_edit"]) and "µAP" in (tmp_path / "out" / "report.md").read_text()


def _prepared(tmp_path):
    g, q = tmp_path / "g", tmp_path / "q"
    g.mkdir()
    q.mkdir()
    for n in NAMES[:4]:
        Image.fromarray(photo(n)).save(g / f"{n}.png")
    for i, n in enumerate(NAMES[:2] + NAMES[6:8]):
        Image.fromarray(photo(n)).save(q / f"q{i}.jpg")
    return g, q


def test_prepared_mode_accepts_the_documented_csv(tmp_path) -> None:
    g, q = _prepared(tmp_path)
    (tmp_path / "gt.csv").write_text("query_id,reference_id\nq0,astronaut\nq1,rocket\nq2,\n")
    b = prepared_benchmark(str(g), str(q), str(tmp_path / "gt.csv"))
    assert b.gt == {"q0": "astronaut", "q1": "rocket"}  # q2 empty and q3 absent: negatives
    assert set(b.queries) == {"q0", "q1", "q2", "q3"}


@pytest.mark.parametrize("text,msg", [
    ("query,ref\nq0,astronaut\n", ":1: header"),
    ("query_id,reference_id\nq0,astronaut,extra\n", ":2: expected 2 columns"),
    ("query_id,reference_id\nq0,astronaut\nq0,rocket\n", ":3: query 'q0' listed twice"),
    ("query_id,reference_id\nq9,astronaut\n", ":2: query 'q9' has no image"),
    ("query_id,reference_id\nq0,nosuchref\n", ":2: reference 'nosuchref' has no image"),
])
def test_prepared_mode_rejects_a_malformed_csv(tmp_path, text: str, msg: str) -> None:
    g, q = _prepared(tmp_path)
    (tmp_path / "gt.csv").write_text(text)
    with pytest.raises(GroundTruthError, match=msg.replace("(", r"\(")):
        prepared_benchmark(str(g), str(q), str(tmp_path / "gt.csv"))
