"""``modscan evaluate``: copy-detection metrics of the full cascade, with baselines side by side.

Two modes:

* **prepared** — ``--gallery DIR --queries DIR --ground-truth CSV``: image ids are file stems; the
  CSV has columns ``query_id,reference_id``; an empty reference (or a query absent from the CSV)
  is a negative.
* **built** — ``--photos DIR --seed N``: photos are split into gallery references, gallery
  distractors and negatives; every reference and negative yields edited queries from the named
  edit suite (:data:`models.augment.EDITS`, 1-3 edits each), deterministic for a seed.

Queries are split (by seed) into a calibration half, on which the coarse and fine thresholds are
calibrated for ``--target-precision``, and a test half, on which every metric is reported. The
cascade predictions come from a real gallery version written to ``OUT/gallery`` and queried with
:meth:`pipeline.gallery.GalleryIndex.candidates` — the production code path.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.augment import apply_named, random_edit_names
from pipeline import metrics as M

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TOPK = 10


class GroundTruthError(ValueError):
    pass


@dataclass
class Benchmark:
    gallery: dict[str, Path]            # reference/distractor id -> file
    queries: dict[str, Path]            # query id -> file
    gt: dict[str, str]                  # positive query id -> reference id
    edits: dict[str, list[str]]         # query id -> edit names (empty for prepared data)


def _images(d: str | Path) -> dict[str, Path]:
    p = Path(d)
    if not p.is_dir():
        raise FileNotFoundError(f"not a folder: {p}")
    out: dict[str, Path] = {}
    for f in sorted(p.rglob("*")):
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
            if f.stem in out:
                raise GroundTruthError(f"two images share the id {f.stem!r}: {out[f.stem]} and {f}")
            out[f.stem] = f
    if not out:
        raise FileNotFoundError(f"no images in {p}")
    return out


def read_ground_truth(path: str | Path, queries: set[str], references: set[str]) -> dict[str, str]:
    """Validate the CSV; every problem is reported with its line number."""
    errors: list[str] = []
    gt: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["query_id", "reference_id"]:
            raise GroundTruthError(f"{path}:1: header must be exactly 'query_id,reference_id', got {header!r}")
        seen: set[str] = set()
        for ln, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                errors.append(f"{path}:{ln}: expected 2 columns, got {len(row)}: {row!r}")
                continue
            q, r = row[0].strip(), row[1].strip()
            if not q:
                errors.append(f"{path}:{ln}: empty query_id")
                continue
            if q in seen:
                errors.append(f"{path}:{ln}: query {q!r} listed twice")
                continue
            seen.add(q)
            if q not in queries:
                errors.append(f"{path}:{ln}: query {q!r} has no image in the queries folder")
            if r and r not in references:
                errors.append(f"{path}:{ln}: reference {r!r} has no image in the gallery folder")
            if r:
                gt[q] = r
    if errors:
        raise GroundTruthError(f"{len(errors)} error(s) in ground truth:\n" + "\n".join(errors[:50]))
    return gt


def prepared_benchmark(gallery: str, queries: str, ground_truth: str) -> Benchmark:
    g, q = _images(gallery), _images(queries)
    gt = read_ground_truth(ground_truth, set(q), set(g))
    return Benchmark(g, q, gt, {k: [] for k in q})


def built_benchmark(photos: str, out: Path, seed: int, queries_per_image: int = 4,
                    split: tuple[float, float] = (0.4, 0.3)) -> Benchmark:
    """Split photos into references / distractors / negatives and write edited queries."""
    from PIL import Image

    files = sorted(_images(photos).items())
    rng = random.Random(seed)
    rng.shuffle(files)
    n_ref, n_dis = int(len(files) * split[0]), int(len(files) * split[1])
    refs, dis, negs = files[:n_ref], files[n_ref:n_ref + n_dis], files[n_ref + n_dis:]
    qdir = out / "queries"
    qdir.mkdir(parents=True, exist_ok=True)
    queries: dict[str, Path] = {}
    gt: dict[str, str] = {}
    edits: dict[str, list[str]] = {}
    for kind, group in (("pos", refs), ("neg", negs)):
        for stem, path in group:
            with Image.open(path) as im:
                src = im.convert("RGB")
            for j in range(queries_per_image):
                names = random_edit_names(rng)
                qid = f"q-{kind}-{stem}-{j}"
                apply_named(src, names, rng).save(qdir / f"{qid}.jpg", quality=90)
                queries[qid] = qdir / f"{qid}.jpg"
                edits[qid] = names
                if kind == "pos":
                    gt[qid] = stem
    return Benchmark(dict(refs + dis), queries, gt, edits)


def _split(ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Deterministic half split by a salted hash (calibration, test)."""
    h = lambda q: hashlib.sha256(f"{seed}:{q}".encode()).digest()[0]  # noqa: E731
    cal = [q for q in ids if h(q) % 2 == 0]
    test = [q for q in ids if h(q) % 2 == 1]
    return cal, test


