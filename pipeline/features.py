"""Feature extraction around the descriptor: uint8 arrays in, float32 unit vectors out.

One object owns the model on its device (GPU when present) and exposes the three calls the
cascade needs. Inference runs under ``torch.inference_mode`` in fixed-size micro-batches so that
memory is bounded whatever batch Ray hands over.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from models.card import ModelCard, load_model, to_batch
from models.descriptor import pick_device


class FeatureExtractor:
    """Loads a verified model once; ``query_coarse`` / ``rerank`` / ``gallery`` on uint8 arrays."""

    def __init__(self, model_dir: str | None = None, device: str | None = None,
                 micro_batch: int = 64, threads: int | None = None) -> None:
        self.device = pick_device(device)
        if threads or os.environ.get("MODSCAN_TORCH_THREADS"):
            torch.set_num_threads(int(threads or os.environ["MODSCAN_TORCH_THREADS"]))
        self.model, self.card = load_model(model_dir, self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.micro_batch = micro_batch

    @property
    def version_id(self) -> str:
        return self.card.version_id

    @property
    def config(self):  # noqa: ANN201 - DescriptorConfig
        return self.card.config

    def _run(self, fn, images: np.ndarray) -> np.ndarray:  # noqa: ANN001
        outs = []
        with torch.inference_mode():
            for i in range(0, len(images), self.micro_batch):
                x = to_batch(images[i:i + self.micro_batch], self.device)
                if self.device.type == "cuda":
                    x = x.to(memory_format=torch.channels_last)
                outs.append(fn(x).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def query_coarse(self, low: np.ndarray) -> np.ndarray:
        """``(B, l, l, 3)`` uint8 low-res -> ``(B, coarse_dim)`` via adapter 2."""
        out = self._run(self.model.query_coarse, low)
        return out.reshape(len(low), self.card.config.coarse_dim)

    def rerank(self, high: np.ndarray) -> np.ndarray:
        """``(B, h, h, 3)`` uint8 high-res -> ``(B, rerank_dim)``."""
        out = self._run(self.model.rerank_features, high)
        return out.reshape(len(high), self.card.config.rerank_dim)

    def gallery(self, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, h, h, 3)`` uint8 high-res -> (``(B, 128)`` adapter 1, ``(B, 512)``)."""
        cdim, rdim = self.card.config.coarse_dim, self.card.config.rerank_dim
        f = self._run(lambda x: torch.cat(self.model.gallery_features(x), dim=1), high)
        f = f.reshape(len(high), cdim + rdim)
        return np.ascontiguousarray(f[:, :cdim]), np.ascontiguousarray(f[:, cdim:])


def model_card(model_dir: str | None = None) -> ModelCard:
    from models.card import read_card

    return read_card(model_dir)
