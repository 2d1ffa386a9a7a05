"""Robust, bounded image decoding: bytes -> (low-res, high-res) uint8 arrays or an error code.

Never raises for a bad input: every failure becomes an :class:`~pipeline.schemas.ErrorCode` and a
message. Bounds: ``max_bytes`` before parsing, ``max_pixels`` from the header before any pixel is
decoded (so a 50 KB PNG claiming 100k x 100k pixels costs nothing), Pillow's own bomb check as a
second line, and a minimum side. Handles EXIF orientation, the first frame of animations and every
Pillow mode (CMYK, 16/32-bit, float, palette with transparency, LA/RGBA over white).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from models.preprocess import resize_pair
from pipeline.schemas import ErrorCode

# A truncated file must be an error, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodeConfig:
    """Input bounds and output sizes of the decoder; every field an integer >= 1 (ValueError).

    The sizes are the model's (its card's ``low_res``/``high_res``): the job sets them from the
    card, never from ``[job.decode]``."""

    low_res: int = 112
    high_res: int = 160
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000
    min_side: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {v!r}")

    @classmethod
    def for_model(cls, model: Any, base: DecodeConfig | None = None) -> DecodeConfig:
        """``base`` (default bounds if None) with the sizes of ``model``: a ``DescriptorConfig``,
        or anything with ``low_res``/``high_res`` (a card's ``config``, an extractor's). The one
        place a decoder gets a model's resolutions."""
        return replace(base or cls(), low_res=int(model.low_res), high_res=int(model.high_res))


class DecodeError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over white (uploads are shown on white)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if hi > 255 or lo < 0:  # 16-bit / float range: rescale to 8 bits
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def _object_array(xs: list[Any]) -> np.ndarray:
    out = np.empty(len(xs), dtype=object)
    out[:] = xs
    return out


