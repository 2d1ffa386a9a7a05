"""Where the linear heads start: PCA whitening of pooled features (the 512-d reduction of a
pretrained trunk, and adapter 1 by default) and PCA of the 512-d head (adapter 1, ``pca``)."""

from __future__ import annotations

import torch
from torch import nn

from models.descriptor import CompressAdapter, RerankReduction


@torch.no_grad()
def whiten_init(linear: nn.Linear, pooled: torch.Tensor, target_std: float = 1.0, shrink: float = 0.1) -> None:
    """Set ``linear`` (with a bias) to PCA whitening of pooled features ``(N, C)`` onto its
    ``out_features`` top principal directions: ``W (h - mu)`` with ``W`` those directions scaled by
    ``target_std / sqrt(lambda + shrink * mean(lambda))``. The shrinkage keeps near-empty directions
    from being blown up into noise.

    The 512-d reduction takes ``target_std = 1`` (a whitened head). Adapter 1 takes 0.5, so that its
    ``tanh`` starts in its near-linear range; that is its right start when the 512-d head is itself
    whitened, since PCA *of that head* is then near-isotropic and would pick arbitrary directions.
    """
    x = pooled.double()
    mu = x.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((x - mu).t()))
    order = torch.argsort(evals, descending=True)[: linear.out_features]
    lam, v = evals[order].clamp(min=0), evecs[:, order]
    w = target_std * v.t() / torch.sqrt(lam + shrink * lam.mean())[:, None]
    linear.weight.copy_(w.float())
    linear.bias.copy_((-(w @ mu)).float())


def pca_init(adapter: CompressAdapter, f512: torch.Tensor, reduction: RerankReduction, pooled: torch.Tensor,
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
