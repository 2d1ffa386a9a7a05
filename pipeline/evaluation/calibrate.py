"""Calibration on the calibration half: score normalisation, the fine threshold, flag parity.

Score normalisation (``beta``, ``k``: :func:`calibrate_norm`) and the fine threshold for
``--target-precision`` come from exhaustive 512-d decisions; the coarse threshold is *flag parity*
(:func:`coarse_flag_parity`): the highest coarse threshold whose cascade keeps all but
``--coarse-flag-budget`` of the true flags exhaustive 512-d search makes. :func:`cascade_sim`
simulates the cascade exactly at any coarse threshold (the report's trade-off table), and
:func:`coarse_limits` puts the job's coarse stage beside stronger coarse scorers at their own flag
parity: what the 128-d compression and the low query resolution each cost in high-res passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation import retrieval_metrics as M
from pipeline.evaluation.benchmark import Features, Split
from pipeline.gallery.index import ScoreNorm, background_term

TOPK = 10
NORM_BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
NORM_KS = (1, 3, 10)


def topk_rows(qids: list[str], gids: list[str], S: np.ndarray, rows: list[int], stage: str,
               k: int = TOPK) -> pd.DataFrame:
    """Top-``k`` predictions of the query rows ``rows`` from a score matrix (``-inf`` = none)."""
    out = []
    for r in rows:
        s = S[r]
        top = np.argsort(-s, kind="stable")[:k]
        for rank, j in enumerate(top):
            if np.isfinite(s[j]):
                out.append((qids[r], gids[j], float(s[j]), rank + 1, stage))
    return pd.DataFrame(out, columns=["query_id", "reference_id", "score", "rank", "stage"])


def decisions_at_precision(S: np.ndarray, sp: Split, rows: list[int], target: float) -> dict[str, Any]:
    """Calibrate a threshold for ``target`` precision on ``rows`` -> threshold and recall there."""
    p = topk_rows(sp.qids, sp.gids, S, rows, "x", k=1)
    q, r, s = p["query_id"].tolist(), p["reference_id"].tolist(), p["score"].to_numpy()
    thr = M.threshold_for_precision(q, r, s, sp.gt(rows), target, sp.negatives(rows))
    return {"threshold": thr, **M.operating_point(q, r, s, sp.gt(rows), sp.negatives(rows), thr)}


def calibrate_norm(S512: np.ndarray, bq: dict[int, np.ndarray], sp: Split, target: float) -> tuple[ScoreNorm, list[dict]]:
    """The (beta, k) with the best recall at ``target`` precision on the calibration half
    (exhaustive 512-d decisions). Recalls within one calibration positive of the best are ties
    (a difference of one query is sampling noise), and ties go to the larger beta: at equal recall
    the stronger normalisation keeps more margin against hub content (generic scenes, gradients,
    flat graphics) that the calibration half samples only thinly. Returns it and the whole grid."""
    grid: list[dict] = []
    scored: list[tuple[float, ScoreNorm]] = []
    for k, term in bq.items():
        for beta in NORM_BETAS if len(term) else (0.0,):
            d = decisions_at_precision(S512 - beta * term[:, None] if len(term) else S512, sp, sp.cal, target)
            grid.append({"beta": beta, "k": k, "recall": round(d["recall"], 4), "precision": round(d["precision"], 4)})
            scored.append((float(d["recall"]), ScoreNorm(beta, k)))
    if not scored:
        return ScoreNorm(), grid
    one_query = 1.0 / max(1, sum(1 for r in sp.cal if r in sp.truth))
    top = max(r for r, _ in scored)
    ties = [(n.beta, r, -n.k) for r, n in scored if r >= top - one_query - 1e-9]
    beta, _, neg_k = max(ties)
    return ScoreNorm(beta, -neg_k), grid


def coarse_flag_parity(S128: np.ndarray, F: np.ndarray, rows: list[int], truth: dict[int, int], k: int,
                       fine: float, budget: float) -> dict[str, Any]:
    """The highest coarse threshold whose cascade keeps all but ``budget`` of exhaustive search's
    true flags on ``rows``. A flag (query, best reference j*) is kept iff j* is in the query's
    coarse top-``k`` at or above the threshold: then j* is also the best candidate."""
    rows_a = np.asarray(rows, np.int64)
    best = np.argmax(F[rows_a], axis=1)
    flagged = [(r, j) for r, j in zip(rows_a, best) if F[r, j] >= fine and truth.get(int(r)) == j]
    if not flagged:
        return {"threshold": -1.0, "true_flags": 0, "always_lost": 0}
    kth = -np.sort(-S128[[r for r, _ in flagged]], axis=1)[:, min(k, S128.shape[1]) - 1]
    c = np.asarray([S128[r, j] for r, j in flagged])
    reachable = c >= kth
    always_lost = int((~reachable).sum())
    allowed = int(np.floor(budget * len(flagged))) - always_lost
    cs = np.sort(c[reachable])
    thr = float(cs[max(0, allowed)]) if len(cs) else -1.0
    return {"threshold": thr, "true_flags": len(flagged), "always_lost": always_lost}


def cascade_sim(S128: np.ndarray, F: np.ndarray, rows: list[int], truth: dict[int, int], t: float, k: int,
                fine: float) -> dict[str, float]:
    """Exact simulation of the cascade on ``rows`` at coarse threshold ``t``: survivors, true
    flags kept vs exhaustive search, false flags."""
    rows_a = np.asarray(rows, np.int64)
    C, Fr = S128[rows_a], F[rows_a]
    kth = -np.sort(-C, axis=1)[:, min(k, C.shape[1]) - 1][:, None]
    cand = (C >= t) & (C >= kth)
    surv = np.asarray(cand.any(axis=1))  # (rows,) bool; numpy types any(axis=1) as "a bool or an array"
    bc = np.argmax(np.where(cand, Fr, -np.inf), axis=1)
    be = np.argmax(Fr, axis=1)
    true_col = np.asarray([truth.get(int(r), -1) for r in rows_a])
    is_pos = true_col >= 0
    casc_flag = surv & (Fr[np.arange(len(Fr)), bc] >= fine)
    exh_flag = Fr[np.arange(len(Fr)), be] >= fine
    tp_c, tp_e = casc_flag & (bc == true_col), exh_flag & (be == true_col)
    return {"coarse_threshold": round(float(t), 4), "survivors": round(float(surv.mean()), 4),
            "negatives_surviving": round(float(surv[~is_pos].mean()), 4) if (~is_pos).any() else 0.0,
            "true_flags": int(tp_c.sum()), "exhaustive_true_flags": int(tp_e.sum()),
            "flags_kept": round(float(tp_c.sum() / tp_e.sum()), 4) if tp_e.sum() else 1.0,
            "false_flags": int((casc_flag & (bc != true_col)).sum()),
            "recall_at_1": round(float((surv & (bc == true_col))[is_pos].mean()), 4) if is_pos.any() else 0.0}


@dataclass
class Calibration:
    norm: ScoreNorm
    fine: float
    coarse: float
    rerank_k: int
    grid: list[dict]
    parity: dict[str, Any]


def without_low_content(S: np.ndarray, ft: Features) -> np.ndarray:
    """``S`` (queries x references) with low-content queries and references at ``-inf``, in place:
    the job never searches the one nor indexes the other."""
    S[ft.low_content] = -np.inf
    S[:, ft.g_low_content] = -np.inf
    return S


def score_matrices(ft: Features, bank: Any, sp: Split) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Raw 512-d and 128-d score matrices and the background terms per k. Low-content queries
    get no scores at all (the job never searches them), nor low-content references."""
    S512, S128 = without_low_content(ft.q512 @ ft.g512.T, ft), without_low_content(ft.q128 @ ft.g128.T, ft)
    bg = bank.f512 if bank is not None else None
    bq = {k: background_term(ft.q512, bg, k) if bg is not None else np.zeros(0) for k in NORM_KS}
    return S512, S128, bq


