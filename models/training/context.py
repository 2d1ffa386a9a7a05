"""What the stages of one run share (:class:`RunContext`): the config, the model on its device, the
training images, the checkpoints folder, the log and the loss history of each stage."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from models.descriptor import Backbone, DescriptorModel, pick_device
from models.training.checkpoints import Checkpoints, TrainLog
from models.training.config import Stage, TrainConfig
from models.training.data import list_images, preload, synthetic_pool


class RunContext:
    """One run into ``out_dir``: images listed (a usage error when there are none) before anything
    is written; the model seeded by ``cfg.seed`` and set to its precision."""

    def __init__(self, images_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.images_dir = Path(images_dir)
        paths = list_images(self.images_dir)
        self.out = Path(out_dir)
        self.checkpoints = Checkpoints(self.out / "checkpoints")
        self.log = TrainLog(self.out / "train_log.jsonl")
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = DescriptorModel(cfg.model).to(self.device)
        self.precision = self.model.set_precision(cfg.precision, self.device)
        self.paths = paths[: cfg.max_images] if cfg.max_images else paths
        self._images: list[Image.Image] | None = None
        self.history: dict[str, list[float]] = {s.value: [] for s in Stage}

    @property
    def images(self) -> list[Image.Image]:
        """Photos then generated pictures, decoded on first use; image id = position in this list."""
        if self._images is None:
            self._images = (preload(self.paths, self.cfg.preload_max_side)
                            + synthetic_pool(self.cfg.synthetic_images, self.cfg.preload_max_side))
        return self._images

    @property
    def pretrained_trunk(self) -> bool:
        """Whether the trunk starts from ImageNet weights (EfficientNet-Lite0) rather than from scratch."""
        return self.cfg.model.backbone is Backbone.EFFICIENTNET_LITE0
