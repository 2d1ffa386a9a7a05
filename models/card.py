"""Model weights as safetensors plus a JSON model card; loading verifies a sha256 and never unpickles.

Layout of a model directory::

    model.safetensors   # state dict, tensors only
    model_card.json     # config, resolutions, dims, training summary, metrics, thresholds, sha256

The card's ``version_id`` (``<backbone>-<high>x<low>-<sha[:12]>``) is what galleries record: a
gallery built with one model refuses to be queried with another.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models.descriptor import MEAN, STD, DescriptorConfig, DescriptorModel

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
PACKAGED_MODEL_DIR = Path(__file__).resolve().parent / "default"
# MODSCAN_MODEL points every command that takes no --model at another model directory.
DEFAULT_MODEL_DIR = Path(os.environ.get("MODSCAN_MODEL") or PACKAGED_MODEL_DIR)

# Used only while a model has no calibrated thresholds (the evaluation harness writes real ones).
UNCALIBRATED_THRESHOLDS = {"coarse": 0.5, "fine": 0.6}


class ModelIntegrityError(RuntimeError):
    """The weights on disk do not match the checksum in the model card."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelCard:
    """Everything a user needs to know about one set of weights."""

    config: DescriptorConfig
    sha256: str = ""
    version_id: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=lambda: dict(UNCALIBRATED_THRESHOLDS))

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "version_id": self.version_id,
            "weights_file": WEIGHTS_FILE,
            "sha256": self.sha256,
            "config": c.to_dict(),
            "resolutions": {"high": c.high_res, "low": c.low_res, "resize": "bilinear, squash to square"},
            "dims": {"coarse": c.coarse_dim, "rerank": c.rerank_dim},
            "normalisation": {"mean": MEAN, "std": STD},
            "thresholds": self.thresholds,
            "training": self.training,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        return cls(
            config=DescriptorConfig.from_dict(d["config"]),
            sha256=d.get("sha256", ""),
            version_id=d.get("version_id", ""),
            training=d.get("training", {}),
            metrics=d.get("metrics", {}),
            thresholds=d.get("thresholds", dict(UNCALIBRATED_THRESHOLDS)),
        )


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_model(model: DescriptorModel, out_dir: str | os.PathLike[str], card: ModelCard) -> ModelCard:
    """Write weights and card atomically; fills in ``sha256`` and ``version_id``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    card.sha256 = sha256_file(out / WEIGHTS_FILE)
    c = card.config
    card.version_id = f"{c.backbone.value}-{c.high_res}x{c.low_res}-{card.sha256[:12]}"
    write_card(out, card)
    return card


def write_card(model_dir: str | os.PathLike[str], card: ModelCard) -> None:
    _atomic_write_text(Path(model_dir) / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n")


def read_card(model_dir: str | os.PathLike[str] | None = None) -> ModelCard:
    path = Path(model_dir or DEFAULT_MODEL_DIR) / CARD_FILE
    if not path.exists():
        raise FileNotFoundError(f"no model card at {path}: train a model with `modscan train` first")
    return ModelCard.from_dict(json.loads(path.read_text()))


def load_model(model_dir: str | os.PathLike[str] | None = None,
               device: str | torch.device = "cpu") -> tuple[DescriptorModel, ModelCard]:
    """Load weights after checking their sha256 against the card; returns an eval-mode model."""
    d = Path(model_dir or DEFAULT_MODEL_DIR)
    card = read_card(d)
    weights = d / WEIGHTS_FILE
    actual = sha256_file(weights)
    if actual != card.sha256:
        raise ModelIntegrityError(
            f"checksum mismatch for {weights}: model card says sha256 {card.sha256[:16]}..., "
            f"file has {actual[:16]}... (corrupted or tampered weights; refusing to load)")
    model = DescriptorModel(card.config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), card


_MEAN = np.asarray(MEAN, dtype=np.float32) * 255.0
_STD = np.asarray(STD, dtype=np.float32) * 255.0


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """PIL RGB image -> ``(size, size, 3)`` uint8, bilinear (anti-aliased when shrinking)."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def to_batch(arrays: np.ndarray | list[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> normalised ``(B, 3, H, W)`` float32 tensor on ``device``."""
    a = np.stack(arrays) if isinstance(arrays, list) else arrays
    x = (a.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
