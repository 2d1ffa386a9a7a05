"""The one resize and tensor conversion used by training, evaluation, gallery builds and the job.

Both squares are squashed (no crop: a copy detector must see the whole picture) with Pillow's
anti-aliased bilinear filter. The low-res square is made from the high-res one, so that a query's
two inputs are the same picture at two scales, and the second resize is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.descriptor import MEAN, STD

# File suffixes read as images, everywhere (training, gallery builds, evaluation, the job's
# prefix listing). HEIC/AVIF decode where the installed Pillow supports them; elsewhere such an
# upload becomes a `not_an_image` row and such a reference a rejected one: never silently skipped.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif")

_MEAN = np.asarray(MEAN, dtype=np.float32) * 255.0
_STD = np.asarray(STD, dtype=np.float32) * 255.0


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> ``(size, size, 3)`` uint8, bilinear (anti-aliased when shrinking)."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def resize_pair(img: Image.Image, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL image -> (``(low, low, 3)``, ``(high, high, 3)``) uint8; the low square from the high one."""
    hi = img.convert("RGB").resize((high, high), Image.Resampling.BILINEAR)
    lo = hi.resize((low, low), Image.Resampling.BILINEAR)
    return np.asarray(lo, dtype=np.uint8), np.asarray(hi, dtype=np.uint8)


def to_batch(arrays: np.ndarray | Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 (an array, or a sequence of ``(H, W, 3)``) -> normalised ``(B, 3, H, W)``
    float32 tensor on ``device``."""
    a = arrays if isinstance(arrays, np.ndarray) else np.stack(arrays)
    x = (a.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


def batched_features(fn: Callable[[torch.Tensor], torch.Tensor], images: Sequence[Any] | np.ndarray, *,
                     device: str | torch.device = "cpu", micro_batch: int = 64,
                     prepare: Callable[[Any], np.ndarray] | None = None, dim: int = 0,
                     desc: str | None = None) -> torch.Tensor:
    """``fn`` over ``images`` in micro-batches of ``micro_batch`` under ``torch.inference_mode``: the
    one way features are extracted in micro-batches (the job's extractor, training's background
    bank, the monitors and benchmarks), so memory stays bounded whatever the number of images.

    Each micro-batch is ``(B, H, W, 3)`` uint8 (each item through ``prepare`` first when given, e.g.
    a resize of a PIL image, so only one micro-batch of arrays exists at a time), normalised by
    :func:`to_batch` onto ``device``; ``fn``'s ``(B, ...)`` outputs are concatenated on the CPU.
    No images: ``(0, dim)`` float32. ``desc``: a progress bar over the micro-batches."""
    starts = range(0, len(images), micro_batch)
    outs = []
    with torch.inference_mode():
        for i in tqdm(starts, desc=desc, unit="batch", leave=False) if desc else starts:
            chunk = images[i:i + micro_batch]
            arrays = [prepare(x) for x in chunk] if prepare is not None else chunk
            outs.append(fn(to_batch(arrays, device)).cpu())
    return torch.cat(outs) if outs else torch.zeros((0, dim), dtype=torch.float32)
