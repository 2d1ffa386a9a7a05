"""Generated everyday pictures: gradients, flat graphics, captions, text screenshots, charts, noise.

Real uploads are not all photos. A descriptor trained on photos alone has never seen a gradient or
a caption on a flat colour, and collapses them together: every such upload then "matches" every
such reference. These generators feed three places, each from its own seed space so that no picture
is shared between them:

* training (``purpose="train"``): extra instances, each its own class and a negative for the rest;
* the background bank shipped with the model (``purpose="background"``), for score normalisation;
* evaluation (``purpose="eval"``): unrelated everyday uploads and smooth/abstract references.

Every generator is ``(random.Random, (w, h)) -> PIL RGB``; :func:`generate` draws a kind and size.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Generator = Callable[[random.Random, tuple[int, int]], Image.Image]

_WORDS = ("the quick brown fox jumps over lazy dog when life gives you lemons make sale today only "
          "monday mood weekend vibes new post click here free shipping limited offer best friends "
          "forever good morning happy birthday thank you love this summer winter meeting notes "
          "agenda revenue growth quarter total error warning success update version release").split()


def _font(size: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, int(size)))


def _color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _sentence(rng: random.Random, lo: int = 2, hi: int = 7) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def flat(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """One flat colour (a low-content picture: never a match)."""
    return Image.new("RGB", size, _color(rng))


def gradient(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Linear or radial blend of 2-3 colours at a random angle."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.7:
        ang = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(ang) + yy * np.sin(ang))
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.hypot(xx - cx, yy - cy)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    stops = [np.asarray(_color(rng), np.float32) for _ in range(rng.choice((2, 2, 3)))]
    if len(stops) == 2:
        img = stops[0] * (1 - t[..., None]) + stops[1] * t[..., None]
    else:
        t2 = np.clip(t * 2, 0, 2)
        lo = np.where(t2[..., None] < 1, stops[0], stops[1])
        hi = np.where(t2[..., None] < 1, stops[1], stops[2])
        f = (t2 % 1.0)[..., None]
        img = lo * (1 - f) + hi * f
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def flat_shapes(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Flat background with 1-6 flat shapes (logos, icons, clip art)."""
    w, h = size
    im = Image.new("RGB", size, _color(rng))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(1, 6)):
        x0, y0 = rng.uniform(-0.1, 0.8) * w, rng.uniform(-0.1, 0.8) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
        kind = rng.choice(("rect", "ellipse", "poly"))
        if kind == "rect":
            d.rectangle([x0, y0, x1, y1], fill=_color(rng))
        elif kind == "ellipse":
            d.ellipse([x0, y0, x1, y1], fill=_color(rng))
        else:
            pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(rng.randint(3, 6))]
            d.polygon(pts, fill=_color(rng))
    return im


