"""Thresholds that follow the gallery's size.

A false match is a pair (upload, reference) of unrelated pictures whose score passes a threshold.
If a pair passes with probability ``p``, an upload compared with ``N`` references is falsely
matched with probability ``1 - (1 - p)^N`` (pairs taken as independent: near-duplicate families
and hub pictures cluster the exceedances, so this is an approximation, checked in
``modscan bench scale`` against a real gallery). A threshold that keeps false matches rare at 200
references lets almost every upload through at a million, so each gallery version gets its own
thresholds, chosen here from the model's measured per-pair tails (:class:`ScoreTails`, made by
``modscan bench scale`` on real photos and stored in the model card) and the operator's budgets
per unrelated upload (:class:`Budgets`):

* ``fine``: the card's fine threshold less :data:`VERIFY_BELOW`, raised until at most ``verify_share`` of unrelated uploads
  have a candidate that reaches it (each of those pays geometric verification) and the verified
  path's false flags (those uploads x the verifier's pass rate) are at most half the budget;
* ``sure``: raised until at most ``sure_false_flags`` of unrelated uploads have a candidate that
  reaches it; between ``fine`` and ``sure`` a match needs verification;
* ``coarse``: the card's (flag parity: raising it loses copies long before it saves much, see
  docs/evaluation.md); the share of uploads it lets through to the high-res pass is reported.

The expected false flags per unrelated upload are the sure path's plus the verified path's
(uploads reaching ``fine`` x the verifier's pass rate on the highest-scoring unrelated pairs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def per_upload(p: float, n: int) -> float:
    """Share of uploads with at least one of ``n`` independent pairs passing at rate ``p``."""
    p = min(max(float(p), 0.0), 1.0)
    return 1.0 if p >= 1.0 else float(-math.expm1(n * math.log1p(-p)))


@dataclass(frozen=True)
class TailCurve:
    """Per-pair exceedance rate of one score over unrelated pairs: measured at ``thresholds``
    (``rates``, from ``pairs`` pairs), and beyond the measured range a log-linear fit
    ``log10 rate = a + b * t`` of the measured tail (``fit_from``: the lowest threshold of the fit).
    A rate is read off the measurements while at least ``MIN_COUNT`` pairs pass, else off the fit:
    a handful of pairs is no estimate."""

    thresholds: tuple[float, ...]
    rates: tuple[float, ...]
    pairs: int
    a: float
    b: float
    fit_from: float

    MIN_COUNT = 20

    def rate(self, t: float) -> float:
        ts, rs = np.asarray(self.thresholds), np.asarray(self.rates)
        if t <= ts[0]:
            return float(rs[0])
        measured = float(np.interp(t, ts, rs))
        if measured * self.pairs >= self.MIN_COUNT:
            return measured
        return float(min(10.0 ** (self.a + self.b * t), measured if measured > 0 else 1.0)) if measured > 0 \
            else float(10.0 ** (self.a + self.b * t))

    def threshold_for(self, p: float, lo: float = -1.0) -> float:
        """The lowest threshold (>= ``lo``) whose per-pair rate is at most ``p``."""
        grid = np.round(np.arange(max(lo, self.thresholds[0]), 1.0001, 0.001), 4)
        for t in grid:
            if self.rate(float(t)) <= p:
                return float(t)
        return 1.0

    @classmethod
    def measure(cls, scores: np.ndarray, thresholds: Sequence[float], pairs: int | None = None) -> TailCurve:
        """From the scores of unrelated pairs (a flat array, or any array: every element a pair)."""
        s = np.sort(np.asarray(scores, np.float64).ravel())
        n = int(pairs or s.size)
        ts = tuple(round(float(t), 4) for t in thresholds)
        counts = s.size - np.searchsorted(s, np.asarray(ts), side="left")
        rates = tuple(float(c) / n for c in counts)
        # the fit: the measured tail from where 1 % of pairs pass down to where MIN_COUNT still do
        sel = [i for i, c in enumerate(counts) if cls.MIN_COUNT <= c <= 0.01 * n]
        if len(sel) < 3:
            sel = [i for i, c in enumerate(counts) if c >= 3][-5:]
        x = np.asarray([ts[i] for i in sel])
        y = np.log10(np.asarray([rates[i] for i in sel]))
        b, a = np.polyfit(x, y, 1) if len(sel) >= 2 else (-50.0, 0.0)
        return cls(ts, rates, n, float(a), float(b), float(x[0]) if len(x) else ts[0])

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds), "rates": list(self.rates), "pairs": self.pairs,
                "fit": {"a": self.a, "b": self.b, "from": self.fit_from}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TailCurve:
        f = d["fit"]
        return cls(tuple(map(float, d["thresholds"])), tuple(map(float, d["rates"])), int(d["pairs"]),
                   float(f["a"]), float(f["b"]), float(f["from"]))


@dataclass(frozen=True)
class ScoreTails:
    """What the model card keeps of ``modscan bench scale``: the coarse score's and the normalised
    fine score's per-pair tails over unrelated real pictures (the heavier of the measured groups),
    and the verifier's pass rate on the highest-scoring unrelated pairs (``verifier_pass``: the
    95 % upper bound, from ``verifier_pairs`` pairs)."""

    coarse: TailCurve
    fine: TailCurve
    verifier_pass: float
    verifier_pairs: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"coarse": self.coarse.to_dict(), "fine": self.fine.to_dict(), "verifier_pass": self.verifier_pass,
                "verifier_pairs": self.verifier_pairs, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ScoreTails | None:
        if not d:
            return None
        return cls(TailCurve.from_dict(d["coarse"]), TailCurve.from_dict(d["fine"]), float(d["verifier_pass"]),
                   int(d["verifier_pairs"]), str(d.get("source", "")))


@dataclass(frozen=True)
class Budgets:
    """The operator's budgets per unrelated upload (shares, 0-1)."""

    false_flags: float = 0.001      # expected falsely flagged unrelated uploads (the sure path gets half)
    verify_share: float = 0.10      # unrelated uploads that pay geometric verification


