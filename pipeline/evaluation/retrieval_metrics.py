"""Copy-detection metrics (DISC2021 conventions).

Predictions are ``(query_id, reference_id, score)`` triples. Ground truth maps a positive query to
its reference; a query absent from it (or with no reference) is a negative and should match
nothing. Micro-AP ranks *all* predictions of all queries globally by score; tied scores form one
step of the precision-recall curve (precision is taken after the whole tie group, as scikit-learn
does with distinct thresholds), so the order of ties cannot change the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall after each distinct score threshold (descending)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def _labels(query_ids, reference_ids, gt: dict[str, str]) -> np.ndarray:
    return np.asarray([gt.get(q) == r for q, r in zip(query_ids, reference_ids)], dtype=bool)


def pr_curve(query_ids, reference_ids, scores, gt: dict[str, str]) -> PRCurve:
    """Global PR curve over all predictions; ``gt`` = positive query -> reference id."""
    n_pos = len(gt)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0 or n_pos == 0:
        return PRCurve(np.zeros(0), np.zeros(0), np.zeros(0))
    y = _labels(query_ids, reference_ids, gt)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], y[order]
    tp = np.cumsum(y)
    # index of the last element of each tie group
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp_g = tp[last]
    n_g = last + 1
    return PRCurve(s[last], tp_g / n_g, tp_g / n_pos)


def micro_ap(query_ids, reference_ids, scores, gt: dict[str, str]) -> float:
    """µAP: sum over thresholds of (recall gain) x (precision at that threshold)."""
    c = pr_curve(query_ids, reference_ids, scores, gt)
    if len(c.recall) == 0:
        return 0.0
    dr = np.diff(np.r_[0.0, c.recall])
    return float(np.sum(dr * c.precision))


def recall_at_precision(query_ids, reference_ids, scores, gt: dict[str, str], p: float) -> tuple[float, float | None]:
    """Highest recall among thresholds with precision >= ``p`` -> (recall, threshold or None)."""
    c = pr_curve(query_ids, reference_ids, scores, gt)
    ok = c.precision >= p
    if not ok.any():
        return 0.0, None
    i = int(np.argmax(np.where(ok, c.recall, -1.0)))
    return float(c.recall[i]), float(c.thresholds[i])


def top1(query_ids, reference_ids, scores) -> dict[str, tuple[str, float]]:
    """Best prediction per query: query -> (reference, score); ties keep the first seen."""
    best: dict[str, tuple[str, float]] = {}
    for q, r, s in zip(query_ids, reference_ids, scores):
        if q not in best or s > best[q][1]:
            best[q] = (r, float(s))
    return best


def recall_at_1(query_ids, reference_ids, scores, gt: dict[str, str]) -> float:
    """Share of positive queries whose best prediction is their reference (any score)."""
    if not gt:
        return 0.0
    b = top1(query_ids, reference_ids, scores)
    return sum(1 for q, r in gt.items() if q in b and b[q][0] == r) / len(gt)


def operating_point(query_ids, reference_ids, scores, gt: dict[str, str], negatives: list[str],
                    threshold: float) -> dict[str, float]:
    """Top-1 decisions at ``threshold``: precision, recall, false positives per negative query."""
    b = top1(query_ids, reference_ids, scores)
    flagged = {q: r for q, (r, s) in b.items() if s >= threshold}
    tp = sum(1 for q, r in flagged.items() if gt.get(q) == r)
    fp_neg = sum(1 for q in negatives if q in flagged)
    n_flag = len(flagged)
    return {"threshold": float(threshold), "precision": tp / n_flag if n_flag else 1.0,
            "recall": tp / len(gt) if gt else 0.0, "flagged": n_flag, "true_positives": tp,
            "false_positives_per_negative_query": fp_neg / len(negatives) if negatives else 0.0}


def threshold_for_precision(query_ids, reference_ids, scores, gt: dict[str, str], target: float,
                            negatives: list[str]) -> float:
    """Smallest top-1 score threshold whose precision (over positives and negatives) >= target."""
    b = top1(query_ids, reference_ids, scores)
    items = sorted(((s, gt.get(q) == r) for q, (r, s) in b.items()), key=lambda t: -t[0])
    if not items:
        return 1.0
    tp = 0
    best = items[0][0] + 1e-6
    for i, (s, ok) in enumerate(items):
        tp += int(ok)
        nxt = items[i + 1][0] if i + 1 < len(items) else None
        if nxt is not None and nxt == s:
            continue  # decide only at the end of a tie group
        if tp / (i + 1) >= target:
            best = s
    return float(best)