def caption(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A quote or meme caption: 1-4 lines of large text on a flat colour (or a soft gradient)."""
    w, h = size
    im = gradient(rng, size) if rng.random() < 0.3 else Image.new("RGB", size, _color(rng))
    d = ImageDraw.Draw(im)
    bg = np.asarray(im).mean(axis=(0, 1))
    fg = (0, 0, 0) if bg.sum() > 380 else (255, 255, 255)
    if rng.random() < 0.3:
        fg = _color(rng)
    n = rng.randint(1, 4)
    fs = rng.uniform(0.06, 0.14) * h
    y = rng.uniform(0.1, 0.5) * h
    for _ in range(n):
        line = _sentence(rng, 1, 5)
        x = rng.uniform(0.03, 0.3) * w
        d.text((x, y), line, font=_font(fs), fill=fg)
        y += fs * 1.3
    return im


def smooth_field(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Smooth abstract colour field: a few random colours blurred into each other (wallpapers)."""
    g = np.random.default_rng(rng.randrange(2**32))
    k = rng.randint(2, 5)
    small = Image.fromarray(g.integers(0, 256, (k, k, 3), dtype=np.uint8))
    im = small.resize(size, Image.Resampling.BICUBIC)
    return im.filter(ImageFilter.GaussianBlur(radius=max(size) / rng.uniform(12, 30)))


def text_screenshot(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A screenshot of text: a light or dark page with a title bar and rows of small text."""
    w, h = size
    dark = rng.random() < 0.3
    bg, fg = ((30, 30, 34), (220, 220, 220)) if dark else ((250, 250, 250), (20, 20, 20))
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    bar = int(h * rng.uniform(0.06, 0.12))
    d.rectangle([0, 0, w, bar], fill=_color(rng))
    d.text((w * 0.03, bar * 0.2), _sentence(rng, 2, 4), font=_font(bar * 0.55), fill=(255, 255, 255))
    fs = rng.uniform(0.025, 0.045) * h
    y = bar + fs
    while y < h - fs:
        line = " ".join(rng.choice(_WORDS + list(string.digits)) for _ in range(rng.randint(3, 12)))
        d.text((w * 0.04, y), line, font=_font(fs), fill=fg)
        y += fs * rng.choice((1.4, 1.5, 2.6))
    return im


def chart(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A bar or line chart with axes, grid and labels."""
    w, h = size
    im = Image.new("RGB", size, (255, 255, 255) if rng.random() < 0.8 else (240, 240, 235))
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = w * 0.12, h * 0.1, w * 0.95, h * 0.85
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        d.line([x0, y, x1, y], fill=(220, 220, 220), width=1)
        d.text((w * 0.02, y - 6), str(rng.randint(0, 999)), font=_font(h * 0.035), fill=(60, 60, 60))
    d.line([x0, y0, x0, y1], fill=(0, 0, 0), width=2)
    d.line([x0, y1, x1, y1], fill=(0, 0, 0), width=2)
    n = rng.randint(4, 14)
    vals = [rng.uniform(0.05, 1.0) for _ in range(n)]
    if rng.random() < 0.5:
        bw = (x1 - x0) / n
        c = _color(rng)
        for i, v in enumerate(vals):
            d.rectangle([x0 + i * bw + bw * 0.15, y1 - v * (y1 - y0), x0 + (i + 0.85) * bw, y1], fill=c)
    else:
        for _ in range(rng.randint(1, 3)):
            vals = [rng.uniform(0.05, 1.0) for _ in range(n)]
            pts = [(x0 + (x1 - x0) * i / (n - 1), y1 - v * (y1 - y0)) for i, v in enumerate(vals)]
            d.line(pts, fill=_color(rng), width=max(2, int(h * 0.008)))
    d.text((x0, h * 0.9), _sentence(rng, 2, 4), font=_font(h * 0.04), fill=(0, 0, 0))
    return im


def noise(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Random noise: per-pixel colour noise or blocky noise."""
    g = np.random.default_rng(rng.randrange(2**32))
    w, h = size
    if rng.random() < 0.5:
        a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Image.fromarray(a)
    b = rng.randint(4, 32)
    a = g.integers(0, 256, (max(1, h // b), max(1, w // b), 3), dtype=np.uint8)
    return Image.fromarray(a).resize(size, Image.Resampling.NEAREST)


def transparent(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """An almost empty RGBA picture (a tiny mark on a transparent canvas): low content. Returns RGBA."""
    im = Image.new("RGBA", size, (*_color(rng), 0))
    d = ImageDraw.Draw(im)
    w, h = size
    x, y = rng.uniform(0, w * 0.9), rng.uniform(0, h * 0.9)
    d.ellipse([x, y, x + w * 0.03, y + h * 0.03], fill=(*_color(rng), 255))
    return im


# Kinds that carry structure: used for training, the background bank and evaluation uploads.
EVERYDAY: dict[str, Generator] = {
    "gradient": gradient,
    "flat_shapes": flat_shapes,
    "caption": caption,
    "smooth_field": smooth_field,
    "text_screenshot": text_screenshot,
    "chart": chart,
    "noise": noise,
}
# Low-content kinds: never matches; used by tests and the evaluation's low-content checks.
LOW_CONTENT: dict[str, Generator] = {"flat": flat, "transparent": transparent}

_SIZES = ((640, 480), (480, 640), (800, 450), (512, 512), (600, 400), (1024, 576), (400, 600))


def rng_for(purpose: str, index: int) -> random.Random:
    """A ``random.Random`` from (purpose, index): disjoint seed spaces per purpose."""
    digest = hashlib.sha256(f"modscan-synthetic/{purpose}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def generate(purpose: str, index: int, kinds: tuple[str, ...] | None = None) -> tuple[str, Image.Image]:
    """``(kind, picture)`` number ``index`` of ``purpose``; deterministic."""
    rng = rng_for(purpose, index)
    pool = {**EVERYDAY, **LOW_CONTENT}
    names = kinds or tuple(EVERYDAY)
    kind = names[index % len(names)]
    size = rng.choice(_SIZES)
    return kind, pool[kind](rng, size)
