"""Image edits: random training augmentations and the named, deterministic edit suite.

Both are built from the same small primitives (each ``PIL RGB -> PIL RGB``, randomness from an
explicit ``random.Random`` so that a seed reproduces them). Training draws a random chain per
sample; the evaluation suite (:data:`EDITS`) applies named edits so that recall can be reported
per edit type.
"""

from __future__ import annotations

import io
import random
import string
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Edit = Callable[[Image.Image, random.Random], Image.Image]

_FONT_CACHE: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(size: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max(8, int(size))
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _rand_color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _rand_text(rng: random.Random, lo: int = 4, hi: int = 16) -> str:
    alphabet = string.ascii_letters + string.digits + "  !?#@"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))).strip() or "text"


def crop(img: Image.Image, rng: random.Random, min_area: float = 0.35, max_aspect: float = 4 / 3) -> Image.Image:
    """Random crop keeping ``min_area``..1 of the area, aspect ratio in [1/max_aspect, max_aspect]."""
    w, h = img.size
    for _ in range(10):
        area = rng.uniform(min_area, 1.0) * w * h
        ar = np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect)))
        cw, ch = int(round((area * ar) ** 0.5)), int(round((area / ar) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch))
    return img


def flip(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(img)


def rotate(img: Image.Image, rng: random.Random, max_deg: float = 30.0) -> Image.Image:
    """Rotate by up to ``max_deg`` degrees, expanding the canvas with a solid border."""
    deg = rng.uniform(5, max_deg) * rng.choice((-1, 1))
    return img.rotate(deg, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=_rand_color(rng))


def border(img: Image.Image, rng: random.Random) -> Image.Image:
    """A plain solid border of 2-15 % on every side (or only top/bottom: letterboxing)."""
    w, h = img.size
    px, py = int(rng.uniform(0.02, 0.15) * w), int(rng.uniform(0.02, 0.15) * h)
    if rng.random() < 0.3:
        px = 0
    out = Image.new("RGB", (w + 2 * px, h + 2 * py), rng.choice(((0, 0, 0), (255, 255, 255), _rand_color(rng))))
    out.paste(img, (px, py))
    return out


def rotate90(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.transpose(rng.choice((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)))


def rescale(img: Image.Image, rng: random.Random) -> Image.Image:
    """Down-scale to 30-80 % then back to a random size (scaling artefacts)."""
    w, h = img.size
    s = rng.uniform(0.3, 0.8)
    small = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.Resampling.BILINEAR)
    return small.resize((max(8, int(w * rng.uniform(0.5, 1.2))), max(8, int(h * rng.uniform(0.5, 1.2)))),
                        Image.Resampling.BILINEAR)


def jpeg(img: Image.Image, rng: random.Random, lo: int = 10, hi: int = 40) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(lo, hi))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def rescale_jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    return jpeg(rescale(img, rng), rng)


def color(img: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation jitter."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.0, 2.0))


def grayscale(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def blur(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 3.0) * max(img.size) / 500))


