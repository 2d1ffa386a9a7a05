"""Stages 2 and 3, the adapters, on the cached pooled features (:mod:`models.training.cache`); the
backbone never changes here.

* **Adapter 1** (stage 2), backbone frozen: starts from PCA whitening of the pooled features or PCA
  of the 512-d head (:class:`~models.training.config.Adapter1Init`), then trains with InfoNCE on
  (gallery view, high-res query view) pooled features of the same image.
* **Adapter 2** (stage 3), backbone and adapter 1 frozen: adapter2(pool(low-res query view)) is
  distilled to adapter1(pool(high-res gallery view)) with cosine plus a relational KL term over a
  bank of adapter-1 targets at a low temperature.

Each holds out every ``adapter_val_every``-th image and keeps its best held-out epoch; each runs on
one CPU thread (byte-identical adapters) and saves once, when done; a finished stage is skipped.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from models.losses import relational_distill
from models.training.cache import FeatureCache
from models.training.checkpoints import checkpoint_name
from models.training.config import Adapter1Init, Stage
from models.training.context import RunContext
from models.training.initialisers import pca_init, whiten_init
from models.training.objective import contrastive_loss, set_cosine_lr

# rows of the cache -> (loss, its terms)
Step = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def split_held_out(ids: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows -> (training rows, held-out rows): every ``every``-th image, all its views (0: none)."""
    if every <= 0:
        return torch.arange(len(ids)), torch.zeros(0, dtype=torch.long)
    held = (ids % every) == 0
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


@torch.no_grad()
def held_out_loss(module: nn.Module, step: Step, rows: torch.Tensor, batch_size: int) -> float:
    """Mean loss over the held-out rows in fixed batches (eval mode)."""
    module.eval()
    losses = [step(rows[i:i + batch_size])[0].item() for i in range(0, len(rows) - 1, batch_size) if len(rows[i:i + batch_size]) > 1]
    module.train()
    return float(np.mean(losses)) if losses else float("nan")


