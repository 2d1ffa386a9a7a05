"""pipeline/evaluation/ (benchmark, calibrate, report, evaluate): deterministic built mode, prepared mode CSV validation, outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import photo
from PIL import Image

from pipeline.evaluation.benchmark import GroundTruthError, built_benchmark, prepared_benchmark
from pipeline.evaluation.evaluate import evaluate

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
    bench = built_benchmark(str(photos), tmp_path / "out", seed=0, everyday=10, low_content=4, abstract_refs=2)
    assert sum(k.startswith("everyday/") for k in bench.kinds.values()) == 10
    assert sum(g.startswith("g-abstract-") for g in bench.gallery) == 2
    m = evaluate(bench, tmp_path / "out", str(tiny_model_dir), seed=0)
    for f in ("predictions.parquet", "metrics.json", "report.md", "pr_curve.png"):
        assert (tmp_path / "out" / f).exists(), f
    pred = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert list(pred.columns) == ["query_id", "reference_id", "score", "rank", "stage"]
    assert pred.groupby("query_id")["rank"].max().max() <= 10
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for k in ("cascade", "cascade_raw", "exhaustive512", "coarse128_only", "pdq"):
        assert 0.0 <= saved[k]["micro_ap"] <= 1.0
    assert saved["thresholds"]["fine"] == m["thresholds"]["fine"]
    # low-content uploads are detected by the decoder and never get a prediction
    assert saved["low_content"]["of_low_content_uploads"] == 4 and saved["low_content"]["photo_queries_marked"] == 0
    low_ids = [q for q, k in bench.kinds.items() if k.startswith("low_content/")]
    assert not pred["query_id"].isin(low_ids).any()
    # the cascade searches a subset of what exhaustive search sees: it can never rank better
    assert saved["cascade"]["recall_at_1"] <= saved["exhaustive512"]["recall_at_1"] + 1e-9
    # the exact simulation at the card's coarse threshold agrees with the production code path
    th = saved["thresholds"]
    at_cal = [r for r in saved["coarse_tradeoff"] if r["coarse_threshold"] == th["coarse"]]
    assert at_cal and at_cal[0]["survivors"] == pytest.approx(saved["coarse_survivors"]["all_test"], abs=1e-3)
    assert at_cal[0]["recall_at_1"] == pytest.approx(saved["cascade"]["recall_at_1"], abs=1e-3)
    # coarse-stage limits: the job's row is the card's operating point; all rows share one fine decision
    lim = saved["coarse_limits"]
    assert [r["coarse_score"].split(":")[0] for r in lim][-2:] == ["512-d", "512-d"]
    assert lim[0]["coarse_threshold"] == pytest.approx(th["coarse"], abs=1e-4)
    assert lim[0]["survivors"] == pytest.approx(saved["coarse_survivors"]["all_test"], abs=1e-3)
    assert len({r["exhaustive_true_flags"] for r in lim}) == 1  # one fine decision, several coarse scores
    surv = [r["survivors"] for r in saved["coarse_tradeoff"]]
    assert surv == sorted(surv, reverse=True)  # higher threshold, fewer high-res passes
    report = (tmp_path / "out" / "report.md").read_text()
    assert "µAP" in report and "Ablation" in report and "What limits the coarse stage" in report and set(saved["per_edit"])


def test_coarse_flag_parity_keeps_all_but_the_budget_of_true_flags() -> None:
    import numpy as np

    from pipeline.evaluation.calibrate import cascade_sim, coarse_flag_parity

    rng = np.random.default_rng(0)
    n_q, n_g = 400, 50
    truth = {r: r % n_g for r in range(300)}                 # 300 positives, 100 negatives
    F = rng.uniform(0.0, 0.5, (n_q, n_g)).astype(np.float32)
    S = rng.uniform(0.0, 0.3, (n_q, n_g)).astype(np.float32)
    for r, j in truth.items():
        F[r, j] = rng.uniform(0.55, 1.0)                     # true pairs: exhaustive flags them at 0.6+
        S[r, j] = rng.uniform(0.3, 0.95)                     # ... and they are in every coarse top-10
    rows = list(range(n_q))
    for budget in (0.0, 0.01, 0.1):
        p = coarse_flag_parity(S, F, rows, truth, 10, 0.6, budget)
        sim = cascade_sim(S, F, rows, truth, p["threshold"], 10, 0.6)
        lost = sim["exhaustive_true_flags"] - sim["true_flags"]
        allowed = int(np.floor(budget * p["true_flags"]))
        assert p["always_lost"] == 0 and lost <= allowed, (budget, lost)
        higher = cascade_sim(S, F, rows, truth, p["threshold"] + 1e-4, 10, 0.6)
        assert higher["exhaustive_true_flags"] - higher["true_flags"] > allowed  # it is the highest such threshold
    assert coarse_flag_parity(S, F, rows, truth, 10, 0.6, 0.1)["threshold"] > coarse_flag_parity(S, F, rows, truth, 10, 0.6, 0.0)["threshold"]


def _norm_split(n: int = 40):
    from pipeline.evaluation.benchmark import Split

    rows = list(range(2 * n))  # rows < n: positives of column r; the rest: negatives
    return Split([f"q{r}" for r in rows], [f"g{j}" for j in range(n)], rows, [], {r: r for r in range(n)},
                 ["photo"] * (2 * n))


def test_score_normalisation_ties_go_to_the_stronger_normalisation() -> None:
    import numpy as np

    from pipeline.evaluation.calibrate import calibrate_norm

    n = 40
    sp = _norm_split(n)
    rng = np.random.default_rng(0)
    S = rng.uniform(0.0, 0.4, (2 * n, n)).astype(np.float32)
    S[np.arange(n), np.arange(n)] = rng.uniform(0.5, 1.0, n)
    # the same background term for every query shifts all scores alike: every beta decides the same
    flat = {k: np.full(2 * n, 0.3, np.float32) for k in (1, 3)}
    norm, grid = calibrate_norm(S, flat, sp, 0.99)
    assert len({g["recall"] for g in grid}) == 1 and (norm.beta, norm.k) == (1.0, 1)
    # a term that only positives carry: normalising loses them, so no normalisation wins outright
    pos_only = {1: np.where(np.arange(2 * n) < n, 0.5, 0.0).astype(np.float32)}
    S2 = S.copy()
    S2[n:, 0] = 0.9  # negatives as strong as the positives: only the raw score keeps them apart
    S2[np.arange(n), np.arange(n)] = rng.uniform(0.95, 1.0, n)
    assert calibrate_norm(S2, pos_only, sp, 0.99)[0].beta == 0.0


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
