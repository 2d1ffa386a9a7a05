"""Model weights as safetensors plus a JSON model card; loading verifies a sha256 and never unpickles.

Layout of a model directory::

    model.safetensors       # state dict, tensors only, stored as float16 (loaded as float32)
    background.safetensors  # score-normalisation bank: 512-d / 128-d features of background pictures
    model_card.json         # config, resolutions, dims, training summary, metrics, thresholds, sha256s

Weights are stored in float16: half the bytes in every clone and every retrain's git history, and
the features of the fp16-stored model agree with the fp32 one to cosine > 0.9999 (tested). The
card's sha256 is over the stored bytes.

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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.descriptor import MEAN, STD, DescriptorConfig, DescriptorModel
from models.errors import ModscanError
from models.preprocess import resize_square, to_batch  # noqa: F401  (re-exported for callers)

WEIGHTS_FILE = "model.safetensors"
BACKGROUND_FILE = "background.safetensors"
CARD_FILE = "model_card.json"
PACKAGED_MODEL_DIR = Path(__file__).resolve().parent / "default"
# MODSCAN_MODEL points every command that takes no --model at another model directory.
DEFAULT_MODEL_DIR = Path(os.environ.get("MODSCAN_MODEL") or PACKAGED_MODEL_DIR)

# Used only while a model has no calibrated thresholds (the evaluation harness writes real ones).
UNCALIBRATED_THRESHOLDS = {"coarse": 0.5, "fine": 0.6}


class ModelIntegrityError(ModscanError, RuntimeError):
    """The weights on disk do not match the checksum in the model card (exit code 1)."""


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
    thresholds: dict[str, Any] = field(default_factory=lambda: dict(UNCALIBRATED_THRESHOLDS))  # floats, and the score norm (a table)
    background: dict[str, Any] = field(default_factory=dict)  # file, sha256, count, kinds
    # per-pair score tails of unrelated real pictures and the verifier's pass rate (`modscan bench
    # scale --write-card`): what `gallery build` sizes each version's thresholds with; {} = none
    scale_tails: dict[str, Any] = field(default_factory=dict)

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
            "background": self.background,
            "training": self.training,
            "metrics": self.metrics,
            **({"scale_tails": self.scale_tails} if self.scale_tails else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        return cls(
            config=DescriptorConfig.from_dict(d["config"]),
            sha256=d.get("sha256", ""),
            version_id=d.get("version_id", ""),
            training=d.get("training", {}),
            metrics=d.get("metrics", {}),
            thresholds=d.get("thresholds", dict(UNCALIBRATED_THRESHOLDS)),
            background=d.get("background", {}),
            scale_tails=d.get("scale_tails", {}),
        )


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_model(model: DescriptorModel, out_dir: str | os.PathLike[str], card: ModelCard,
               background: dict[str, Any] | None = None) -> ModelCard:
    """Write float16 weights, the background bank (if given) and the card atomically; fills in
    ``sha256``, ``background`` and ``version_id``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes a multi-key header in hash order, which would make the
    # bytes (and so the card's sha256) differ between two runs of the same training
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    card.sha256 = sha256_file(out / WEIGHTS_FILE)
    if background is not None:
        card.background = save_background(out, background)
    c = card.config
    card.version_id = f"{c.backbone.value}-{c.high_res}x{c.low_res}-{card.sha256[:12]}"
    write_card(out, card)
    return card


def save_background(out: Path, bg: dict[str, Any]) -> dict[str, Any]:
    """``bg = {"f512": (N, 512), "f128": (N, 128), "kind": [str] * N}`` -> file + card entry."""
    kinds = list(bg["kind"])
    names = sorted(set(kinds))
    tensors = {"f512": bg["f512"].half().contiguous(), "f128": bg["f128"].half().contiguous(),
               "kind": torch.tensor([names.index(k) for k in kinds], dtype=torch.int16)}
    tmp = out / f".{BACKGROUND_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"kinds": json.dumps(names)})
    os.replace(tmp, out / BACKGROUND_FILE)
    return {"file": BACKGROUND_FILE, "sha256": sha256_file(out / BACKGROUND_FILE), "count": len(kinds),
            "kinds": {n: kinds.count(n) for n in names}}


@dataclass(frozen=True)
class BackgroundBank:
    """Features of pictures that are never references: the score-normalisation reference set."""

    f512: np.ndarray   # (N, 512) float32, unit rows
    f128: np.ndarray   # (N, 128) float32, unit rows
    kind: list[str]


def load_background(model_dir: str | os.PathLike[str] | None = None, card: ModelCard | None = None) -> BackgroundBank | None:
    """The model's background bank after checking its sha256; None for a model without one."""
    d = Path(model_dir or DEFAULT_MODEL_DIR)
    card = card or read_card(d)
    if not card.background:
        return None
    path = d / card.background["file"]
    actual = sha256_file(path)
    if actual != card.background["sha256"]:
        raise ModelIntegrityError(f"checksum mismatch for {path}: card says {card.background['sha256'][:16]}..., "
                                  f"file has {actual[:16]}... (refusing to load)")
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        names = json.loads(f.metadata()["kinds"])
    return BackgroundBank(f512=t["f512"].float().numpy(), f128=t["f128"].float().numpy(),
                          kind=[names[i] for i in t["kind"].tolist()])


def write_card(model_dir: str | os.PathLike[str], card: ModelCard) -> None:
    _atomic_write_text(Path(model_dir) / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n")


def read_card(model_dir: str | os.PathLike[str] | None = None) -> ModelCard:
    path = Path(model_dir or DEFAULT_MODEL_DIR) / CARD_FILE
    if not path.exists():
        from models.errors import PathNotFound

        raise PathNotFound(f"no model card at {path}: train a model with `modscan train` first")
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
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card