def _features(paths: list[Path], fx: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Decode like production -> (f128 adapter1 high, f512, f128 adapter2 low, ok mask, seconds)."""
    from pipeline.decode import DecodeConfig, Decoder

    c = fx.config
    dec = Decoder(DecodeConfig(low_res=c.low_res, high_res=c.high_res))
    lows, highs, oks = [], [], []
    for p in paths:
        r = dec.decode_one(p.read_bytes())
        lows.append(r["low"])
        highs.append(r["high"])
        oks.append(r["ok"])
    t = time.perf_counter()
    low, high = np.stack(lows), np.stack(highs)
    g128, f512 = fx.gallery(high)
    q128 = fx.query_coarse(low)
    return g128, f512, q128, np.asarray(oks), time.perf_counter() - t


def _pdq(paths: list[Path]) -> np.ndarray:
    """PDQ hashes as ``(n, 256)`` bool (pdqhash; quality is ignored)."""
    import pdqhash
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            a = np.ascontiguousarray(np.asarray(im.convert("RGB")))
        h, _q = pdqhash.compute(a)
        out.append(np.asarray(h, dtype=bool))
    return np.stack(out)


def _topk_rows(qids: list[str], gids: list[str], D: np.ndarray, I: np.ndarray, stage: str) -> pd.DataFrame:
    rows = []
    for qi, q in enumerate(qids):
        for rank, (s, j) in enumerate(zip(D[qi], I[qi])):
            if j < 0 or not np.isfinite(s):
                continue
            rows.append((q, gids[j], float(s), rank + 1, stage))
    return pd.DataFrame(rows, columns=["query_id", "reference_id", "score", "rank", "stage"])


def _coarse_separation(S128: np.ndarray, test_rows: list[int], truth: dict[int, int]) -> dict[str, float | None]:
    """How far the 128-d stage separates true pairs from non-matching queries (test half);
    ``truth`` maps a positive query row to its reference's gallery column."""
    neg_best = np.asarray([S128[r].max() for r in test_rows if r not in truth]) if S128.shape[1] else np.zeros(0)
    true = np.asarray([S128[r, c] for r, c in truth.items()])
    q = lambda a, p: round(float(np.quantile(a, p)), 4) if len(a) else None  # noqa: E731
    return {"negative_best_median": q(neg_best, 0.5), "negative_best_p05": q(neg_best, 0.05),
            "true_pair_min": q(true, 0.0), "true_pair_p05": q(true, 0.05), "true_pair_median": q(true, 0.5)}


def _coarse_tradeoff(S128: np.ndarray, S512: np.ndarray, test_rows: list[int], truth: dict[int, int],
                     thresholds: list[float], k: int, fine: float) -> list[dict[str, float]]:
    """The coarse threshold's price, simulated exactly on the test half: for each threshold, the
    share of queries that would get the high-res pass and the cascade's recall@1 (candidates = the
    coarse top-``k`` at or above the threshold, best 512-d score among them wins)."""
    rows_t = np.asarray(test_rows, dtype=np.int64)
    out: list[dict[str, float]] = []
    if not len(rows_t) or not S128.shape[1]:
        return out
    C, F = S128[rows_t], S512[rows_t]
    kth = -np.sort(-C, axis=1)[:, min(k, C.shape[1]) - 1][:, None]
    is_pos = np.asarray([r in truth for r in rows_t])
    true_col = np.asarray([truth.get(int(r), -1) for r in rows_t])
    exh = (np.argmax(F, axis=1) == true_col) & is_pos
    exh_flag = exh & (F.max(axis=1) >= fine)
    for t in thresholds:
        cand = (C >= t) & (C >= kth)
        surv = cand.any(axis=1)
        best = np.argmax(np.where(cand, F, -np.inf), axis=1)
        hit = surv & (best == true_col) & is_pos
        flag = hit & (F[np.arange(len(F)), best] >= fine)
        out.append({"coarse_threshold": round(float(t), 4), "survivors": round(float(surv.mean()), 4),
                    "negatives_surviving": round(float(surv[~is_pos].mean()), 4) if (~is_pos).any() else 0.0,
                    "recall_at_1": round(float(hit[is_pos].mean()), 4) if is_pos.any() else 0.0,
                    "vs_exhaustive_points": round(100 * float(hit[is_pos].mean() - exh[is_pos].mean()), 2)
                    if is_pos.any() else 0.0,
                    "recall_at_fine_threshold": round(float(flag[is_pos].mean()), 4) if is_pos.any() else 0.0,
                    "flags_vs_exhaustive_points": round(100 * float(flag[is_pos].mean() - exh_flag[is_pos].mean()), 2)
                    if is_pos.any() else 0.0})
    return out


def _metrics(pred: pd.DataFrame, gt: dict[str, str], negatives: list[str]) -> dict[str, float]:
    q, r, s = pred["query_id"].tolist(), pred["reference_id"].tolist(), pred["score"].to_numpy()
    rp, thr = M.recall_at_precision(q, r, s, gt, 0.9)
    return {"micro_ap": M.micro_ap(q, r, s, gt), "recall_at_1": M.recall_at_1(q, r, s, gt),
            "recall_at_p90": rp, "threshold_at_p90": thr}


COARSE_MARGIN = 0.10


def evaluate(bench: Benchmark, out: Path, model_dir: str | None = None, seed: int = 0,
             target_precision: float = 0.99, rerank_k: int = 500,
             coarse_margin: float = COARSE_MARGIN) -> dict[str, Any]:
    from models.card import read_card
    from pipeline.features import FeatureExtractor
    from pipeline.gallery import GalleryContent, GalleryIndex, write_version
    from pipeline.banks import Bank
    from pipeline.storage import open_store

    out.mkdir(parents=True, exist_ok=True)
    fx = FeatureExtractor(model_dir)
    card = read_card(model_dir)
    gids = sorted(bench.gallery)
    qids = sorted(bench.queries)
    t0 = time.perf_counter()
    g128, g512, _, gok, g_sec = _features([bench.gallery[g] for g in gids], fx)
    _, q512, q128, qok, q_sec = _features([bench.queries[q] for q in qids], fx)
    t_feat = time.perf_counter() - t0
    if not gok.all() or not qok.all():
        bad = [g for g, o in zip(gids, gok) if not o] + [q for q, o in zip(qids, qok) if not o]
        raise ValueError(f"undecodable images in the benchmark: {bad[:10]}")
    cal, test = _split(qids, seed)
    idx = {q: i for i, q in enumerate(qids)}
    negatives_all = [q for q in qids if q not in bench.gt]

    # -- exhaustive 512-d and 128-d-only baselines (exact inner product) ---------------------
    t = time.perf_counter()
    S512 = q512 @ g512.T
    t_exh = time.perf_counter() - t
    S128 = q128 @ g128.T
    k = min(TOPK, len(gids))
    I512 = np.argsort(-S512, axis=1)[:, :k]
    I128 = np.argsort(-S128, axis=1)[:, :k]
    exh = _topk_rows(qids, gids, np.take_along_axis(S512, I512, 1), I512, "exhaustive512")
    only128 = _topk_rows(qids, gids, np.take_along_axis(S128, I128, 1), I128, "coarse128")

    # -- calibration (on the calibration half) ----------------------------------------------
    gt_cal = {q: r for q, r in bench.gt.items() if q in set(cal)}
    neg_cal = [q for q in cal if q not in bench.gt]
    exh_cal = exh[exh["query_id"].isin(cal)]
    fine_thr = M.threshold_for_precision(exh_cal["query_id"].tolist(), exh_cal["reference_id"].tolist(),
                                         exh_cal["score"].to_numpy(), gt_cal, target_precision, neg_cal)
    # Coarse threshold (recall parity): below the lowest coarse score of any calibration true pair
    # that exhaustive 512-d search ranks first, minus a margin for the unseen tail, so that the
    # cascade keeps what exhaustive search finds; everything below it stops after the cheap stage.
    # (An earlier rule, the 0.5 % quantile minus 0.02, lost ~2 % of those pairs on the test half.)
    gpos = {g: i for i, g in enumerate(gids)}
    true_coarse = np.asarray([S128[idx[q], gpos[r]] for q, r in gt_cal.items()
                              if gids[int(np.argmax(S512[idx[q]]))] == r])
    coarse_thr = float(true_coarse.min() - coarse_margin) if len(true_coarse) else float(card.thresholds["coarse"])

    # -- the cascade through a real gallery version ----------------------------------------
    gstore = open_store(str(out / "gallery"), create=True)
    for d in ("CURRENT",):
        gstore.delete_file(d)
    gstore.delete_dir("versions")
    now = pd.Timestamp.now(tz="UTC")
    entries = pd.DataFrame({"id": np.arange(len(gids), dtype=np.int64), "bank": "eval", "category": "eval",
                            "action": "filter", "source_uri": [str(bench.gallery[g]) for g in gids],
                            "sha256": [f"id:{g}" for g in gids], "added_at": now})
    card_eval = read_card(model_dir)
    card_eval.thresholds = {"coarse": coarse_thr, "fine": fine_thr, "rerank_k": rerank_k}
    content = GalleryContent(np.arange(len(gids), dtype=np.int64), g128, g512, entries,
                             {"eval": Bank("eval", str(out), "eval", "filter")})
    write_version(gstore, content, card_eval, n_shards=4, rerank_dtype="float16")
    gal = GalleryIndex.load(gstore, model_id=card.version_id)
    t = time.perf_counter()
    D, I, Fs, surv = gal.candidates(q128, lambda rows: q512[rows])
    t_cascade = time.perf_counter() - t
    order = np.argsort(-Fs, axis=1)[:, :k]
    casc = _topk_rows(qids, gids, np.take_along_axis(Fs, order, 1), np.take_along_axis(I, order, 1), "cascade")
    casc["stage"] = "fine"

    # -- PDQ baseline ------------------------------------------------------------------------
    t = time.perf_counter()
    hg = _pdq([bench.gallery[g] for g in gids])
    hq = _pdq([bench.queries[q] for q in qids])
    ham = (hq[:, None, :] != hg[None, :, :]).sum(axis=2)
    Spdq = 1.0 - ham / 256.0
    Ipdq = np.argsort(-Spdq, axis=1, kind="stable")[:, :k]
    pdq = _topk_rows(qids, gids, np.take_along_axis(Spdq, Ipdq, 1), Ipdq, "pdq")
    t_pdq = time.perf_counter() - t

    # -- metrics on the test half --------------------------------------------------------------
    tset = set(test)
    gt_test = {q: r for q, r in bench.gt.items() if q in tset}
    neg_test = [q for q in test if q not in bench.gt]
    sel = lambda p: p[p["query_id"].isin(tset)]  # noqa: E731
    m_casc, m_exh, m_128, m_pdq = (_metrics(sel(p), gt_test, neg_test) for p in (casc, exh, only128, pdq))
    ct = sel(casc)
    op = M.operating_point(ct["query_id"].tolist(), ct["reference_id"].tolist(), ct["score"].to_numpy(),
                           gt_test, neg_test, fine_thr)
    # per-edit recall@1 of the cascade, at any score and at the operating threshold
    b = M.top1(ct["query_id"].tolist(), ct["reference_id"].tolist(), ct["score"].to_numpy())
    per_edit: dict[str, dict[str, float]] = {}
    for q, r in gt_test.items():
        names = bench.edits.get(q) or ["(none)"]
        keys = set(names) | {f"{len(names)} edit(s)"}
        for e in keys:
            d = per_edit.setdefault(e, {"queries": 0, "recall_at_1": 0, "recall_at_threshold": 0})
            d["queries"] += 1
            hit = q in b and b[q][0] == r
            d["recall_at_1"] += int(hit)
            d["recall_at_threshold"] += int(hit and b[q][1] >= fine_thr)
    for d in per_edit.values():
        d["recall_at_1"] = round(d["recall_at_1"] / d["queries"], 4)
        d["recall_at_threshold"] = round(d["recall_at_threshold"] / d["queries"], 4)
    test_rows = [idx[q] for q in test]
    test_truth = {idx[q]: gpos[r] for q, r in gt_test.items()}  # positive query row -> reference column
    surv_test = surv[test_rows]
    is_neg = np.asarray([q not in bench.gt for q in test])
    metrics = {
        "model": card.version_id,
        "benchmark": {"gallery": len(gids), "queries": len(qids), "positives": len(bench.gt),
                      "negatives": len(negatives_all), "calibration_queries": len(cal), "test_queries": len(test),
                      "seed": seed},
        "thresholds": {"coarse": round(coarse_thr, 4), "fine": round(fine_thr, 4), "rerank_k": rerank_k,
                       "target_precision": target_precision, "coarse_margin": coarse_margin,
                       "coarse_calibration_pairs": int(len(true_coarse)),
                       "coarse_min_true_pair": round(float(true_coarse.min()), 4) if len(true_coarse) else None},
        "cascade": m_casc, "exhaustive512": m_exh, "coarse128_only": m_128, "pdq": m_pdq,
        "operating_point": op,
        "cascade_vs_exhaustive_recall_at_1_points": round(100 * (m_casc["recall_at_1"] - m_exh["recall_at_1"]), 3),
        "descriptor_vs_pdq_micro_ap": round(m_casc["micro_ap"] - m_pdq["micro_ap"], 4),
        "coarse_survivors": {"all_test": float(surv_test.mean()) if len(test) else 0.0,
                             "negatives": float(surv_test[is_neg].mean()) if is_neg.any() else 0.0,
                             "positives": float(surv_test[~is_neg].mean()) if (~is_neg).any() else 0.0},
        "coarse_separation": _coarse_separation(S128, test_rows, test_truth),
        "coarse_tradeoff": _coarse_tradeoff(S128, S512, test_rows, test_truth,
                                            sorted({round(coarse_thr, 4), 0.3, 0.4, 0.5, 0.6, 0.7}), rerank_k, fine_thr),
        "per_edit": dict(sorted(per_edit.items())),
        "timings_seconds": {"features_total": round(t_feat, 3), "model_gallery": round(g_sec, 3),
                            "model_queries": round(q_sec, 3), "cascade_search": round(t_cascade, 4),
                            "exhaustive512_search": round(t_exh, 4), "pdq_hash_and_search": round(t_pdq, 3)},
    }
    casc.to_parquet(out / "predictions.parquet", index=False)
    pd.concat([exh, only128, pdq]).to_parquet(out / "baseline_predictions.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot(out / "pr_curve.png", {"cascade": sel(casc), "exhaustive 512-d": sel(exh), "128-d only": sel(only128),
                                  "PDQ": sel(pdq)}, gt_test)
    (out / "report.md").write_text(report_md(metrics))
    return metrics


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


