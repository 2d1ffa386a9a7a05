"""models/preprocess.py: the one resize, the tensor conversion and the one micro-batch feature helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocess import batched_features, resize_pair, resize_square, to_batch


def _images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_micro_batches_give_what_one_batch_gives_in_order() -> None:
    images = _images(10)
    seen: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        assert not torch.is_grad_enabled()  # under inference mode
        return x.flatten(1)[:, :5] * 2

    got = batched_features(fn, images, micro_batch=4)
    assert seen == [4, 4, 2]
    torch.testing.assert_close(got, to_batch(images).flatten(1)[:, :5] * 2)


def test_prepare_runs_per_item_and_no_images_give_an_empty_matrix() -> None:
    pics = [Image.fromarray(a) for a in _images(3, 20)]
    got = batched_features(lambda x: x.mean(dim=(2, 3)), pics, micro_batch=2, prepare=lambda p: resize_square(p, 8))
    want = to_batch(np.stack([resize_square(p, 8) for p in pics])).mean(dim=(2, 3))
    torch.testing.assert_close(got, want)
    empty = batched_features(lambda x: x, np.zeros((0, 8, 8, 3), np.uint8), dim=7)
    assert empty.shape == (0, 7) and empty.dtype == torch.float32


def test_the_low_square_is_made_from_the_high_one() -> None:
    im = Image.fromarray(_images(1, 64)[0])
    lo, hi = resize_pair(im, 16, 32)
    assert lo.shape == (16, 16, 3) and hi.shape == (32, 32, 3)
    np.testing.assert_array_equal(lo, resize_square(Image.fromarray(hi), 16))
    with pytest.raises(ValueError):
        to_batch([])
