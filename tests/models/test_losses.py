"""models/losses.py: the training losses."""

from __future__ import annotations

import pytest
import torch

from models.losses import info_nce, koleo_entropy, relational_distill


# -- losses ------------------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def _reference_info_nce(a, b, t, ids, q, qids):
    """Row by row: positives on the diagonal, negatives = every entry of another image."""
    losses = []
    for x, y in ((a, b), (b, a)):
        for i in range(len(x)):
            keep_b = [j for j in range(len(y)) if j == i or ids[j] != ids[i]]
            keep_q = [m for m in range(len(q)) if qids[m] != ids[i]]
            logits = torch.cat([x[i] @ y[keep_b].t(), x[i] @ q[keep_q].t()]) / t
            losses.append(-torch.log_softmax(logits, 0)[keep_b.index(i)])
    return torch.stack(losses).mean()


def test_info_nce_masks_same_image_entries_instead_of_counting_them_as_negatives() -> None:
    torch.manual_seed(0)
    a, b = _unit(torch.randn(6, 16)), _unit(torch.randn(6, 16))
    ids = torch.tensor([0, 1, 2, 3, 4, 0])              # rows 0 and 5 are two views of one image
    q = torch.cat([_unit(a[:3] + 0.05 * torch.randn(3, 16)), _unit(torch.randn(7, 16))])
    qids = torch.cat([ids[:3], torch.arange(100, 107)])  # queue: near-copies of images 0-2, then others
    got = info_nce(a, b, 0.1, ids, q, qids)
    want = _reference_info_nce(a, b, 0.1, ids, q, qids)
    assert torch.isclose(got, want, atol=1e-5), (float(got), float(want))
    unmasked = info_nce(a, b, 0.1, torch.arange(6), q, torch.arange(200, 210))
    assert float(unmasked) > float(got)  # counting same-image copies as negatives costs loss


def test_koleo_uses_the_nearest_non_match() -> None:
    x = _unit(torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]]))
    ids = torch.tensor([0, 0, 1, 1])  # rows 0/1 and 2/3 are views of one image
    far = koleo_entropy(x, ids)       # nearest other image is ~90 degrees away
    near = koleo_entropy(x)           # without ids the twin view is the neighbour
    assert float(far) < float(near)


def test_relational_distill_is_zero_when_the_student_equals_the_target() -> None:
    torch.manual_seed(0)
    t, bank = _unit(torch.randn(8, 32)), _unit(torch.randn(64, 32))
    cos_t, kl = relational_distill(t.clone(), t, bank, 0.05)
    assert float(cos_t) == pytest.approx(0.0, abs=1e-6) and float(kl) == pytest.approx(0.0, abs=1e-5)
    cos2, kl2 = relational_distill(_unit(torch.randn(8, 32)), t, bank, 0.05)
    assert float(cos2) > 0.5 and float(kl2) > 0.1