def calibrate(S512: np.ndarray, S128: np.ndarray, bq: dict[int, np.ndarray], sp: Split, target: float,
              rerank_k: int, budget: float) -> Calibration:
    norm, grid = calibrate_norm(S512, bq, sp, target)
    F = S512 - norm.beta * bq[norm.k][:, None] if norm.beta else S512
    fine = decisions_at_precision(F, sp, sp.cal, target)["threshold"]
    parity = coarse_flag_parity(S128, F, sp.cal, sp.truth, rerank_k, fine, budget)
    return Calibration(norm, fine, parity["threshold"], rerank_k, grid, parity)


COARSE_NORM_KS = (1, 10, 30)


def coarse_limits(ft: Features, S128: np.ndarray, F: np.ndarray, sp: Split, bank: Any, rerank_k: int, fine: float,
                  budget: float) -> list[dict[str, Any]]:
    """Survivors at flag parity (calibrated on the calibration half, measured on the test half)
    for the job's coarse score and for stronger ones: the same score background-normalised (the
    (beta, k) with the fewest calibration-half survivors), the uncompressed 512-d feature of the
    low-res query, and the 512-d feature of the high-res query (no resolution drop either)."""
    def at_parity(name: str, S: np.ndarray) -> dict[str, Any]:
        thr = coarse_flag_parity(S, F, sp.cal, sp.truth, rerank_k, fine, budget)["threshold"]
        return {"coarse_score": name, **cascade_sim(S, F, sp.test, sp.truth, thr, rerank_k, fine)}

    rows = [at_parity("128-d: adapter 2 (low res) vs adapter 1 (the job)", S128)]
    if bank is not None and len(getattr(bank, "f128", ())):
        best: tuple[float, str, np.ndarray] | None = None
        for k in COARSE_NORM_KS:
            term = background_term(ft.q128, bank.f128, k)[:, None]
            for beta in NORM_BETAS[1:]:
                S = S128 - beta * term
                thr = coarse_flag_parity(S, F, sp.cal, sp.truth, rerank_k, fine, budget)["threshold"]
                surv = cascade_sim(S, F, sp.cal, sp.truth, thr, rerank_k, fine)["survivors"]
                if best is None or surv < best[0]:
                    best = (surv, f"128-d, background-normalised (beta {beta}, k {k})", S)
        assert best is not None
        rows.append(at_parity(best[1], best[2]))
    rows.append(at_parity("512-d: low-res query vs high-res references", without_low_content(ft.q512_low @ ft.g512.T, ft)))
    rows.append(at_parity("512-d: high-res query vs high-res references", without_low_content(ft.q512 @ ft.g512.T, ft)))
    return rows
