"""models/precision.py: the trunk precision the hardware gets."""

from __future__ import annotations

import pytest


# -- trunk precision ------------------------------------------------------------------------
def test_auto_precision_follows_the_hardware() -> None:
    from models.precision import Precision, cpu_has_native_bf16, resolve_precision

    expect = Precision.BF16 if cpu_has_native_bf16() else Precision.FP32
    assert resolve_precision("auto", "cpu") is expect
    assert resolve_precision("fp32", "cpu") is Precision.FP32
    with pytest.raises(ValueError):
        resolve_precision("fp8", "cpu")
