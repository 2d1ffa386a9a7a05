"""Sample images for the demo, the benchmarks, the GPU check and the tests.

Every image here is either generated in code (:func:`procedural`) or one of the photos that
scikit-image ships with its package (:func:`skimage_photo`): nothing is downloaded and nothing is
read from ``../shared`` (the project's shared photo set, absent in a bare clone). Callers that
prefer real photos when ``../shared/data`` is present read them themselves and fall back to these.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

# scikit-image photos that are none of the demo gallery's photos (astronaut, rocket,
# stereo_motorcycle, coffee, camera, chelsea): unrelated uploads for the demo and the benchmarks.
# retina stays out of the demo gallery: a mostly-black photo draws false positives from other dark
# pictures (moon, deep field) just above the fine threshold — a known weakness of the shipped model.
UNRELATED_PHOTOS = ["hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "moon", "page",
                    "coins", "clock", "horse", "brick", "grass", "gravel", "text", "cell", "logo"]


def skimage_photo(name: str) -> Image.Image:
    """The photo ``skimage.data.<name>()`` as an RGB image (grey and float images scaled to uint8)."""
    import skimage.data

    a = getattr(skimage.data, name)()
    if isinstance(a, tuple):
        a = a[0]
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
    im = Image.fromarray(a)
    return im.convert("RGB")


def procedural(rng: random.Random, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A synthetic unrelated picture: gradient background plus random shapes."""
    from PIL import ImageDraw

    w, h = size
    g = np.random.default_rng(rng.randrange(2**32))
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c0, c1, c2 = (g.uniform(0, 255, 3) for _ in range(3))
    a = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        s = rng.randint(10, 150)
        fill = tuple(rng.randrange(256) for _ in range(3))
        rng.choice((d.ellipse, d.rectangle))([x0, y0, x0 + s, y0 + s], fill=fill)
    return im
