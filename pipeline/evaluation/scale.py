"""Precision at the gallery sizes users run, from real pictures: ``modscan bench scale``.

Every picture is both a reference (high-res 128-d and 512-d, as a gallery stores it) and a query
twice, as itself and as an edited copy (the job's low-res 128-d coarse query and its normalised
high-res 512-d fine query). A pair is *unrelated* when its query and reference come from
different pictures of different near-duplicate families (PDQ distance <= :data:`FAMILY_PDQ`
between the originals, an independent signal from both the descriptor and the verifier); a pair
is a *copy* when the query is an edited copy of the reference.

From the unrelated pairs: per-pair tails of the coarse score and of the normalised fine score
(:class:`~pipeline.gallery.calibration.TailCurve`), by group of the query picture (pictures the
model trained on, pictures it never saw, generated everyday pictures; ``photos``: the first two); the verifier's pass rate on the
highest-scoring unrelated pairs; and, under the independence assumption, the expected share of
unrelated uploads that survive the coarse stage and that are falsely flagged at 10K-10M
references. The assumption is checked against the measured share at the largest real gallery
(every picture a reference). From the copies: recall under each rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.gallery.calibration import Budgets, ScoreTails, TailCurve, calibrate_for_size, expected, per_upload

FAMILY_PDQ = 31  # ThreatExchange's usual PDQ match distance
COARSE_GRID = tuple(np.round(np.arange(0.0, 1.0001, 0.01), 2))
FINE_GRID = tuple(np.round(np.arange(-0.2, 1.0001, 0.01), 2))
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


@dataclass
class ScaleSet:
    """Features of ``P`` pictures and of their ``Q = 2P`` queries, exactly as the job scores them."""

    names: list[str]
    groups: np.ndarray        # (P,) trained | unseen | generated
    family: np.ndarray        # (P,) near-duplicate family id
    g128: np.ndarray          # (P, 128) reference side (adapter 1)
    g512: np.ndarray          # (P, 512)
    q128: np.ndarray          # (Q, 128) low-res coarse query (adapter 2)
    q512: np.ndarray          # (Q, 512) high-res fine query
    offset: np.ndarray        # (Q,) score normalisation: normalised fine = q512 . g512 - offset
    q_src: np.ndarray         # (Q,) picture each query comes from
    q_edited: np.ndarray      # (Q,) bool: an edited copy (else the original)

    def scores(self, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(coarse ``(q, P)``, normalised fine ``(q, P)``) of the query rows ``rows``."""
        S128 = self.q128[rows] @ self.g128.T
        F = self.q512[rows] @ self.g512.T - self.offset[rows][:, None]
        return S128, F

    def unrelated(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``(q, P)`` bool: pairs of different families."""
        return self.family[self.q_src[rows]][:, None] != self.family[None, :]


def tails_by_group(ss: ScaleSet, chunk: int = 512) -> dict[str, dict[str, TailCurve]]:
    """Per-pair tails of unrelated pairs, for all pairs and by the query picture's group (the
    reference may be any picture), coarse and fine."""
    groups = ["all", "photos", *sorted(set(ss.groups.tolist()))]
    acc: dict[str, dict[str, list[np.ndarray]]] = {g: {"coarse": [], "fine": []} for g in groups}
    for i in range(0, len(ss.q_src), chunk):
        rows = np.arange(i, min(i + chunk, len(ss.q_src)))
        S128, F = ss.scores(rows)
        U = ss.unrelated(rows)
        qg = ss.groups[ss.q_src[rows]]
        for g in groups:
            m = U & _query_group(qg, g)[:, None]
            acc[g]["coarse"].append(_keep_tail(S128[m], COARSE_GRID))
            acc[g]["fine"].append(_keep_tail(F[m], FINE_GRID))
    out = {}
    for g in groups:
        n_pairs = _pair_count(ss, g)
        out[g] = {k: TailCurve.measure(np.concatenate(v), COARSE_GRID if k == "coarse" else FINE_GRID, n_pairs)
                  for k, v in acc[g].items()}
    return out


def _query_group(qg: np.ndarray, g: str) -> np.ndarray:
    """Queries of group ``g``: ``all``, ``photos`` (every group but the generated pictures), or one group."""
    if g == "all":
        return np.ones(len(qg), bool)
    return (qg != "generated") if g == "photos" else (qg == g)


def _keep_tail(x: np.ndarray, grid: tuple[float, ...]) -> np.ndarray:
    """The scores at or above the grid's start (what a tail curve counts), as float32."""
    return np.asarray(x[x >= grid[0]], np.float32)


def _pair_count(ss: ScaleSet, group: str) -> int:
    rows = np.nonzero(_query_group(ss.groups[ss.q_src], group))[0]
    fam_sizes = np.bincount(ss.family, minlength=int(ss.family.max()) + 1)
    return int(sum(len(ss.family) - fam_sizes[ss.family[ss.q_src[r]]] for r in rows))


def envelope(tails: dict[str, dict[str, TailCurve]], kind: str, exclude: tuple[str, ...] = ("all", "photos")) -> TailCurve:
    """The conservative tail over the groups: at every threshold the highest measured rate of any
    group, counted on the smallest group's pairs (so a rate is read off measurements only where
    every group has enough exceedances), and beyond them the fit of the group whose fit is highest
    where the measurements end."""
    curves = [t[kind] for g, t in tails.items() if g not in exclude]
    rates = tuple(float(max(c.rates[i] for c in curves)) for i in range(len(curves[0].thresholds)))
    pairs = min(c.pairs for c in curves)
    end = max(c.fit_from for c in curves) + 0.1
    top = max(curves, key=lambda c: c.a + c.b * end)
    return TailCurve(curves[0].thresholds, rates, pairs, top.a, top.b, top.fit_from)


