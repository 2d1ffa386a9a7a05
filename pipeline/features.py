"""Feature extraction around the descriptor: uint8 arrays in, float32 unit vectors out.

One object owns the model on its device (GPU when present) and exposes the three calls the
cascade needs, plus the model's background bank for score normalisation. Inference runs under
``torch.inference_mode`` in fixed-size micro-batches so that memory is bounded whatever batch Ray
hands over, in the precision asked for (``auto``: bf16 autocast + channels_last on CUDA or on a CPU
with native bf16, fp32 elsewhere; see :mod:`models.precision`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from models.card import BackgroundBank, load_background, load_model
from models.descriptor import DescriptorConfig, pick_device
from models.precision import Precision
from models.preprocess import batched_features

log = logging.getLogger(__name__)


class FeatureExtractor:
    """Loads a verified model once; ``query_coarse`` / ``fine_features`` / ``gallery`` on uint8 arrays."""

    def __init__(self, model_dir: str | None = None, device: str | None = None,
                 micro_batch: int = 64, threads: int | None = None, precision: str = "auto") -> None:
        self.device = pick_device(device)
        if threads or os.environ.get("MODSCAN_TORCH_THREADS"):
            torch.set_num_threads(int(threads or os.environ["MODSCAN_TORCH_THREADS"]))
        self.model, self.card = load_model(model_dir, self.device)
        self.precision: Precision = self.model.set_precision(precision, self.device)
        self.background: BackgroundBank | None = load_background(model_dir, self.card)
        self.micro_batch = micro_batch
        log.info("model %s on %s, precision %s", self.card.version_id, self.device, self.precision.value)

    @property
    def version_id(self) -> str:
        return self.card.version_id

    @property
    def config(self) -> DescriptorConfig:
        return self.card.config

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, dim: int) -> np.ndarray:
        return batched_features(lambda x: fn(x).float(), images, device=self.device, micro_batch=self.micro_batch,
                                dim=dim).numpy()

    def query_coarse(self, low: np.ndarray) -> np.ndarray:
        """``(B, l, l, 3)`` uint8 low-res -> ``(B, coarse_dim)`` via adapter 2."""
        return self._run(self.model.query_coarse, low, self.config.coarse_dim)

    def fine_features(self, high: np.ndarray) -> np.ndarray:
        """``(B, h, h, 3)`` uint8 high-res -> ``(B, rerank_dim)``: the fine (512-d) query features
        the cascade reranks coarse candidates with."""
        return self._run(self.model.rerank_features, high, self.config.rerank_dim)

    def gallery(self, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, h, h, 3)`` uint8 high-res -> (``(B, 128)`` adapter 1, ``(B, 512)``)."""
        cdim = self.config.coarse_dim
        f = self._run(lambda x: torch.cat(self.model.gallery_features(x), dim=1), high, cdim + self.config.rerank_dim)
        return np.ascontiguousarray(f[:, :cdim]), np.ascontiguousarray(f[:, cdim:])
