"""An upload's hash signals, computed once per file: MD5 of the bytes, PDQ hash and quality.

**PDQ hex convention.** ThreatExchange's Python library (``python-threatexchange``,
``threatexchange/signal_type/pdq/pdq_hasher.py``, ``_pdq_from_numpy_array``) turns the 256 bits
that ``pdqhash.compute`` returns into hex by joining them into a binary string, reading it as one
integer (first bit most significant) and printing it as 64 lower-case, zero-padded hex digits.
:func:`bits_to_hex` writes the same string (``np.packbits`` is MSB-first within each byte and
byte 0 is the first two hex digits); the tests re-run that library's code path verbatim and
compare, and check the hashes ThreatExchange publishes for its ``bridge-mods`` photos.

**What PDQ is computed on** (:func:`pdq_from_image`): the image as decoded with the JPEG draft at
:data:`PDQ_MIN_SIDE`, then reduced by an integer factor (``Image.reduce``, a box filter) while the
short side stays >= :data:`PDQ_MIN_SIDE`; never a resampled image, which costs PDQ far more bits.
The measurement behind the rule and what each input costs in distance margin: docs/operations.md,
"What PDQ is computed on" (``modscan bench pdq-input``).

Two deliberate differences from ``threatexchange``'s ``pdq_from_bytes``: the image is made upright
by its EXIF orientation and transparency is composited over white (the decoder's
:func:`~pipeline.ingest.decode.open_image`, so that PDQ sees what the descriptor sees). A list hash
computed by a tool that ignores EXIF (``threatexchange`` does) on a file with a non-trivial
orientation is the hash of a rotation of what we hash, far apart in Hamming distance.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from pipeline.ingest.decode import DecodeConfig, Decoder, open_image

PDQ_BITS = 256
PDQ_BYTES = PDQ_BITS // 8
PDQ_HEX_LEN = PDQ_BITS // 4
MD5_HEX_LEN = 32
# ThreatExchange's PdqSignal: QUALITY_THRESHOLD (below it "too unreliable to match on") and
# PDQ_CONFIDENT_MATCH_THRESHOLD (a match is distance <= 31), HMA's defaults.
PDQ_QUALITY_FLOOR = 50
PDQ_MATCH_DISTANCE = 31
# Short side PDQ is computed at (docs/operations.md, "What PDQ is computed on").
PDQ_MIN_SIDE = 256
# pdq_quality of a row without a PDQ hash (not decodable, read error): PDQ's own range is 0-100.
NO_QUALITY = -1

_HEX = re.compile(r"[0-9a-fA-F]*")


def md5_hex(data: bytes) -> str:
    """MD5 of the file's bytes as 32 lower-case hex digits (what MD5 lists hold: the file's, not
    the picture's; any re-encoding changes it)."""
    return hashlib.md5(bytes(data)).hexdigest()


def bits_to_hex(bits: np.ndarray | Sequence[int]) -> str:
    """256 bits (0/1, first bit first) -> 64 lower-case hex digits, first bit most significant:
    ThreatExchange's convention (``pdq_hasher._pdq_from_numpy_array``)."""
    b = np.asarray(bits)
    if b.shape != (PDQ_BITS,):
        raise ValueError(f"a PDQ hash has {PDQ_BITS} bits, got shape {b.shape}")
    return np.packbits(b.astype(bool)).tobytes().hex()


def pdq_hex(rgb: np.ndarray) -> tuple[str, int]:
    """``(H, W, 3)`` (or ``(H, W)`` grey) uint8 pixels -> (PDQ hex, quality 0-100) with
    ``pdqhash.compute``, the pixels hashed exactly as given. ValueError for another shape/dtype
    (an RGBA array: composite it first, as the decoder does)."""
    import pdqhash

    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"PDQ takes uint8 pixels, got {a.dtype}")
    if a.ndim == 2:  # grey: what threatexchange does for mode L (replicate to 3 channels)
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise ValueError(f"PDQ takes (H, W, 3) RGB pixels, got shape {a.shape}")
    bits, quality = pdqhash.compute(np.ascontiguousarray(a))
    return bits_to_hex(bits), int(quality)


def pdq_input(im: Image.Image, min_side: int | None = PDQ_MIN_SIDE) -> Image.Image:
    """The image PDQ is computed on: ``im`` (RGB) reduced by the largest integer factor that keeps
    its short side >= ``min_side`` (a box filter; ``None``: full resolution)."""
    im = im if im.mode == "RGB" else im.convert("RGB")
    if min_side is not None:
        factor = min(im.size) // int(min_side)
        if factor >= 2:
            im = im.reduce(factor)
    return im