def top_unrelated(ss: ScaleSet, n: int, chunk: int = 512) -> list[tuple[int, int, float]]:
    """The ``n`` highest normalised fine scores of unrelated pairs: (query row, picture, score)."""
    best: list[tuple[float, int, int]] = []
    floor = -np.inf
    for i in range(0, len(ss.q_src), chunk):
        rows = np.arange(i, min(i + chunk, len(ss.q_src)))
        _, F = ss.scores(rows)
        F = np.where(ss.unrelated(rows), F, -np.inf)
        qi, pj = np.nonzero(F > floor)
        sel = np.argsort(-F[qi, pj])[:n]
        best += [(float(F[qi[k], pj[k]]), int(rows[qi[k]]), int(pj[k])) for k in sel]
        best = sorted(best, reverse=True)[:n]
        floor = best[-1][0] if len(best) == n else -np.inf
    return [(q, p, s) for s, q, p in best]


def copies(ss: ScaleSet) -> dict[str, np.ndarray]:
    """Each edited query against its own original: coarse and normalised fine scores, query rows."""
    rows = np.nonzero(ss.q_edited)[0]
    src = ss.q_src[rows]
    coarse = np.einsum("ij,ij->i", ss.q128[rows], ss.g128[src])
    fine = np.einsum("ij,ij->i", ss.q512[rows], ss.g512[src]) - ss.offset[rows]
    return {"rows": rows, "src": src, "coarse": coarse, "fine": fine}


def upper95(k: int, n: int) -> float:
    """One-sided 95 % upper bound of a binomial rate with ``k`` of ``n`` (Clopper-Pearson; 3/n at 0)."""
    if n <= 0:
        return 1.0
    if k == 0:
        return 1.0 - 0.05 ** (1.0 / n)
    from scipy.stats import beta  # scikit-image depends on scipy

    return float(beta.ppf(0.95, k + 1, n - k)) if k < n else 1.0


def measured_vs_independent(ss: ScaleSet, tail: TailCurve, thresholds: tuple[float, ...], chunk: int = 512
                            ) -> list[dict[str, Any]]:
    """The largest real gallery (every picture a reference): the measured share of queries with an
    unrelated reference at or above each fine threshold, against ``1 - (1 - p)^N`` from the tail."""
    hit = np.zeros((len(thresholds), len(ss.q_src)), bool)
    n_refs = np.zeros(len(ss.q_src))
    for i in range(0, len(ss.q_src), chunk):
        rows = np.arange(i, min(i + chunk, len(ss.q_src)))
        _, F = ss.scores(rows)
        U = ss.unrelated(rows)
        best = np.where(U, F, -np.inf).max(axis=1)
        n_refs[rows] = U.sum(axis=1)
        for j, t in enumerate(thresholds):
            hit[j, rows] = best >= t
    N = int(np.median(n_refs))
    return [{"fine threshold": t, "references": N, "measured share": float(hit[j].mean()),
             "queries": len(ss.q_src), "independent prediction": per_upload(tail.rate(t), N)}
            for j, t in enumerate(thresholds)]


def rule_recall(c: dict[str, np.ndarray], inliers: np.ndarray, fine: float, sure: float | None, min_inliers: int,
                coarse: float) -> float:
    """Share of copies the job flags: coarse candidate, then fine >= ``fine`` and (sure, or verified)."""
    ok = (c["coarse"] >= coarse) & (c["fine"] >= fine)
    if sure is not None:
        ok &= (c["fine"] >= sure) | (inliers >= min_inliers)
    return float(ok.mean()) if len(ok) else math.nan


def size_rows(tails: ScoreTails, c: dict[str, np.ndarray], inliers: np.ndarray, card: dict[str, float],
              min_inliers: int, budgets: Budgets = Budgets(), sizes: tuple[int, ...] = SIZES) -> list[dict[str, Any]]:
    """Per gallery size: the card's thresholds with the old rule (fine alone), and the size-calibrated
    thresholds with verification: expected survivors, verified share, false flags, copy recall."""
    out = []
    for n in sizes:
        old = expected(tails, n, card["coarse"], card["fine"], card["fine"])
        out.append({"references": n, "rule": "card thresholds, fine alone", "coarse": card["coarse"],
                    "fine": card["fine"], "sure": None, "survivors": old["survivors"], "verified": 0.0,
                    "false flags": per_upload(tails.fine.rate(card["fine"]), n),
                    "copy recall": rule_recall(c, inliers, card["fine"], None, min_inliers, card["coarse"])})
        cal = calibrate_for_size(tails, n, card["coarse"], card["fine"], budgets)
        out.append({"references": n, "rule": "size-calibrated + verification", "coarse": cal.coarse, "fine": cal.fine,
                    "sure": cal.sure, "survivors": cal.expected_survivors, "verified": cal.expected_verified,
                    "false flags": cal.expected_false_flags,
                    "copy recall": rule_recall(c, inliers, cal.fine, cal.sure, min_inliers, cal.coarse)})
    return out


def coarse_curve(tails: ScoreTails, c: dict[str, np.ndarray], flagged: np.ndarray, n: int = 1_000_000
                 ) -> list[dict[str, Any]]:
    """At ``n`` references: unrelated uploads surviving the coarse stage against the share of the
    copies the rule flags (``flagged``) that the coarse threshold keeps, over coarse thresholds."""
    out = []
    base = max(int(flagged.sum()), 1)
    for t in np.round(np.arange(0.30, 0.91, 0.05), 2):
        out.append({"coarse threshold": float(t), "survivors": per_upload(tails.coarse.rate(float(t)), n),
                    "flags kept": float((flagged & (c["coarse"] >= t)).sum() / base)})
    return out
