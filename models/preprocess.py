"""The one resize and tensor conversion used by training, evaluation, gallery builds and the job.

Both squares are squashed (no crop: a copy detector must see the whole picture) with Pillow's
anti-aliased bilinear filter. The low-res square is made from the high-res one, so that a query's
two inputs are the same picture at two scales, and the second resize is cheap.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

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


def to_batch(arrays: np.ndarray | list[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> normalised ``(B, 3, H, W)`` float32 tensor on ``device``."""
    a = np.stack(arrays) if isinstance(arrays, list) else arrays
    x = (a.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