def pdq_from_image(im: Image.Image, min_side: int | None = PDQ_MIN_SIDE) -> tuple[str, int]:
    """PDQ (hex, quality) of a decoded image, per :func:`pdq_input`. Pass the image as decoded
    with the JPEG draft at ``min_side`` (``open_image`` with ``high_res = min_side``), not a
    resampled one: docs/operations.md says what resampling costs."""
    return pdq_hex(np.asarray(pdq_input(im, min_side)))


def pdq_decode_config(cfg: DecodeConfig | None = None, min_side: int = PDQ_MIN_SIDE) -> DecodeConfig:
    """``cfg``'s input bounds (max bytes, max pixels, min side) with the JPEG draft at
    ``min_side``: decoding for PDQ refuses exactly what the job's decoder refuses."""
    return replace(cfg or DecodeConfig(), high_res=max(int(min_side), 1))


def pdq_from_bytes(data: bytes, cfg: DecodeConfig | None = None, min_side: int | None = PDQ_MIN_SIDE) -> tuple[str, int]:
    """PDQ (hex, quality) of an encoded file: decoded with the decoder's bounds, EXIF-upright,
    transparency over white, the JPEG draft at ``min_side`` (``None``: full resolution, the
    reference hash for exports). Raises :class:`~pipeline.ingest.decode.DecodeError`."""
    dc = pdq_decode_config(cfg, min_side or 1 << 30)
    return pdq_from_image(open_image(bytes(data), dc), min_side)


def _check_hex(h: str, n: int) -> str:
    if not isinstance(h, str) or len(h) != n or not _HEX.fullmatch(h):
        raise ValueError(f"expected {n} hex digits, got {h!r}")
    return h.lower()


def hamming(a_hex: str, b_hex: str) -> int:
    """Bits that differ between two hex hashes of the same length (PDQ: 0-256)."""
    if not isinstance(a_hex, str) or not isinstance(b_hex, str) or len(a_hex) != len(b_hex) or not a_hex:
        raise ValueError(f"hamming needs two hex strings of one length, got {a_hex!r} and {b_hex!r}")
    return (int(_check_hex(a_hex, len(a_hex)), 16) ^ int(_check_hex(b_hex, len(b_hex)), 16)).bit_count()


def pack_hex(hashes: Iterable[str]) -> np.ndarray:
    """PDQ hex strings -> ``(n, 32)`` uint8 codes for faiss binary indexes: byte ``i`` is hex digits
    ``2i, 2i+1``, bit order within a byte irrelevant to faiss (its Hamming distance is the popcount
    of the XOR of whole bytes), so faiss's distance equals :func:`hamming`. ValueError naming the
    first malformed hash."""
    hs = list(hashes)
    if not hs:
        return np.zeros((0, PDQ_BYTES), np.uint8)
    try:
        raw = bytes.fromhex("".join(hs))
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != PDQ_BYTES * len(hs) or any(len(h) != PDQ_HEX_LEN for h in hs):
        for h in hs:
            _check_hex(h, PDQ_HEX_LEN)
        raise ValueError("malformed PDQ hex")  # pragma: no cover - the loop names the bad one
    return np.frombuffer(raw, np.uint8).reshape(len(hs), PDQ_BYTES).copy()


class SignalDecoder(Decoder):
    """The job's decoder: :class:`~pipeline.ingest.decode.Decoder` plus ``md5`` (of the bytes,
    also for a file that does not decode: MD5 lists match files; None for a read error),
    ``pdq_hash`` and ``pdq_quality`` (:data:`NO_QUALITY` where no hash) in the same decode.

    PDQ is computed on the image ``open_image`` returns, i.e. with the decoder's own JPEG draft
    (>= ``high_res`` = 160 px), reduced by :func:`pdq_input`: row 3 of the module docstring's
    table (0-14 bits off the full-resolution hash, every bridge-mods edit within 16 of its list
    entry). Drafting at :data:`PDQ_MIN_SIDE` instead would change the descriptor's input pixels.
    Measured cost: see ``docs/operations.md`` ("Hash-list banks")."""

    EXTRA_COLUMNS = (("md5", object), ("pdq_hash", object), ("pdq_quality", np.int16))

    def extra_defaults(self) -> dict[str, Any]:
        return {"md5": None, "pdq_hash": None, "pdq_quality": NO_QUALITY}

    def file_extras(self, data: bytes) -> dict[str, Any]:
        return {"md5": md5_hex(data) if data else None}

    def image_extras(self, im: Image.Image) -> dict[str, Any]:
        try:
            h, q = pdq_from_image(im, PDQ_MIN_SIDE)
        except Exception:  # a hashing bug must not cost the row its descriptor decision
            return {"pdq_hash": None, "pdq_quality": NO_QUALITY}
        return {"pdq_hash": h, "pdq_quality": q}