def noise(img: Image.Image, rng: random.Random) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    g = np.random.default_rng(rng.randrange(2**32))
    noisy = a + g.normal(0.0, rng.uniform(4, 20), a.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def shift(img: Image.Image, rng: random.Random) -> Image.Image:
    """Translate the content inside a same-size canvas (the uncovered part is a solid colour)."""
    w, h = img.size
    dx, dy = int(w * rng.uniform(-0.2, 0.2)), int(h * rng.uniform(-0.2, 0.2))
    out = Image.new("RGB", (w, h), _rand_color(rng))
    out.paste(img, (dx, dy))
    return out


def lines(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(rng.randint(1, 6)):
        d.line([(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))],
               fill=_rand_color(rng), width=max(1, int(rng.uniform(0.005, 0.02) * max(w, h))))
    return img


def text(img: Image.Image, rng: random.Random) -> Image.Image:
    """Overlay 1-3 random strings in random colours and sizes."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(rng.randint(1, 3)):
        f = _font(rng.uniform(0.05, 0.14) * h)
        d.text((rng.uniform(0, 0.7) * w, rng.uniform(0, 0.85) * h), _rand_text(rng), font=f,
               fill=_rand_color(rng))
    return img


def frame_caption(img: Image.Image, rng: random.Random) -> Image.Image:
    """Padding/frame around the image plus a caption band above or below (meme style)."""
    w, h = img.size
    pad = int(rng.uniform(0.03, 0.12) * max(w, h))
    band = int(rng.uniform(0.12, 0.3) * h)
    top = rng.random() < 0.5
    bg = rng.choice(((255, 255, 255), (0, 0, 0), _rand_color(rng)))
    out = Image.new("RGB", (w + 2 * pad, h + 2 * pad + band), bg)
    out.paste(img, (pad, pad + (band if top else 0)))
    d = ImageDraw.Draw(out)
    fg = (0, 0, 0) if sum(bg) > 380 else (255, 255, 255)
    ty = pad // 2 if top else h + 2 * pad
    d.text((pad, ty), _rand_text(rng, 6, 20), font=_font(band * 0.5), fill=fg)
    return out


def sticker(img: Image.Image, rng: random.Random) -> Image.Image:
    """Paste 1-3 opaque shapes (emoji-like stickers) covering up to ~8 % of the image each."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(rng.randint(1, 3)):
        s = int(rng.uniform(0.1, 0.28) * min(w, h))
        x, y = rng.randrange(max(1, w - s)), rng.randrange(max(1, h - s))
        shape = rng.choice((d.ellipse, d.rectangle))
        shape([x, y, x + s, y + s], fill=_rand_color(rng), outline=_rand_color(rng), width=max(1, s // 12))
    return img


def overlay_on_background(img: Image.Image, rng: random.Random) -> Image.Image:
    """Shrink the image and paste it onto a larger random background (screenshot/collage)."""
    w, h = img.size
    s = rng.uniform(0.5, 0.85)
    small = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.Resampling.BILINEAR)
    out = Image.new("RGB", (w, h), _rand_color(rng))
    out.paste(small, (rng.randint(0, w - small.width), rng.randint(0, h - small.height)))
    return out


# The named evaluation suite: edit name -> function. Combinations draw 2-3 of these.
EDITS: dict[str, Edit] = {
    "crop": crop,
    "rescale_jpeg": rescale_jpeg,
    "color": color,
    "grayscale": grayscale,
    "rotate": rotate,
    "flip": flip,
    "text": text,
    "frame_caption": frame_caption,
    "blur": blur,
    "sticker": sticker,
}


def apply_named(img: Image.Image, names: list[str], rng: random.Random) -> Image.Image:
    """Apply the named edits in order (each from :data:`EDITS`)."""
    for n in names:
        img = EDITS[n](img, rng)
    return img


def random_edit_names(rng: random.Random) -> list[str]:
    """1 to 3 distinct edit names; single edits are as common as combinations."""
    k = rng.choice((1, 1, 1, 2, 3))
    return rng.sample(sorted(EDITS), k)


def gallery_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """The gallery side of a training pair: light, as a reference is stored (crop 0.7-1, flip)."""
    if rng.random() < 0.7:
        img = crop(img, rng, min_area=0.7)
    if rng.random() < 0.5:
        img = flip(img, rng)
    return img


QUERY_GRAYSCALE = 0.25  # default share of query views turned gray (TrainConfig.query_grayscale)


def query_augment(img: Image.Image, rng: random.Random, grayscale_p: float = QUERY_GRAYSCALE) -> Image.Image:
    """The query side of a training pair: the full edit chain an upload may carry.

    Crop/scale (aspect-changing), flip, small and 90-degree rotation, shift, overlay, borders,
    frames and captions, colour, grayscale, blur, noise, lines, text, stickers and JPEG, each with
    its own probability; ``grayscale_p`` is the share of query views turned to grayscale (the
    edit a colour-pretrained trunk is least invariant to).
    """
    if rng.random() < 0.8:
        img = crop(img, rng, min_area=0.25, max_aspect=2.0)
    if rng.random() < 0.5:
        img = flip(img, rng)
    r = rng.random()
    if r < 0.3:
        img = rotate(img, rng, max_deg=35)
    elif r < 0.4:
        img = rotate(img, rng, max_deg=8)
    if rng.random() < 0.08:
        img = rotate90(img, rng)
    if rng.random() < 0.15:
        img = shift(img, rng)
    if rng.random() < 0.12:
        img = overlay_on_background(img, rng)
    if rng.random() < 0.12:
        img = border(img, rng)
    if rng.random() < 0.25:
        img = frame_caption(img, rng)
    if rng.random() < 0.7:
        img = color(img, rng)
    if rng.random() < grayscale_p:
        img = grayscale(img, rng)
    if rng.random() < 0.2:
        img = blur(img, rng)
    if rng.random() < 0.2:
        img = noise(img, rng)
    if rng.random() < 0.2:
        img = lines(img, rng)
    if rng.random() < 0.3:
        img = text(img, rng)
    if rng.random() < 0.2:
        img = sticker(img, rng)
    if rng.random() < 0.3:
        img = rescale_jpeg(img, rng) if rng.random() < 0.5 else jpeg(img, rng, 20, 80)
    return img
