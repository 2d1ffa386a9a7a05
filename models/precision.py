"""Numeric precision of the CNN trunk: ``auto`` | ``bf16`` | ``fp32``.

bf16 autocast plus ``channels_last`` runs the convolutional trunk 2.5-3x faster on CPUs with
native bf16 (AVX512-BF16 or AMX) and on CUDA, with features within cosine 0.9999 of fp32. On CPUs
without it (plain AVX2) PyTorch emulates bf16 and is *slower* than fp32, so ``auto`` only picks bf16
where the hardware has it. GeM pooling, the heads, the losses and every similarity stay in fp32:
:class:`~models.descriptor.DescriptorModel` casts the trunk's output back before pooling.
"""

from __future__ import annotations

import enum
import functools
from pathlib import Path

import torch


class Precision(str, enum.Enum):
    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` (Linux; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool({"avx512_bf16", "amx_bf16"} & flags)
    return False


def resolve_precision(precision: str | Precision, device: torch.device | str) -> Precision:
    """``auto`` -> ``bf16`` on CUDA or a CPU with native bf16, else ``fp32``; others pass through."""
    p = Precision(precision)
    if p is not Precision.AUTO:
        return p
    dev = torch.device(device)
    if dev.type == "cuda":
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP32
    return Precision.BF16 if cpu_has_native_bf16() else Precision.FP32
