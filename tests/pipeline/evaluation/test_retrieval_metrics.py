"""pipeline/evaluation/retrieval_metrics.py: metric functions against hand-computed small cases."""

from __future__ import annotations

import pytest

from pipeline.evaluation import retrieval_metrics as M

GT = {"q1": "r1", "q2": "r2", "q3": "r3"}  # q4, q5 are negatives


def test_micro_ap_hand_computed() -> None:
    # ranked: q1-r1 (TP) .9, q4-r1 (FP) .8, q2-r2 (TP) .7, q2-r9 (FP) .6 ; q3 never retrieved
    q = ["q1", "q4", "q2", "q2"]
    r = ["r1", "r1", "r2", "r9"]
    s = [0.9, 0.8, 0.7, 0.6]
    # precision at TPs: 1/1, 2/3 ; recall steps 1/3 each -> (1 + 2/3) / 3
    assert M.micro_ap(q, r, s, GT) == pytest.approx((1 + 2 / 3) / 3)
    assert M.recall_at_1(q, r, s, GT) == pytest.approx(2 / 3)


def test_ties_form_one_step() -> None:
    # a TP and an FP tied at the top: precision 1/2 at recall 1/3, whatever the order
    a = M.micro_ap(["q1", "q4"], ["r1", "r1"], [0.5, 0.5], GT)
    b = M.micro_ap(["q4", "q1"], ["r1", "r1"], [0.5, 0.5], GT)
    assert a == b == pytest.approx(0.5 / 3)


def test_negatives_only_lower_precision() -> None:
    assert M.micro_ap(["q4", "q5"], ["r1", "r2"], [0.9, 0.8], GT) == 0.0
    assert M.micro_ap([], [], [], GT) == 0.0


def test_recall_at_precision() -> None:
    q = ["q1", "q2", "q4", "q3"]
    r = ["r1", "r2", "r1", "r3"]
    s = [0.9, 0.8, 0.7, 0.6]
    rec, thr = M.recall_at_precision(q, r, s, GT, 0.9)
    assert rec == pytest.approx(2 / 3) and thr == pytest.approx(0.8)
    rec, thr = M.recall_at_precision(q, r, s, GT, 0.7)  # 3/4 precision at the end
    assert rec == pytest.approx(1.0) and thr == pytest.approx(0.6)


def test_operating_point_and_threshold_for_precision() -> None:
    q = ["q1", "q2", "q4", "q3", "q5"]
    r = ["r1", "r2", "r1", "r3", "r2"]
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    op = M.operating_point(q, r, s, GT, ["q4", "q5"], 0.65)
    assert op["precision"] == pytest.approx(2 / 3) and op["recall"] == pytest.approx(2 / 3)
    assert op["false_positives_per_negative_query"] == pytest.approx(0.5)
    assert M.threshold_for_precision(q, r, s, GT, 0.99, ["q4", "q5"]) == pytest.approx(0.8)
    assert M.threshold_for_precision(q, r, s, GT, 0.6, ["q4", "q5"]) == pytest.approx(0.5)
