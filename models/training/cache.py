"""The feature cache of stages 2 and 3: the frozen backbone's pooled features of ``cache_views``
augmented view triples per image, computed once and kept in ``checkpoints/pooled_cache-KEY.pt``.

The key hashes every setting that shapes the cache and the stage-1 weights it comes from, so a
changed setting builds a new cache and never reuses a stale one. The views are seeded, so the same
stage-1 weights give the same bytes (on the same machine and thread count).
"""

from __future__ import annotations

import hashlib
import json

import torch
from tqdm import tqdm

from models.preprocess import to_batch
from models.training.context import RunContext
from models.training.data import PairDataset, pair_loader

CACHE_LOG_STAGE = "cache"  # the ``stage`` of the cache's line in train_log.jsonl


class FeatureCache:
    """``get()`` -> ``(V*N, C)`` pooled features of gallery views (high res), of query views at low
    and at high res, and ``ids``; row ``v*N + i`` is view ``v`` of image ``i``. Read or built once
    per run."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self._pooled: dict[str, torch.Tensor] | None = None

    def key(self) -> str:
        """Hash of every setting that shapes the cache, and of the stage-1 weights it comes from."""
        run = self.run
        cfg = run.cfg
        h = hashlib.sha256()
        h.update(json.dumps({"views": cfg.cache_views, "n": len(run.images), "paths": [p.name for p in run.paths],
                             "synthetic": cfg.synthetic_images, "high": cfg.model.high_res, "low": cfg.model.low_res,
                             "seed": cfg.seed, "preload": cfg.preload_max_side,
                             "grayscale": cfg.query_grayscale}, sort_keys=True).encode())
        for k, v in sorted(run.model.state_dict().items()):
            if k.split(".")[0] in ("backbone", "pool"):
                h.update(v.detach().cpu().float().numpy().tobytes()[:4096])
        return h.hexdigest()[:16]

    def get(self) -> dict[str, torch.Tensor]:
        if self._pooled is not None:
            return self._pooled
        key = self.key()
        name = f"pooled_cache-{key}.pt"
        self._pooled = self.run.checkpoints.load(name)
        if self._pooled is None:
            self._pooled = self.build()
            self.run.checkpoints.save(name, self._pooled)
            self.run.log.write(CACHE_LOG_STAGE, key=key, views=self.run.cfg.cache_views,
                               rows=int(self._pooled["ids"].shape[0]))
        return self._pooled

    @torch.no_grad()
    def build(self) -> dict[str, torch.Tensor]:
        """The backbone's pass over every view (on every thread: its bytes do not vary run to run)."""
        run = self.run
        cfg, m = run.cfg, run.model
        m.eval()
        out: dict[str, list[torch.Tensor]] = {"gallery": [], "query_low": [], "query_high": [], "ids": []}
        ds = PairDataset(run.images, cfg.model.high_res, cfg.model.low_res, cfg.seed + 10_000, cfg.query_grayscale)
        for v in range(cfg.cache_views):
            ds.epoch = v
            for g, q_low, q_high, ids in tqdm(pair_loader(ds, 128, False, False, 0, cfg.workers),
                                              desc=f"caching pooled features {v + 1}/{cfg.cache_views}",
                                              unit="batch", leave=False):
                out["gallery"].append(m.pooled(to_batch(g, run.device)).cpu())
                out["query_low"].append(m.pooled(to_batch(q_low, run.device)).cpu())
                out["query_high"].append(m.pooled(to_batch(q_high, run.device)).cpu())
                out["ids"].append(torch.from_numpy(ids))
        return {k: torch.cat(v) for k, v in out.items()}
