"""Training losses, one home for all three stages (every input is a batch of unit rows).

* :func:`info_nce` — contrastive loss of stages 1 and 2. Row ``i`` of ``a`` and ``b`` are two views
  of one image; every other image in the batch, and every entry of an optional memory queue, is a
  negative. Entries that share the row's image id are masked, never counted as negatives.
* :func:`koleo_entropy` — SSCD's differential-entropy regulariser over both views, with each row's
  nearest *non-match* (another image), so the positive pair is not pushed apart.
* :func:`relational_distill` — stage 3: cosine to the target plus KL between the rows' similarity
  distributions over a bank of targets at a low temperature (the adapter learns where a vector sits
  among its neighbours, not only its direction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = -1e4


def _masked_ce(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive in column ``i`` of row ``i``; ``same`` masks other matches."""
    n = logits.shape[0]
    eye = torch.eye(n, logits.shape[1], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, _NEG)
    return F.cross_entropy(logits, torch.arange(n, device=logits.device))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, ids: torch.Tensor | None = None,
             queue: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE, ``a, b: (B, D)``; optional ``queue: (Q, D)`` of extra negatives.

    ``ids: (B,)`` are image ids: other rows (or queue entries) with the same id are masked.
    """
    n = a.shape[0]
    ids = torch.arange(n, device=a.device) if ids is None else ids
    same = ids[:, None] == ids[None, :]
    if queue is not None and len(queue):
        if queue_ids is None:
            raise ValueError("a queue of negatives needs its queue_ids")
        qsame = ids[:, None] == queue_ids[None, :]
        l_ab = torch.cat([a @ b.t(), a @ queue.t()], dim=1) / temperature
        l_ba = torch.cat([b @ a.t(), b @ queue.t()], dim=1) / temperature
        s = torch.cat([same, qsame], dim=1)
        return 0.5 * (_masked_ce(l_ab, s) + _masked_ce(l_ba, s))
    logits = a @ b.t() / temperature
    return 0.5 * (_masked_ce(logits, same) + _masked_ce(logits.t(), same))


def koleo_entropy(x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """KoLeo: ``-mean log(distance to the nearest row of another image)``, ``x: (N, D)``."""
    with torch.no_grad():
        sim = x @ x.t()
        if ids is None:
            sim.fill_diagonal_(-2.0)
        else:
            sim.masked_fill_(ids[:, None] == ids[None, :], -2.0)
        nn_idx = sim.argmax(dim=1)
    dist = (x - x[nn_idx]).norm(dim=1)
    return -torch.log(dist + 1e-8).mean()


def relational_distill(student: torch.Tensor, target: torch.Tensor, bank: torch.Tensor,
                       temperature: float = 0.05, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - mean cos(student, target), KL(p_target || p_student))`` over similarities to ``bank``.

    ``student, target: (B, D)``, ``bank: (Q, D)`` fixed targets (no gradient). Returns the two terms
    unweighted; the loss is ``cos_term + weight * kl_term``.
    """
    cos_term = 1.0 - (student * target).sum(dim=1).mean()
    if weight == 0 or bank is None or not len(bank):
        return cos_term, torch.zeros((), device=student.device)
    log_p_s = F.log_softmax(student @ bank.t() / temperature, dim=1)
    p_t = F.softmax(target @ bank.t() / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="batchmean")
    return cos_term, kl
