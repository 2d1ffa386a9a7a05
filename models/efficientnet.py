"""EfficientNet-Lite0 as a convolutional trunk, with TensorFlow "same" padding at every input size.

EfficientNet-Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed 32-channel
stem and 1280-channel head (Google's mobile variant). Its ImageNet weights were trained in
TensorFlow, whose ``padding="SAME"`` pads a stride-2 convolution *asymmetrically* (the extra row
and column go after) and depends on the input size. :class:`Conv2dSame` computes that padding per
input, so the weights are right at 224, 160, 128 or any other size (a fixed, size-specific padding
shifts every stride-2 feature map by a pixel at other sizes).

Module names follow timm's ``tf_efficientnet_lite0`` (``conv_stem``, ``bn1``, ``blocks.S.I``,
``conv_head``, ``bn2``), so that :mod:`models.pretrained` maps the published checkpoint onto them.
Inputs are expected in the network's own normalisation, ``(x - 0.5) / 0.5`` on ``[0, 1]`` pixels;
:class:`InputRenorm` converts the pipeline's ImageNet-normalised tensors to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, out channels) per stage: EfficientNet-B0's blocks, which
# Lite0 keeps at width and depth multiplier 1.0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3       # TensorFlow's default, what the checkpoint was trained with
BN_MOMENTUM = 0.01  # PyTorch convention (1 - TF's 0.99)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial dimension: ``(before, after)``, the odd pixel after."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TF "SAME" padding computed from each input's size: ``(B, C, H, W) -> (B, C', ceil(H/s), ceil(W/s))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = same_padding(x.shape[-2], kh, sh)
        left, right = same_padding(x.shape[-1], kw, sw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class DepthwiseSeparable(nn.Module):
    """Expand-ratio-1 block: depthwise conv -> BN -> ReLU6 -> pointwise projection -> BN (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = Conv2dSame(cin, cin, kernel, stride, groups=cin, bias=False)
        self.bn1 = _bn(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expand -> depthwise -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv_dw = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self.bn2 = _bn(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


class InputRenorm(nn.Module):
    """``(x - mean) / std`` tensors -> ``(x01 - 0.5) / 0.5``, the normalisation the trunk was trained with."""

    scale: torch.Tensor  # buffers, registered in __init__
    shift: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        # x01 = x * s + m; out = (x01 - 0.5) / 0.5 = x * 2s + (2m - 1)
        self.register_buffer("scale", 2 * s, persistent=False)
        self.register_buffer("shift", 2 * m - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class EfficientNetLite0(nn.Module):
    """The Lite0 trunk without pooling or classifier: ``(B, 3, H, W) -> (B, 1280, ceil(H/32), ceil(W/32))``."""

    def __init__(self, input_mean: tuple[float, ...], input_std: tuple[float, ...]) -> None:
        super().__init__()
        self.renorm = InputRenorm(input_mean, input_std)
        self.conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, 2, bias=False)
        self.bn1 = _bn(STEM_CHANNELS)
        stages: list[nn.Module] = []
        cin = STEM_CHANNELS
        for repeats, k, s, e, cout in LITE0_STAGES:
            blocks: list[nn.Module] = []
            for i in range(repeats):
                stride = s if i == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, k, stride) if e == 1 else InvertedResidual(cin, cout, k, stride, e))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self.bn2 = _bn(HEAD_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv_stem(self.renorm(x))))
        x = self.blocks(x)
        return F.relu6(self.bn2(self.conv_head(x)))