def adapter_epochs(run: RunContext, stage: Stage, module: nn.Module, epochs: int, step: Step, ids: torch.Tensor,
                   lr: float) -> list[float]:
    """``epochs`` passes over the training rows of the cache (image ids ``ids``) in shuffled
    batches of ``batch_size_adapters``; ``step(idx)`` -> (loss, terms). With held-out images
    (``adapter_val_every``) each epoch also logs their loss, and the module ends on its best
    held-out epoch (the adapters see a few thousand images and overfit them otherwise).

    Logs an ``epoch 0`` line first: the loss of the initial adapter on one batch.
    """
    cfg, history = run.cfg, run.history[stage.value]
    train_rows, val_rows = split_held_out(ids, cfg.adapter_val_every)
    n = len(train_rows)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    batch_size = max(2, min(cfg.batch_size_adapters, n))
    steps = n // batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        loss0, t0 = step(train_rows[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:batch_size]])
    best = (held_out_loss(module, step, val_rows, batch_size), 0, copy.deepcopy(module.state_dict()))
    run.log.write(stage, epoch=0, loss=round(loss0.item(), 4), **{k: round(v, 4) for k, v in t0.items()},
                  **({"held_out_loss": round(best[0], 4)} if len(val_rows) else {}))
    for epoch in range(epochs):
        perm = train_rows[torch.randperm(n, generator=g)]
        terms: dict[str, list[float]] = {}
        for i in range(steps):
            set_cosine_lr(opt, lr, epoch * steps + i, epochs * steps, steps)
            loss, t = step(perm[i * batch_size:(i + 1) * batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in {"loss": loss.item(), **t}.items():
                terms.setdefault(k, []).append(v)
        mean = {k: round(float(np.mean(v)), 4) for k, v in terms.items()}
        history.append(mean["loss"])
        if len(val_rows):
            held = held_out_loss(module, step, val_rows, batch_size)
            mean["held_out_loss"] = round(held, 4)
            if held < best[0]:
                best = (held, epoch + 1, copy.deepcopy(module.state_dict()))
        run.log.write(stage, epoch=epoch + 1, **mean)
    if len(val_rows):
        module.load_state_dict(best[2])
        run.log.write(stage, kept_epoch=best[1], held_out_loss=round(best[0], 4))
    return history


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Stages 2-3 on one CPU thread: multi-threaded CPU reductions in their backward pass differ
    from run to run in the last bits, and the relational distillation amplifies that (two runs on
    2 threads differed by 0.2 in adapter-2 weights). These stages take about a minute, so
    byte-identical adapters cost little; stage 1 and the feature cache (built before entering)
    keep every thread."""
    n = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def freeze(*modules: nn.Module) -> None:
    for mod in modules:
        mod.eval()
        for p in mod.parameters():
            p.requires_grad_(False)


def resume_adapter(run: RunContext, stage: Stage) -> list[float] | None:
    """A finished adapter stage: its weights and history loaded, -> its history; None if not done."""
    ck = run.checkpoints.load(checkpoint_name(stage))
    if ck is None:
        return None
    run.model.load_state_dict(ck["model"])
    run.history[stage.value] = ck["history"].tolist()
    return run.history[stage.value]


def save_adapter(run: RunContext, stage: Stage) -> list[float]:
    run.checkpoints.save(checkpoint_name(stage), {"model": run.model.state_dict(),
                                                  "history": torch.tensor(run.history[stage.value])})
    return run.history[stage.value]


def train_adapter1(run: RunContext, cache: FeatureCache, epochs: int | None = None) -> list[float]:
    """Stage 2 (resumed if done): the cache is built first, on every thread, then one thread trains."""
    if not run.checkpoints.exists(checkpoint_name(Stage.ADAPTER1)):
        cache.get()
    with one_thread(run.device):
        done = resume_adapter(run, Stage.ADAPTER1)
        if done is not None:
            return done
        cfg, m = run.cfg, run.model
        freeze(m.backbone, m.pool, m.reduction)
        c = cache.get()
        gal, qh, ids = c["gallery"], c["query_high"], c["ids"]
        init_adapter1(run, gal)
        m.adapter1.train()

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            a = m.adapter1(gal[idx].to(run.device))
            b = m.adapter1(qh[idx].to(run.device))
            return contrastive_loss(a, b, ids[idx].to(run.device), cfg)

        adapter_epochs(run, Stage.ADAPTER1, m.adapter1, cfg.epochs_adapter1 if epochs is None else epochs, step,
                       ids, cfg.lr_adapter1)
        return save_adapter(run, Stage.ADAPTER1)


def init_adapter1(run: RunContext, gallery: torch.Tensor) -> None:
    """Adapter 1's start (``adapter1_init``) from a seeded sample of up to 20,000 gallery-view rows."""
    cfg, m = run.cfg, run.model
    sample = gallery[torch.randperm(len(gallery), generator=torch.Generator().manual_seed(cfg.seed))[:20000]].to(run.device)
    init = cfg.adapter1_init.resolve(run.pretrained_trunk)
    if init is Adapter1Init.PCA:
        with torch.no_grad():
            pca_init(m.adapter1, m.reduction(sample), m.reduction, sample)
    elif init is Adapter1Init.WHITEN:
        whiten_init(m.adapter1.fc, sample, target_std=0.5)


def train_adapter2(run: RunContext, cache: FeatureCache, epochs: int | None = None) -> list[float]:
    """Stage 3 (resumed if done): adapter 2 distilled to the frozen adapter 1, on one thread."""
    if not run.checkpoints.exists(checkpoint_name(Stage.ADAPTER2)):
        cache.get()
    with one_thread(run.device):
        done = resume_adapter(run, Stage.ADAPTER2)
        if done is not None:
            return done
        cfg, m = run.cfg, run.model
        freeze(m.backbone, m.pool, m.reduction, m.adapter1)
        c = cache.get()
        gal, ql, ids = c["gallery"], c["query_low"], c["ids"]
        with torch.no_grad():
            target = torch.cat([m.adapter1(gal[i:i + 4096].to(run.device)).cpu() for i in range(0, len(gal), 4096)])
        g = torch.Generator().manual_seed(cfg.seed + 2)
        m.adapter2.train()

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            t, lo = target[idx].to(run.device), ql[idx].to(run.device)
            bank = target[torch.randint(0, len(target), (cfg.distill_bank,), generator=g)].to(run.device)
            cos_t, kl_t = relational_distill(m.adapter2(lo), t, bank, cfg.distill_temperature, cfg.distill_kl_weight)
            return cos_t + cfg.distill_kl_weight * kl_t, {"cosine": cos_t.item(), "kl": kl_t.item()}

        adapter_epochs(run, Stage.ADAPTER2, m.adapter2, cfg.epochs_adapter2 if epochs is None else epochs, step,
                       ids, cfg.lr_adapter2)
        return save_adapter(run, Stage.ADAPTER2)
