"""models/synthetic.py: the generated everyday pictures."""

from __future__ import annotations

import numpy as np

from models.synthetic import EVERYDAY, generate


# -- generated pictures ---------------------------------------------------------------------
def test_generated_pictures_are_deterministic_and_disjoint_per_purpose() -> None:
    k1, a = generate("train", 3)
    k2, b = generate("train", 3)
    _, c = generate("eval-0", 3)
    assert k1 == k2 and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a.resize((64, 64))), np.asarray(c.resize((64, 64))))
    kinds = {generate("train", i)[0] for i in range(len(EVERYDAY))}
    assert kinds == set(EVERYDAY)