def open_image(data: bytes, cfg: DecodeConfig) -> Image.Image:
    """Bytes -> RGB PIL image (EXIF-upright, first frame), or :class:`DecodeError`."""
    if len(data) == 0:
        raise DecodeError(ErrorCode.EMPTY_FILE, "zero-byte object")
    if len(data) > cfg.max_bytes:
        raise DecodeError(ErrorCode.FILE_TOO_LARGE, f"{len(data)} bytes > max_bytes={cfg.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise DecodeError(ErrorCode.DECOMPRESSION_BOMB,
                                  f"{w}x{h} = {w * h} pixels > max_pixels={cfg.max_pixels}")
            if min(w, h) < cfg.min_side:
                raise DecodeError(ErrorCode.IMAGE_TOO_SMALL, f"{w}x{h} is below min_side={cfg.min_side}")
            if getattr(im, "is_animated", False):
                im.seek(0)
            # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale, the smallest that still covers the
            # high-res side (the biggest decode-time saving there is: `modscan bench decode`).
            if im.format == "JPEG":
                im.draft(im.mode, (cfg.high_res, cfg.high_res))
            im.load()
            upright = ImageOps.exif_transpose(im) or im
            return to_rgb(upright)
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        raise DecodeError(ErrorCode.NOT_AN_IMAGE, f"no image format recognised: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(ErrorCode.DECOMPRESSION_BOMB, f"{e} (refused before decoding; max_pixels={cfg.max_pixels})") from None
    except (OSError, SyntaxError, EOFError) as e:
        msg = str(e)
        low = msg.lower()
        code = ErrorCode.TRUNCATED if ("truncated" in low or "broken data stream" in low or "end of" in low
                                       or isinstance(e, EOFError)) else ErrorCode.DECODE_ERROR
        raise DecodeError(code, f"{type(e).__name__}: {msg}") from None
    except (ValueError, TypeError, MemoryError, IndexError, KeyError, ZeroDivisionError) as e:
        raise DecodeError(ErrorCode.DECODE_ERROR, f"{type(e).__name__}: {e}") from None


# A picture is "low content" when at least this share of its high-res square lies within
# LOW_CONTENT_TOLERANCE levels (every channel) of its median colour: flat colours, near-uniform
# pictures, almost empty transparent canvases (composited over white). Such an upload carries
# nothing to identify it by and is never a match. Over coco256 and 800 training photos the largest
# share is 0.90; flat and almost-empty transparent pictures are at 0.999-1.0.
LOW_CONTENT_SHARE = 0.97
LOW_CONTENT_TOLERANCE = 12


def low_content_share(high: np.ndarray) -> float:
    """``(h, w, 3)`` uint8 -> share of pixels within the tolerance of the median colour."""
    med = np.median(high.reshape(-1, 3), axis=0).astype(np.int16)
    dev = np.abs(high.astype(np.int16) - med).max(axis=2)
    return float((dev <= LOW_CONTENT_TOLERANCE).mean())


def is_low_content(high: np.ndarray) -> bool:
    """True for a near-uniform picture (see :data:`LOW_CONTENT_SHARE`)."""
    return low_content_share(high) >= LOW_CONTENT_SHARE


class Decoder:
    """Stage: ``{"image_key", "bytes", ["read_error"]}`` -> decoded batch.

    Output columns: ``image_key``, ``image_sha256``, ``ok`` (bool), ``low_content`` (bool: decoded
    but near-uniform, see :func:`is_low_content`), ``error_code``, ``error_message``, ``low``
    ``(B, l, l, 3)`` and ``high`` ``(B, h, h, 3)`` uint8 (zeros where ``ok`` is false), and
    ``bytes``, the encoded input passed on (None where unread): the few uploads whose candidates
    need geometric verification are decoded again at its larger size from them
    (:mod:`pipeline.gallery.verify`), so every other upload keeps the cheap small decode. Rows in =
    rows out, always.

    A subclass adds per-file columns (:data:`EXTRA_COLUMNS`, their values for a row that has none
    in :meth:`extra_defaults`) computed from the bytes (:meth:`file_extras`) and from the image
    ``open_image`` returned (:meth:`image_extras`), in the same single decode:
    :class:`pipeline.signals.hashes.SignalDecoder` (MD5, PDQ) is the one the job runs.
    """

    EXTRA_COLUMNS: tuple[tuple[str, Any], ...] = ()  # (column, numpy dtype)

    def __init__(self, cfg: DecodeConfig | None = None) -> None:
        self.cfg = cfg or DecodeConfig()

    def decode_all(self, datas: list[bytes], names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Decode a list of files that must all be good (evaluation, benchmarks, checks):
        ``{"low": (N, l, l, 3), "high": (N, h, h, 3), "low_content": (N,)}``; a ``ValueError``
        naming the first undecodable ones (by ``names`` if given) otherwise."""
        rows = [self.decode_one(d) for d in datas]
        bad = [(names[i] if names else f"#{i}") + f" ({r['error_code']})" for i, r in enumerate(rows) if not r["ok"]]
        if bad:
            raise ValueError(f"undecodable images: {bad[:10]}")
        return {"low": np.stack([r["low"] for r in rows]), "high": np.stack([r["high"] for r in rows]),
                "low_content": np.asarray([r["low_content"] for r in rows], bool)}

    def extra_defaults(self) -> dict[str, Any]:
        return {}

    def file_extras(self, data: bytes) -> dict[str, Any]:
        return {}

    def image_extras(self, im: Image.Image) -> dict[str, Any]:
        return {}

    def decode_one(self, data: bytes | None, read_error: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"image_sha256": None, "ok": False, "low_content": False,
                               "error_code": None, "error_message": None,
                               "low": np.zeros((cfg.low_res, cfg.low_res, 3), np.uint8),
                               "high": np.zeros((cfg.high_res, cfg.high_res, 3), np.uint8),
                               **self.extra_defaults()}
        if read_error:
            out["error_code"], out["error_message"] = ErrorCode.READ_ERROR.value, read_error
            return out
        data = bytes(data or b"")
        out["image_sha256"] = hashlib.sha256(data).hexdigest()
        out.update(self.file_extras(data))
        try:
            im = open_image(data, cfg)
            out.update(self.image_extras(im))
            out["low"], out["high"] = resize_pair(im, cfg.low_res, cfg.high_res)
            out["low_content"] = is_low_content(out["high"])
            out["ok"] = True
        except DecodeError as e:
            out["error_code"], out["error_message"] = e.code.value, e.message[:500]
        except Exception as e:  # a decoder bug must not kill the job: keep the row, flag it
            out["error_code"], out["error_message"] = ErrorCode.INTERNAL_ERROR.value, f"{type(e).__name__}: {e}"[:500]
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = list(batch["image_key"])
        datas = list(batch["bytes"])
        read_errors = list(batch["read_error"]) if "read_error" in batch else [None] * len(keys)
        rows = [self.decode_one(d, r if isinstance(r, str) and r else None) for d, r in zip(datas, read_errors)]
        extras = {c: np.asarray([r[c] for r in rows], dtype=t) for c, t in self.EXTRA_COLUMNS}
        return {**extras,
            "image_key": np.asarray(keys, dtype=object),
            "bytes": _object_array([d if isinstance(d, bytes | bytearray | memoryview) else None for d in datas]),
            "image_sha256": np.asarray([r["image_sha256"] for r in rows], dtype=object),
            "ok": np.asarray([r["ok"] for r in rows], dtype=bool),
            "low_content": np.asarray([r["low_content"] for r in rows], dtype=bool),
            "error_code": np.asarray([r["error_code"] for r in rows], dtype=object),
            "error_message": np.asarray([r["error_message"] for r in rows], dtype=object),
            "low": np.stack([r["low"] for r in rows]) if rows else np.zeros((0, self.cfg.low_res, self.cfg.low_res, 3), np.uint8),
            "high": np.stack([r["high"] for r in rows]) if rows else np.zeros((0, self.cfg.high_res, self.cfg.high_res, 3), np.uint8),
        }
