"""``modscan evaluate``: build or read a benchmark, run :func:`pipeline.evaluation.evaluate.evaluate`, print the
report, and optionally store the calibrated thresholds and headline metrics in the model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.evaluation.benchmark import built_benchmark, prepared_benchmark
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.report import card_update


def run(a: argparse.Namespace) -> int:
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