def report_md(m: dict[str, Any]) -> str:
    b, t = m["benchmark"], m["thresholds"]
    lines = [
        f"# modscan evaluation: model `{m['model']}`", "",
        f"Gallery {b['gallery']} images; {b['queries']} queries ({b['positives']} positive, {b['negatives']} negative); "
        f"thresholds calibrated on {b['calibration_queries']} queries, metrics on the other {b['test_queries']} (seed {b['seed']}).",
        "", "| method | µAP | recall@1 | recall @ precision 0.9 |", "|---|---|---|---|",
    ]
    for name, key in (("cascade (128-d coarse + 512-d rerank)", "cascade"), ("exhaustive 512-d", "exhaustive512"),
                      ("128-d only (adapter 2 vs adapter 1)", "coarse128_only"), ("PDQ (perceptual hash)", "pdq")):
        r = m[key]
        lines.append(f"| {name} | {r['micro_ap']:.3f} | {r['recall_at_1']:.3f} | {r['recall_at_p90']:.3f} |")
    op = m["operating_point"]
    s = m["coarse_survivors"]
    lines += ["",
              f"Operating point (coarse ≥ {t['coarse']}, fine ≥ {t['fine']}, target precision {t['target_precision']}): "
              f"precision {op['precision']:.3f}, recall {op['recall']:.3f}, "
              f"false positives per negative query {op['false_positives_per_negative_query']:.3f}.",
              f"Cascade − exhaustive recall@1: {m['cascade_vs_exhaustive_recall_at_1_points']:+.2f} points; "
              f"descriptor − PDQ µAP: {m['descriptor_vs_pdq_micro_ap']:+.3f}.",
              f"Queries surviving the coarse stage: {s['all_test']:.1%} (negatives {s['negatives']:.1%}, positives {s['positives']:.1%}).",
        "Coarse (128-d) separation on the test half: " + ", ".join(f"{k} {v}" for k, v in m["coarse_separation"].items()) + ".",
        "", "What the coarse threshold costs (test half, simulated exactly): share of queries that get the "
        "high-res pass vs the cascade's recall@1.", "",
        "| coarse threshold | survivors | negatives surviving | recall@1 | vs exhaustive (points) "
        "| recall at the fine threshold (flags) | vs exhaustive (points) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['coarse_threshold']:.3f} | {r['survivors']:.1%} | {r['negatives_surviving']:.1%} | "
          f"{r['recall_at_1']:.3f} | {r['vs_exhaustive_points']:+.2f} | {r['recall_at_fine_threshold']:.3f} | "
          f"{r['flags_vs_exhaustive_points']:+.2f} |" for r in m["coarse_tradeoff"]],
              "", "| edit | queries | recall@1 | recall at threshold |", "|---|---|---|---|"]
    for e, d in m["per_edit"].items():
        lines.append(f"| {e} | {d['queries']} | {d['recall_at_1']:.3f} | {d['recall_at_threshold']:.3f} |")
    lines += ["", "![PR curves](pr_curve.png)", ""]
    return "\n".join(lines)


