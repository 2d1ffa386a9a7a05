"""models/efficientnet.py: TF "same" padding at every size, the Lite0 shapes, the input renormalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.descriptor import MEAN, STD
from models.efficientnet import Conv2dSame, EfficientNetLite0, InputRenorm, same_padding


@pytest.mark.parametrize("size,kernel,stride,want", [
    (224, 3, 2, (0, 1)),   # even input, stride 2: TF puts the odd pixel after
    (225, 3, 2, (1, 1)),
    (160, 5, 2, (1, 2)),
    (161, 5, 2, (2, 2)),
    (7, 3, 1, (1, 1)),     # stride 1 is symmetric
    (1, 3, 2, (1, 1)),
])
def test_same_padding_is_tensorflows(size: int, kernel: int, stride: int, want: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == want
    before, after = want
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


def test_conv2d_same_equals_explicit_asymmetric_padding() -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 3, 2, bias=False)
    x = torch.randn(1, 3, 10, 11)
    # H=10: pad (0, 1); W=11: pad (1, 1)
    want = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, None, 2)
    assert torch.allclose(conv(x), want, atol=1e-6)


@pytest.mark.parametrize("size", [224, 160, 128, 97])
def test_trunk_output_is_1280_channels_at_ceil_size_over_32(size: int) -> None:
    trunk = EfficientNetLite0(MEAN, STD).eval()
    with torch.no_grad():
        y = trunk(torch.randn(1, 3, size, size))
    s = math.ceil(size / 32)
    assert y.shape == (1, 1280, s, s)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 6.0  # ReLU6 head


def test_input_renorm_maps_imagenet_normalised_pixels_to_half_half() -> None:
    x01 = torch.rand(2, 3, 4, 4)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = InputRenorm(MEAN, STD)((x01 - m) / s)
    assert torch.allclose(out, (x01 - 0.5) / 0.5, atol=1e-5)


def test_lite0_has_the_published_parameter_count() -> None:
    n = sum(p.numel() for p in EfficientNetLite0(MEAN, STD).parameters())
    # Lite0 is 4.65M parameters with its 1000-way classifier (1280 * 1000 + 1000 of them)
    assert n + 1280 * 1000 + 1000 == pytest.approx(4_652_008, rel=1e-3)