@dataclass(frozen=True)
class SizeCalibration:
    """The thresholds chosen for a gallery of ``references`` and what they are expected to give per
    unrelated upload (``expected_*``, shares 0-1, under the independence assumption)."""

    references: int
    coarse: float
    fine: float
    sure: float
    expected_survivors: float        # reach the coarse threshold: pay the high-res pass
    expected_verified: float         # reach the fine threshold: pay verification
    expected_false_flags: float      # flagged: reach sure, or reach fine and pass verification
    budgets: Budgets

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budgets"] = asdict(self.budgets)
        return d


def expected(tails: ScoreTails, n: int, coarse: float, fine: float, sure: float) -> dict[str, float]:
    """Expected shares per unrelated upload against ``n`` references at these thresholds."""
    p_sure = tails.fine.rate(sure)
    p_zone = max(tails.fine.rate(fine) - p_sure, 0.0)
    return {"survivors": per_upload(tails.coarse.rate(coarse), n),
            "verified": per_upload(tails.fine.rate(fine), n),
            "false_flags": per_upload(p_sure + p_zone * tails.verifier_pass, n)}


# Verification lets the zone start below the card's fine threshold (calibrated for precision without
# verification): by this much, where the budgets allow. On coco256 about 3 % of the copies score
# within 0.05 under it, and the verifier confirms almost all of them.
VERIFY_BELOW = 0.05


def calibrate_for_size(tails: ScoreTails, n: int, coarse: float, fine: float,
                       budgets: Budgets = Budgets(), verify_below: float = VERIFY_BELOW) -> SizeCalibration:
    """Thresholds for a gallery of ``n`` references from the card's ``coarse`` / ``fine`` (the fine
    threshold's floor is ``fine - verify_below``: a small gallery verifies from just under the
    threshold its model was calibrated at) and the tails."""
    n = max(int(n), 1)
    per_pair = lambda share: -math.expm1(math.log1p(-share) / n)  # per-pair rate giving that share
    half = per_pair(budgets.false_flags / 2)
    # fine: within the verification budget, and the verified path's false flags within half the budget
    fine_n = max(fine - verify_below, tails.fine.threshold_for(per_pair(budgets.verify_share)),
                 tails.fine.threshold_for(half / max(tails.verifier_pass, 1e-12)))
    sure_n = max(fine_n, tails.fine.threshold_for(half))
    e = expected(tails, n, coarse, fine_n, sure_n)
    return SizeCalibration(n, round(coarse, 4), round(fine_n, 4), round(sure_n, 4), e["survivors"], e["verified"],
                           e["false_flags"], budgets)


def copy_recall(copies: Mapping[str, Sequence[float]] | None, coarse: float, fine: float, sure: float | None) -> float | None:
    """Share of the measured edited copies (``scale_tails["copies"]``: ``coarse``, ``fine`` scores
    against their originals and ``verified``, 1 where verification confirms the pair) that the
    job flags at these thresholds; None without copies."""
    if not copies or not len(copies.get("fine", ())):
        return None
    c, f, v = (np.asarray(copies[k], np.float64) for k in ("coarse", "fine", "verified"))
    ok = (c >= coarse) & (f >= fine)
    if sure is not None:
        ok &= (f >= sure) | (v > 0)
    return float(ok.mean())


def sized(model: Any, n: int, verifies: bool) -> Any:
    """A :class:`~pipeline.gallery.manifest.VersionModel` with its thresholds calibrated for ``n``
    references, when its ``calibration`` carries tails (a version built from a card with
    ``scale_tails``); unchanged otherwise. ``verifies``: the version stores keypoints. Without them
    nothing can be verified, so the fine threshold itself is raised to the sure one."""
    cal = model.calibration
    if not cal or not cal.get("tails"):
        return model
    tails = ScoreTails.from_dict(cal["tails"])
    if tails is None:
        return model
    budgets = Budgets(**cal.get("budgets", {}))
    sc = calibrate_for_size(tails, n, float(cal["base"]["coarse"]), float(cal["base"]["fine"]), budgets)
    fine, sure = (sc.fine, sc.sure) if verifies else (sc.sure, None)
    e: dict[str, float | None] = {**expected(tails, n, sc.coarse, fine, sure if sure is not None else fine)}
    e["copy_recall"] = copy_recall(cal["tails"].get("copies"), sc.coarse, fine, sure)
    return model.with_thresholds(coarse_threshold=sc.coarse, fine_threshold=fine, sure_threshold=sure,
                                 calibration={**cal, "references": int(n), "expected": e})


def initial(card_thresholds: Mapping[str, Any], scale_tails: Mapping[str, Any] | None,
            budgets: Budgets = Budgets()) -> dict[str, Any] | None:
    """A new gallery's ``calibration`` record: the card's thresholds as the floor, its tails, the
    budgets; None for a card without tails (thresholds stay the card's, whatever the size)."""
    if not scale_tails:
        return None
    return {"base": {"coarse": float(card_thresholds["coarse"]), "fine": float(card_thresholds["fine"])},
            "tails": dict(scale_tails), "budgets": asdict(budgets)}