def cli_evaluate(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if a.photos:
        if a.gallery or a.queries or a.ground_truth:
            raise SystemExit("modscan evaluate: use either --photos or --gallery/--queries/--ground-truth")
        bench = built_benchmark(a.photos, out, a.seed, queries_per_image=a.queries_per_image)
    elif a.gallery and a.queries and a.ground_truth:
        bench = prepared_benchmark(a.gallery, a.queries, a.ground_truth)
    else:
        raise SystemExit("modscan evaluate: need --photos DIR, or --gallery DIR --queries DIR --ground-truth CSV")
    m = evaluate(bench, out, a.model, a.seed, a.target_precision)
    print((out / "report.md").read_text())
    if a.write_thresholds:
        from models.card import DEFAULT_MODEL_DIR, read_card, write_card

        d = a.model or DEFAULT_MODEL_DIR
        card = read_card(d)
        card.thresholds = {"coarse": m["thresholds"]["coarse"], "fine": m["thresholds"]["fine"],
                           "rerank_k": m["thresholds"]["rerank_k"]}
        card.metrics = {k: m[k] for k in ("benchmark", "cascade", "exhaustive512", "coarse128_only", "pdq",
                                          "operating_point", "thresholds")}
        write_card(d, card)
        print(f"thresholds written to {Path(d) / 'model_card.json'}")
    return 0
