"""What the training steps optimise and at what pace: the warm-up + cosine learning-rate schedule,
the memory queue of past embeddings (negatives) and the contrastive loss of stages 1 and 2
(InfoNCE + KoLeo entropy, :mod:`models.losses`)."""

from __future__ import annotations

import math

import torch

from models.losses import info_nce, koleo_entropy
from models.training.config import TrainConfig


def lr_at(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int) -> None:
    """Set every parameter group's LR on the schedule, from its own ``base_lr`` if it has one."""
    for g in opt.param_groups:
        g["lr"] = lr_at(g.get("base_lr", base), step, total, warmup)


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
