"""The evaluation's outputs: test-half metrics, ``metrics.json``, the predictions, the PR curve,
``report.md``, and what a model card keeps of them (:func:`card_update`).

Every metric is reported on the test half (:func:`quality` for one score matrix at one threshold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation import retrieval_metrics as M
from pipeline.evaluation.benchmark import Benchmark, Features, Split
from pipeline.evaluation.calibrate import Calibration, cascade_sim, coarse_limits, decisions_at_precision, topk_rows
from pipeline.gallery.index import background_term


def quality(S: np.ndarray, sp: Split, threshold: float) -> dict[str, Any]:
    """Test-half metrics of one score matrix at one threshold: µAP, recall@1, recall@P90, the
    operating point, false flags per unrelated upload (by kind)."""
    p = topk_rows(sp.qids, sp.gids, S, sp.test, "x")
    q, r, s = p["query_id"].tolist(), p["reference_id"].tolist(), p["score"].to_numpy()
    gt = sp.gt(sp.test)
    rp, thr90 = M.recall_at_precision(q, r, s, gt, 0.9)
    op = M.operating_point(q, r, s, gt, sp.negatives(sp.test), threshold)
    best = M.top1(q, r, s)
    flagged = {x for x, (_, sc) in best.items() if sc >= threshold}
    every = [sp.qids[i] for i in sp.test if sp.kind[i].startswith("everyday/")]
    low = [sp.qids[i] for i in sp.test if sp.kind[i].startswith("low_content/")]
    photo_neg = [sp.qids[i] for i in sp.test if sp.kind[i] == "photo" and i not in sp.truth]
    return {"micro_ap": M.micro_ap(q, r, s, gt), "recall_at_1": M.recall_at_1(q, r, s, gt),
            "recall_at_p90": rp, "threshold_at_p90": thr90, "operating_point": op,
            "false_flags_per_unrelated_upload": len(flagged & set(every)) / len(every) if every else 0.0,
            "everyday_flagged": len(flagged & set(every)), "everyday_uploads": len(every),
            "low_content_flagged": len(flagged & set(low)), "low_content_uploads": len(low),
            "photo_negatives_flagged": len(flagged & set(photo_neg)), "photo_negatives": len(photo_neg)}


def per_edit(S: np.ndarray, sp: Split, bench: Benchmark, threshold: float) -> dict[str, dict[str, float]]:
    """Recall@1 and recall at the operating threshold per edit name (test half)."""
    out: dict[str, dict[str, float]] = {}
    for r, j in sp.truth.items():
        if r not in set(sp.test):
            continue
        names = bench.edits.get(sp.qids[r]) or ["(none)"]
        best = int(np.argmax(S[r]))
        hit = best == j
        for e in set(names) | {f"{len(names)} edit(s)"}:
            d = out.setdefault(e, {"queries": 0, "recall_at_1": 0, "recall_at_threshold": 0})
            d["queries"] += 1
            d["recall_at_1"] += int(hit)
            d["recall_at_threshold"] += int(hit and S[r, best] >= threshold)
    for d in out.values():
        d["recall_at_1"] = round(d["recall_at_1"] / d["queries"], 4)
        d["recall_at_threshold"] = round(d["recall_at_threshold"] / d["queries"], 4)
    return dict(sorted(out.items()))


def diagnostics(ft: Features, sp: Split) -> dict[str, Any]:
    """512-d recall@1 and true-pair cosine of the query at low res, 112 px and high res."""
    out = {}
    rows = [r for r in sp.test if r in sp.truth]
    for name, q in (("high_res", ft.q512), ("low_res", ft.q512_low), ("112px", ft.q512_112)):
        S = q @ ft.g512.T
        hit = [int(np.argmax(S[r]) == sp.truth[r]) for r in rows]
        cos = [float(S[r, sp.truth[r]]) for r in rows]
        out[name] = {"recall_at_1": round(float(np.mean(hit)), 4) if hit else 0.0,
                     "true_pair_cosine_median": round(float(np.median(cos)), 4) if cos else 0.0}
    return out


def ablation(S512: np.ndarray, ft: Features, bank: Any, sp: Split, cal: Calibration, target: float) -> list[dict]:
    """One row per normalisation choice, each calibrated on the calibration half and measured on
    the test half: raw, photo-only background, the shipped background, + a reference-side term."""
    rows: list[dict] = []

    def row(name: str, F: np.ndarray) -> None:
        thr = decisions_at_precision(F, sp, sp.cal, target)["threshold"]
        q = quality(F, sp, thr)
        rows.append({"variant": name, "recall_at_p90": round(q["recall_at_p90"], 4),
                     "recall_at_operating_point": round(q["operating_point"]["recall"], 4),
                     "precision": round(q["operating_point"]["precision"], 4),
                     "false_flags_per_unrelated_upload": round(q["false_flags_per_unrelated_upload"], 4),
                     "micro_ap": round(q["micro_ap"], 4)})

    row("raw 512-d cosine (no normalisation)", S512)
    if bank is None or not cal.norm.beta:
        return rows
    b, k = cal.norm.beta, cal.norm.k
    photos = bank.f512[np.asarray([x == "photo" for x in bank.kind])]
    row(f"normalised, background of photos only (beta {b}, k {k})", S512 - b * background_term(ft.q512, photos, k)[:, None])
    bq = background_term(ft.q512, bank.f512, k)
    row(f"normalised, photos + generated graphics (shipped; beta {b}, k {k})", S512 - b * bq[:, None])
    br = background_term(ft.g512, bank.f512, k)
    row("shipped + reference-side hub term (beta/2 each side)", S512 - b * 0.5 * (bq[:, None] + br[None, :]))
    return rows


def assemble_metrics(bench: Benchmark, sp: Split, ft: Features, cal: Calibration, S512: np.ndarray, S128: np.ndarray,
              Fexh: np.ndarray, Fn: np.ndarray, Fr: np.ndarray, Spdq: np.ndarray, surv: np.ndarray,
              target: float, budget: float, fx: Any) -> dict[str, Any]:
    """metrics.json: every number of the report, test half unless named otherwise."""
    test = np.asarray(sp.test)
    kinds = np.asarray(sp.kind)[test]
    is_pos = np.asarray([r in sp.truth for r in test])
    raw_thr = decisions_at_precision(S512, sp, sp.cal, target)["threshold"]
    sim = [cascade_sim(S128, Fexh, sp.test, sp.truth, t, cal.rerank_k, cal.fine)
           for t in sorted({round(cal.coarse, 4), 0.3, 0.4, 0.5, 0.6, 0.7})]
    lc = ft.low_content
    return {
        "model": fx.version_id, "precision": fx.precision.value,
        "benchmark": {"gallery": len(sp.gids), "queries": len(sp.qids), "positives": len(sp.truth),
                      "negatives": len(sp.qids) - len(sp.truth),
                      "everyday_uploads": int(sum(k.startswith("everyday/") for k in sp.kind)),
                      "low_content_uploads": int(sum(k.startswith("low_content/") for k in sp.kind)),
                      "calibration_queries": len(sp.cal), "test_queries": len(sp.test), "seed": bench.seed},
        "thresholds": {"coarse": round(cal.coarse, 4), "fine": round(cal.fine, 4), "rerank_k": cal.rerank_k,
                       "norm": cal.norm.to_dict(), "target_precision": target, "coarse_flag_budget": budget,
                       "coarse_calibration": cal.parity, "fine_raw": round(raw_thr, 4)},
        "norm_grid": cal.grid,
        "cascade": quality(Fn, sp, cal.fine), "cascade_raw": quality(Fr, sp, raw_thr),
        "exhaustive512": quality(Fexh, sp, cal.fine), "exhaustive512_raw": quality(S512, sp, raw_thr),
        "coarse128_only": quality(S128, sp, 1.0), "pdq": quality(Spdq, sp, 1.0),
        "coarse_survivors": {"all_test": float(surv[test].mean()),
                             "photo_negatives": float(surv[test][(kinds == "photo") & ~is_pos].mean()),
                             "everyday": float(surv[test][np.char.startswith(kinds.astype(str), "everyday/")].mean()),
                             "negatives": float(surv[test][~is_pos].mean()), "positives": float(surv[test][is_pos].mean())},
        "coarse_tradeoff": sim,
        "coarse_limits": coarse_limits(ft, S128, Fexh, sp, fx.background, cal.rerank_k, cal.fine, budget),
        "low_content": {"detected": int(lc.sum()),
                        "of_low_content_uploads": int(sum(lc[i] for i, k in enumerate(sp.kind) if k.startswith("low_content/"))),
                        "low_content_uploads": int(sum(k.startswith("low_content/") for k in sp.kind)),
                        "photo_queries_marked": int(sum(lc[i] for i, k in enumerate(sp.kind) if k == "photo")),
                        "gallery_marked": int(ft.g_low_content.sum())},
        "per_edit": per_edit(Fn, sp, bench, cal.fine),
        "diagnostics_512d_by_query_size": diagnostics(ft, sp),
    }


def write_outputs(out: Path, m: dict[str, Any], sp: Split, scores: dict[str, np.ndarray]) -> None:
    preds = {name: topk_rows(sp.qids, sp.gids, S, list(range(len(sp.qids))), name) for name, S in scores.items()}
    preds["cascade"].to_parquet(out / "predictions.parquet", index=False)
    pd.concat([p for n, p in preds.items() if n != "cascade"]).to_parquet(out / "baseline_predictions.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    tset = {sp.qids[r] for r in sp.test}
    _plot(out / "pr_curve.png", {n: p[p["query_id"].isin(tset)] for n, p in preds.items()
                                 if n in ("cascade", "cascade_raw", "coarse128_only", "pdq")}, sp.gt(sp.test))
    (out / "report.md").write_text(report_md(m))


def _plot(path: Path, preds: dict[str, pd.DataFrame], gt: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, p in preds.items():
        c = M.pr_curve(p["query_id"].tolist(), p["reference_id"].tolist(), p["score"].to_numpy(), gt)
        ap = M.micro_ap(p["query_id"].tolist(), p["reference_id"].tolist(), p["score"].to_numpy(), gt)
        ax.plot(c.recall, c.precision, label=f"{name} (µAP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quality_table(m: dict[str, Any]) -> list[str]:
    lines = ["| method | µAP | recall@1 | recall @ P90 | recall at its threshold | precision there "
             "| false flags / unrelated upload |", "|---|---|---|---|---|---|---|"]
    rows = (("cascade + geometric verification (the job)", "cascade_verified"),) if "cascade_verified" in m else ()
    for name, key in (*rows, ("cascade, normalised, fine threshold alone", "cascade"), ("cascade, raw cosine", "cascade_raw"),
                      ("exhaustive 512-d, normalised", "exhaustive512"), ("exhaustive 512-d, raw", "exhaustive512_raw"),
                      ("128-d only (adapter 2 vs adapter 1)", "coarse128_only"), ("PDQ (perceptual hash)", "pdq")):
        r = m[key]
        op = r["operating_point"]
        lines.append(f"| {name} | {r['micro_ap']:.3f} | {r['recall_at_1']:.3f} | {r['recall_at_p90']:.3f} | "
                     f"{op['recall']:.3f} | {op['precision']:.3f} | {r['false_flags_per_unrelated_upload']:.4f} |")
    return lines


def _verification_lines(m: dict[str, Any]) -> list[str]:
    """The job's rule with geometric verification: its thresholds, false flags and per-edit recall."""
    if "cascade_verified" not in m:
        return []
    v, c = m["verification"], m["cascade_verified"]
    op = c["operating_point"]
    sure = "none (no scale tails in the card: the fine threshold alone decides)" if v["sure_threshold"] is None \
        else f"{v['sure_threshold']:.4f}"
    lines = [f"Geometric verification (the job's rule): fine ≥ {v['fine_threshold']:.4f}, and either the sure threshold "
             f"{sure} or verification; precision {op['precision']:.3f}, recall {op['recall']:.3f}; false flags: "
             f"{c['everyday_flagged']}/{c['everyday_uploads']} everyday, {c['photo_negatives_flagged']}/{c['photo_negatives']} "
             f"unrelated photos, {c['low_content_flagged']}/{c['low_content_uploads']} low-content.", "",
             "| edit | queries | recall at threshold, fine alone | with verification |", "|---|---|---|---|"]
    for e, d in m["per_edit"].items():
        dv = m["per_edit_verified"].get(e, {})
        lines.append(f"| {e} | {d['queries']} | {d['recall_at_threshold']:.3f} | {dv.get('recall_at_threshold', float('nan')):.3f} |")
    if m.get("scale"):
        lines += ["", "At scale (expected per unrelated upload, from the card's measured tails; `modscan bench scale`):", "",
                  "| references | fine | sure | survivors | verified | false flags | false flags, fine alone | copy recall |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['references']:,} | {r['fine']:.3f} | {r['sure']:.3f} | {r['survivors']:.1%} | {r['verified']:.2%} "
                  f"| {r['false_flags']:.2e} | {r['false_flags_fine_alone']:.1%} | "
                  f"{'-' if r['copy_recall'] is None else format(r['copy_recall'], '.3f')} |" for r in m["scale"]]
    return [*lines, ""]


