"""The single-stage baseline of ``modscan bench pipeline``: the job's Moderator with an exhaustive
512-d search for every decoded image instead of the cascade. Benchmark tooling only: the
production job never runs it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.moderation.moderator import Moderator


def single_stage_search(gallery: Any, xq512: np.ndarray) -> list[Any]:
    """Baseline without the cascade: exhaustive 512-d search of a loaded
    :class:`~pipeline.gallery.GalleryIndex` for every query, then the job's own normalisation
    and bank rules. -> one ``Match`` per query."""
    D, I = gallery.cascade.search_fine_exhaustive(xq512, min(gallery.params.rerank_k, max(1, gallery.cascade.ntotal)))
    F, offset = gallery.normalise(xq512, D)
    return gallery.decide(D, I, F, offset)


class SingleStageModerator(Moderator):
    """The job's Moderator with the benchmark's single-stage search: the high-res 512-d pass for
    every decoded image and :func:`single_stage_search`, no low-res coarse stage (every image is a
    "survivor"). Passed to :func:`jobs.runtime.run.moderate` as ``moderator``; the production job
    never runs it."""

    def search_rows(self, batch: dict[str, Any], rows: np.ndarray) -> tuple[dict[int, Any], dict[str, Any]]:
        timing: dict[str, Any] = {"model_coarse": 0.0, "search": 0.0, "model_rerank": 0.0, "survivors": len(rows)}
        if not len(rows):
            return {}, timing
        t = time.perf_counter()
        xq512 = self.fx.fine_features(batch["high"][rows])
        timing["model_rerank"] = time.perf_counter() - t
        t = time.perf_counter()
        decisions = single_stage_search(self.gallery, xq512)
        timing["search"] = time.perf_counter() - t
        return {int(r): d for r, d in zip(rows, decisions)}, timing
