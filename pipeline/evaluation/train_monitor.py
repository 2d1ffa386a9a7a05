"""Stage-1 monitor: retrieval quality of the 512-d feature on a built evaluation benchmark.

``modscan train --monitor-photos DIR`` passes :func:`stage1_monitor` to the trainer, which calls it
before stage 1 and after every ``monitor_every`` epochs and stops stage 1 at the plateau (keeping
the best epoch). The benchmark is the one ``modscan evaluate --photos DIR --seed N`` builds
(edited copies, unrelated photos, everyday graphics), decoded once by the production decoder. The
monitored ``metric`` is the mean µAP of the two query passes stage 1 trains for: the low-res query
(what the coarse adapter is distilled from) and the high-res query (the fine one) against high-res
references. Only the 512-d head is needed, so it runs before the adapters exist.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.descriptor import DescriptorModel
from models.preprocess import batched_features
from pipeline.evaluation import retrieval_metrics as M
from pipeline.evaluation.benchmark import built_benchmark
from pipeline.ingest.decode import DecodeConfig, Decoder


def _fine_features(model: DescriptorModel, arrays: np.ndarray) -> np.ndarray:
    return batched_features(model.rerank_features, arrays, device=next(model.parameters()).device).numpy()


def _top1_predictions(S: np.ndarray, qids: list[str], gids: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    j = S.argmax(1)
    return qids, [gids[k] for k in j], S[np.arange(len(qids)), j]


def stage1_monitor(photos: str | Path, model: DescriptorModel, seed: int = 0,
                   workdir: str | Path | None = None) -> Callable[[DescriptorModel], dict[str, float]]:
    """Build and decode the benchmark once for ``model``'s resolutions; -> ``model -> metrics``."""
    out = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="modscan-monitor-"))
    bench = built_benchmark(str(photos), out, seed)
    dec = Decoder(DecodeConfig.for_model(model.config))
    gids, qids = sorted(bench.gallery), sorted(bench.queries)
    g = dec.decode_all([bench.gallery[x].read_bytes() for x in gids])
    q = dec.decode_all([bench.queries[x].read_bytes() for x in qids])
    gt = dict(bench.gt)

    def measure(m: DescriptorModel) -> dict[str, float]:
        was_training = m.training
        m.eval()
        try:
            g512 = _fine_features(m, g["high"])
            res = {}
            for name, arrays in (("low", q["low"]), ("high", q["high"])):
                preds = _top1_predictions(_fine_features(m, arrays) @ g512.T, qids, gids)
                res[f"uap_{name}"] = M.micro_ap(*preds, gt)
                res[f"recall1_{name}"] = M.recall_at_1(*preds, gt)
            res["metric"] = (res["uap_low"] + res["uap_high"]) / 2
            return res
        finally:
            m.train(was_training)

    return measure