def report_md(m: dict[str, Any]) -> str:
    b, t, c = m["benchmark"], m["thresholds"], m["cascade"]
    op, s, lc = c["operating_point"], m["coarse_survivors"], m["low_content"]
    lines = [
        f"# modscan evaluation: model `{m['model']}` ({m['precision']})", "",
        f"Gallery {b['gallery']} images; {b['queries']} queries ({b['positives']} positive, {b['negatives']} negative, "
        f"of which {b['everyday_uploads']} generated everyday uploads and {b['low_content_uploads']} low-content); "
        f"calibrated on {b['calibration_queries']} queries, metrics on the other {b['test_queries']}.", "",
        *_quality_table(m), "", *_verification_lines(m),
        f"Thresholds: coarse ≥ {t['coarse']} (flag parity, budget {t['coarse_flag_budget']}), fine ≥ {t['fine']} "
        f"on the normalised score (beta {t['norm']['beta']}, k {t['norm']['k']}; raw-cosine threshold would be "
        f"{t['fine_raw']}), target precision {t['target_precision']}.",
        f"Operating point: precision {op['precision']:.3f}, recall {op['recall']:.3f}; false flags: "
        f"{c['everyday_flagged']}/{c['everyday_uploads']} unrelated everyday uploads, "
        f"{c['photo_negatives_flagged']}/{c['photo_negatives']} unrelated photo queries, "
        f"{c['low_content_flagged']}/{c['low_content_uploads']} low-content uploads.",
        f"Low content: {lc['of_low_content_uploads']}/{lc['low_content_uploads']} low-content uploads detected; "
        f"{lc['photo_queries_marked']} photo queries and {lc['gallery_marked']} references marked low content.",
        f"Coarse survivors (get the high-res pass): {s['all_test']:.1%} of test queries; photo negatives "
        f"{s['photo_negatives']:.1%}, everyday uploads {s['everyday']:.1%}, positives {s['positives']:.1%}.",
        "", "The coarse threshold's price (test half, simulated exactly; flags = true flags vs exhaustive search):", "",
        "| coarse threshold | survivors | negatives surviving | flags kept | true flags | false flags | recall@1 |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['coarse_threshold']:.3f} | {r['survivors']:.1%} | {r['negatives_surviving']:.1%} | {r['flags_kept']:.3f} "
          f"| {r['true_flags']}/{r['exhaustive_true_flags']} | {r['false_flags']} | {r['recall_at_1']:.3f} |"
          for r in m["coarse_tradeoff"]],
        "", "What limits the coarse stage: survivors at each coarse score's own flag parity:", "",
        "| coarse score | survivors | negatives surviving | flags kept |", "|---|---|---|---|",
        *[f"| {r['coarse_score']} | {r['survivors']:.1%} | {r['negatives_surviving']:.1%} | {r['flags_kept']:.3f} |"
          for r in m["coarse_limits"]],
        "", "512-d diagnostics by query size (test positives):", "",
        "| query size | recall@1 | true-pair cosine (median) |", "|---|---|---|",
        *[f"| {k} | {v['recall_at_1']:.3f} | {v['true_pair_cosine_median']:.3f} |"
          for k, v in m["diagnostics_512d_by_query_size"].items()],
        "", "Ablation (each calibrated on the calibration half, measured on the test half):", "",
        "| variant | µAP | recall @ P90 | recall at op. point | precision | false flags / unrelated upload |",
        "|---|---|---|---|---|---|",
        *[f"| {r['variant']} | {r['micro_ap']:.3f} | {r['recall_at_p90']:.3f} | {r['recall_at_operating_point']:.3f} "
          f"| {r['precision']:.3f} | {r['false_flags_per_unrelated_upload']:.4f} |" for r in m["ablation"]],
        "", "| edit | queries | recall@1 | recall at threshold |", "|---|---|---|---|",
        *[f"| {e} | {d['queries']} | {d['recall_at_1']:.3f} | {d['recall_at_threshold']:.3f} |"
          for e, d in m["per_edit"].items()],
        "", "![PR curves](pr_curve.png)", ""]
    return "\n".join(lines)


def card_update(m: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(thresholds, metrics) to store in a model card from an evaluation's metrics."""
    t = m["thresholds"]
    thresholds = {"coarse": t["coarse"], "fine": t["fine"], "rerank_k": t["rerank_k"], "norm": t["norm"]}
    keep = ("benchmark", "cascade", "cascade_verified", "verification", "cascade_raw", "exhaustive512", "coarse128_only",
            "pdq", "thresholds", "coarse_survivors", "low_content", "diagnostics_512d_by_query_size")
    return thresholds, {k: m[k] for k in keep if k in m}
