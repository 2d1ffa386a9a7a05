"""The run as a whole: :class:`Trainer` runs stage 1, the feature cache, stages 2 and 3 and the
background bank into one model folder, resuming from its checkpoints; :func:`train` is the call
``modscan train`` makes."""

from __future__ import annotations

import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.card import ModelCard, save_model
from models.descriptor import DescriptorModel
from models.preprocess import batched_features, resize_square
from models.synthetic import generate
from models.training.adapters import split_held_out, train_adapter1, train_adapter2
from models.training.backbone import BackboneStage, Monitor
from models.training.cache import FeatureCache
from models.training.config import TrainConfig
from models.training.context import RunContext


class Trainer:
    """Runs the stages into ``out_dir``; each epoch logs one JSON line with every loss term.

    ``images`` and ``paths``, ``model``, ``history`` (the loss of every epoch, by stage) and what
    the card records of stage 1 (``lineage``, ``pretrained``, ``monitor_log``) are readable while
    it runs and after.
    """

    def __init__(self, images_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 cfg: TrainConfig, command: str | None = None, monitor: Monitor | None = None) -> None:
        self.context = RunContext(images_dir, out_dir, cfg)
        self.command = command or " ".join(shlex.quote(a) for a in sys.argv)
        self.backbone_stage = BackboneStage(self.context, monitor)
        self.cache = FeatureCache(self.context)

    # -- what a run exposes ------------------------------------------------------------------
    @property
    def cfg(self) -> TrainConfig:
        return self.context.cfg

    @property
    def model(self) -> DescriptorModel:
        return self.context.model

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def paths(self) -> list[Path]:
        return self.context.paths

    @property
    def images(self) -> list[Image.Image]:
        return self.context.images

    @property
    def history(self) -> dict[str, list[float]]:
        return self.context.history

    @property
    def lineage(self) -> dict[str, Any] | None:
        return self.backbone_stage.lineage

    @property
    def pretrained(self) -> dict[str, Any] | None:
        return self.backbone_stage.pretrained

    @property
    def monitor_log(self) -> list[dict[str, float]]:
        return self.backbone_stage.monitor_log

    # -- the stages --------------------------------------------------------------------------
    def stage_backbone(self, epochs: int | None = None) -> list[float]:
        """Stage 1 (:class:`~models.training.backbone.BackboneStage`)."""
        return self.backbone_stage.train(epochs)

    def stage_adapter1(self, epochs: int | None = None) -> list[float]:
        """Stage 2 (:func:`~models.training.adapters.train_adapter1`)."""
        return train_adapter1(self.context, self.cache, epochs)

    def stage_adapter2(self, epochs: int | None = None) -> list[float]:
        """Stage 3 (:func:`~models.training.adapters.train_adapter2`)."""
        return train_adapter2(self.context, self.cache, epochs)

    def cache_key(self) -> str:
        return self.cache.key()

    def pooled_cache(self) -> dict[str, torch.Tensor]:
        return self.cache.get()

    def split_held_out(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_held_out(ids, self.cfg.adapter_val_every)

    @torch.no_grad()
    def background_features(self) -> dict[str, Any]:
        """512-d and adapter-1 128-d features of a fixed sample of training photos plus generated
        everyday pictures from their own seed space (never gallery or evaluation images)."""
        cfg, m, run = self.cfg, self.model, self.context
        m.eval()
        rng = random.Random(cfg.seed + 7)
        n_photos = min(cfg.background_photos, len(run.paths))
        photos = [run.images[i] for i in sorted(rng.sample(range(len(run.paths)), n_photos))]
        kinds: list[str] = []
        graphics = []
        for i in range(cfg.background_graphics):
            kind, im = generate("background", i)
            kinds.append(kind)
            graphics.append(im)
        pics = photos + graphics
        f = batched_features(lambda x: torch.cat(m.gallery_features(x), dim=1), pics, device=run.device,
                             prepare=lambda p: resize_square(p, cfg.model.high_res), desc="background bank")
        cdim = cfg.model.coarse_dim
        return {"f512": f[:, cdim:].contiguous(), "f128": f[:, :cdim].contiguous(), "kind": ["photo"] * n_photos + kinds}

    # -- all ---------------------------------------------------------------------------------
    def run(self) -> ModelCard:
        """The three stages (each resumed or skipped when done), the background bank, the card:
        the model folder, -> its card."""
        t0 = time.time()
        self.stage_backbone()
        self.stage_adapter1()
        self.stage_adapter2()
        self.model.eval()
        bg = self.background_features()
        card = ModelCard(config=self.cfg.model, training=self.card_training(time.time() - t0))
        save_model(self.model.cpu(), self.context.out, card, background=bg)
        return card

    def card_training(self, seconds: float) -> dict[str, Any]:
        """The card's ``training``: data, command, lineage, ImageNet import, monitor, config, losses."""
        run = self.context
        return {
            "data": {"dir": run.images_dir.name, "images": len(run.paths),
                     "synthetic_images": self.cfg.synthetic_images,
                     "note": "self-supervised: no labels; evaluation set (coco256) never used"},
            "command": self.command,
            **({"init_from": self.lineage} if self.lineage else {}),
            **({"pretrained": self.pretrained} if self.pretrained else {}),
            **({"stage1_monitor": self.monitor_log} if self.monitor_log else {}),
            "train_config": self.cfg.to_dict(),
            "device": str(run.device),
            "precision": run.precision.value,
            "seconds_this_run": round(seconds, 1),
            "final_loss": {k: (round(v[-1], 4) if v else None) for k, v in self.history.items()},
            "torch": torch.__version__,
        }


def train(images_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: TrainConfig,
          command: str | None = None, monitor: Monitor | None = None) -> ModelCard:
    """Run all three stages (resuming from ``out_dir/checkpoints``) and save the model there."""
    return Trainer(images_dir, out_dir, cfg, command, monitor).run()
