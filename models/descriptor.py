"""The dual-resolution copy-detection descriptor.

CNN backbone -> GeM pooling (learnable p) -> three heads, every output L2-normalised:

* ``adapter1`` (:class:`CompressAdapter`): linear compression + non-linearity -> ``coarse_dim``
  (128). Gallery side, applied to the pooled feature of the *high*-resolution image.
* ``adapter2`` (:class:`SpindleAdapter`): widen-then-narrow two-layer MLP -> ``coarse_dim``.
  Query side, applied to the pooled feature of the *low*-resolution image and distilled to land
  on adapter 1's output for the high-resolution image.
* ``reduction`` (:class:`RerankReduction`): a linear map of the pooled feature -> ``rerank_dim``
  (512), the fine feature used to rerank coarse candidates.

The public API is deliberately small: :meth:`DescriptorModel.gallery_features` (high-res image ->
``(f128, f512)``), :meth:`DescriptorModel.query_coarse` (low-res image -> ``f128``) and
:meth:`DescriptorModel.rerank_features` (high-res image -> ``f512``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.efficientnet import HEAD_CHANNELS, EfficientNetLite0
from models.precision import Precision, resolve_precision


class Backbone(str, enum.Enum):
    """Closed set of supported backbones. EfficientNet-Lite0 (the default) starts from ImageNet
    weights (:mod:`models.pretrained`); the torchvision ones train from scratch."""

    EFFICIENTNET_LITE0 = "efficientnet_lite0"
    RESNET18 = "resnet18"
    RESNET50 = "resnet50"
    MOBILENET_V3_LARGE = "mobilenet_v3_large"


BACKBONE_CHANNELS: dict[Backbone, int] = {
    Backbone.EFFICIENTNET_LITE0: HEAD_CHANNELS,
    Backbone.RESNET18: 512,
    Backbone.RESNET50: 2048,
    Backbone.MOBILENET_V3_LARGE: 960,
}

# ImageNet statistics: the pipeline's input normalisation (models.preprocess.to_batch). A trunk
# trained with another one converts inside the model (EfficientNet-Lite0: InputRenorm).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DescriptorConfig:
    """Architecture and input resolutions of the descriptor.

    The shipped model's card records the pair it was trained for (``modscan card``); these defaults
    are the pair ``modscan train`` starts from. ``docs/model.md`` gives the measured quality and
    cost of each pair.
    """

    backbone: Backbone = Backbone.EFFICIENTNET_LITE0
    high_res: int = 224
    low_res: int = 160
    coarse_dim: int = 128
    rerank_dim: int = 512
    spindle_width: int = 1024
    gem_p: float = 3.0
    # A bias lets the 512-d head centre what it reduces (PCA whitening of a pretrained trunk's
    # features starts there); None = the backbone's default: on for EfficientNet-Lite0, off for the
    # from-scratch trunks.
    rerank_bias: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone", Backbone(self.backbone))
        if self.rerank_bias is None:
            object.__setattr__(self, "rerank_bias", self.backbone is Backbone.EFFICIENTNET_LITE0)
        if not 32 <= self.low_res <= self.high_res:
            raise ValueError(f"need 32 <= low_res <= high_res, got {self.low_res}, {self.high_res}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backbone"] = self.backbone.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DescriptorConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class L2Norm(nn.Module):
    """L2-normalise the last dimension: ``(B, D) -> (B, D)`` with unit rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=-1, eps=1e-6)


class GeM(nn.Module):
    """Generalized-mean pooling with a learnable exponent: ``(B, C, H, W) -> (B, C)``.

    ``p = 1`` is average pooling and large ``p`` approaches max pooling. Inputs are clamped to
    ``eps`` so that the fractional power is defined (backbone activations are post-ReLU).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class CompressAdapter(nn.Module):
    """Adapter 1: one linear compression then a non-linearity, ``(B, C) -> (B, coarse_dim)``.

    ``tanh`` keeps both signs (a ReLU here would confine every vector to the positive orthant and
    waste most of the 128-d sphere).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.act = nn.Tanh()
        self.norm = L2Norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.fc(x)))


