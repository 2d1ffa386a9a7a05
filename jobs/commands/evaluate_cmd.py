"""``modscan evaluate``: build or read a benchmark, run :func:`pipeline.evaluation.evaluate.evaluate`, print the
report, and optionally store the calibrated thresholds and headline metrics in the model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UsageError


def run(a: argparse.Namespace) -> int:
    from pipeline.evaluation.benchmark import built_benchmark, prepared_benchmark
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.evaluation.report import card_update

    out = Path(a.out)
    if a.photos:
        if a.gallery or a.queries or a.ground_truth:
            raise UsageError("modscan evaluate: use either --photos or --gallery/--queries/--ground-truth")
        bench = built_benchmark(a.photos, out, a.seed, queries_per_image=a.queries_per_image,
                                everyday=a.everyday_uploads)
    elif a.gallery and a.queries and a.ground_truth:
        bench = prepared_benchmark(a.gallery, a.queries, a.ground_truth)
    else:
        raise UsageError("modscan evaluate: need --photos DIR, or --gallery DIR --queries DIR --ground-truth CSV")
    m = evaluate(bench, out, a.model, a.seed, a.target_precision, coarse_flag_budget=a.coarse_flag_budget,
                 precision=a.precision)
    print((out / "report.md").read_text())
    if a.write_thresholds:
        from models.card import DEFAULT_MODEL_DIR, read_card, write_card

        d = a.model or DEFAULT_MODEL_DIR
        card = read_card(d)
        card.thresholds, card.metrics = card_update(m)
        write_card(d, card)
        print(f"thresholds written to {Path(d) / 'model_card.json'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="copy-detection metrics, cascade vs exhaustive vs PDQ")
    p.add_argument("--photos", default=None, help="mode 2: build a benchmark from a photo folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries-per-image", type=int, default=4,
                   help="mode 2: edited queries per reference and per negative photo")
    p.add_argument("--gallery", default=None, help="mode 1: folder of reference images")
    p.add_argument("--queries", default=None, help="mode 1: folder of query images")
    p.add_argument("--ground-truth", default=None, help="mode 1: CSV query_id,reference_id")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--target-precision", type=float, default=0.99)
    p.add_argument("--coarse-flag-budget", type=float, default=0.01,
                   help="share of exhaustive search's true flags the coarse stage may lose (calibration half)")
    p.add_argument("--everyday-uploads", type=int, default=200,
                   help="mode 2: generated unrelated everyday uploads added as negative queries")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model trunk precision (auto: bf16 on CUDA or a CPU with native bf16, else fp32)")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the calibrated thresholds in the model card")
    p.set_defaults(fn=run)
