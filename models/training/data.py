"""The training data: the photos under ``--images`` (decoded once, bounded in size), generated
everyday pictures beside them, and :class:`PairDataset`, the seeded (gallery view, query view)
pairs every stage draws from, with its loader."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.augment import QUERY_GRAYSCALE, gallery_augment, query_augment
from models.errors import PathNotFound
from models.preprocess import IMAGE_SUFFIXES, resize_pair, resize_square
from models.synthetic import generate


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive), sorted for determinism; :class:`PathNotFound`
    (a usage error) when there is none."""
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
            rgb = im.convert("RGB")
            rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            out.append(rgb.copy())
    return out


def synthetic_pool(n: int, max_side: int, purpose: str = "train") -> list[Image.Image]:
    """``n`` generated everyday pictures (:mod:`models.synthetic`), bounded like the photos."""
    out = []
    for i in range(n):
        _, im = generate(purpose, i)
        im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
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


def collate_views(batch: list[tuple[Any, ...]]) -> tuple[np.ndarray, ...]:
    """Items of :class:`PairDataset` -> one stacked array per position."""
    return tuple(np.stack([b[j] for b in batch]) for j in range(len(batch[0])))


def pair_loader(ds: PairDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                workers: int = 1) -> torch.utils.data.DataLoader:
    """Batches of ``ds``; the shuffle is seeded, ``workers`` processes augment."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=workers, collate_fn=collate_views, generator=g,
                                       persistent_workers=False)