class SpindleAdapter(nn.Module):
    """Adapter 2: spindle MLP (widen to ``width``, then narrow), ``(B, C) -> (B, coarse_dim)``."""

    def __init__(self, in_dim: int, width: int, out_dim: int) -> None:
        super().__init__()
        self.widen = nn.Linear(in_dim, width)
        self.act = nn.GELU()
        self.narrow = nn.Linear(width, out_dim)
        self.norm = L2Norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.narrow(self.act(self.widen(x))))


class RerankReduction(nn.Module):
    """Rerank head: a linear reduction of the pooled feature, ``(B, C) -> (B, rerank_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=bias)
        self.norm = L2Norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def build_trunk(backbone: Backbone) -> nn.Module:
    """Convolutional trunk without its classifier: ``(B, 3, H, W) -> (B, C, h, w)``.

    ResNets start with the last BatchNorm of every residual block at zero (``zero_init_residual``,
    as SSCD does): each block begins as the identity, which steadies from-scratch training.
    """
    if backbone is Backbone.EFFICIENTNET_LITE0:
        return EfficientNetLite0(MEAN, STD)
    if backbone in (Backbone.RESNET18, Backbone.RESNET50):
        net = getattr(torchvision.models, backbone.value)(weights=None, zero_init_residual=True)
        return nn.Sequential(*list(net.children())[:-2])
    if backbone is Backbone.MOBILENET_V3_LARGE:
        return torchvision.models.mobilenet_v3_large(weights=None).features
    raise ValueError(f"unknown backbone {backbone!r}")


class DescriptorModel(nn.Module):
    """Backbone + GeM + (adapter 1, adapter 2, rerank reduction). Inputs are normalised tensors.

    :meth:`set_precision` switches the trunk to bf16 autocast + ``channels_last``; pooling and the
    heads always run in fp32 (the trunk's output is cast back before GeM's fractional power).
    """

    def __init__(self, config: DescriptorConfig | None = None) -> None:
        super().__init__()
        self.precision = Precision.FP32
        self.config = config or DescriptorConfig()
        c = BACKBONE_CHANNELS[self.config.backbone]
        self.backbone = build_trunk(self.config.backbone)
        self.pool = GeM(self.config.gem_p)
        self.adapter1 = CompressAdapter(c, self.config.coarse_dim)
        self.adapter2 = SpindleAdapter(c, self.config.spindle_width, self.config.coarse_dim)
        self.reduction = RerankReduction(c, self.config.rerank_dim, bool(self.config.rerank_bias))

    def set_precision(self, precision: str | Precision, device: torch.device | str | None = None) -> Precision:
        """Resolve ``auto`` for ``device`` (default: where the weights are) and apply it."""
        device = device if device is not None else next(self.parameters()).device
        self.precision = resolve_precision(precision, device)
        fmt = torch.channels_last if self.precision is Precision.BF16 else torch.contiguous_format
        self.backbone.to(memory_format=fmt)
        return self.precision

    def freeze_bn_statistics(self) -> None:
        """Trunk BatchNorms use (and keep) their running statistics in ``train()`` mode: fine-tuning
        a pretrained trunk with small batches would otherwise overwrite ImageNet's statistics with
        noisy per-batch ones. Their affine weights still train."""
        for mod in self.backbone.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, C)`` GeM-pooled backbone feature (always fp32)."""
        if self.precision is Precision.BF16:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                f = self.backbone(x)
            return self.pool(f.float())
        return self.pool(self.backbone(x))

    def gallery_features(self, x_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """High-res images -> ``(f128 via adapter 1, f512)``, both unit-norm."""
        h = self.pooled(x_high)
        return self.adapter1(h), self.reduction(h)

    def query_coarse(self, x_low: torch.Tensor) -> torch.Tensor:
        """Low-res query images -> ``f128`` via adapter 2, unit-norm."""
        return self.adapter2(self.pooled(x_low))

    def rerank_features(self, x_high: torch.Tensor) -> torch.Tensor:
        """High-res images -> ``f512``, unit-norm."""
        return self.reduction(self.pooled(x_high))

    def forward(self, x_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gallery_features(x_high)


def pick_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when present (or asked for), else ``cpu``."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
