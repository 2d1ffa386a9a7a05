"""pipeline/ingest/decode.py: every kind of bad or odd input -> a correct decode or one stable error code
(never a raise); the low-content guard; ``DecodeConfig`` checks and sizes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import photo, png_bytes, shared_dir
from PIL import Image

from models.synthetic import generate
from pipeline.ingest.decode import DecodeConfig, Decoder, is_low_content

DEC = Decoder(DecodeConfig(low_res=48, high_res=64))


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb() -> Image.Image:
    return Image.fromarray(photo("astronaut"))


def _ok(data: bytes) -> dict:
    r = DEC.decode_one(data)
    assert r["ok"], r["error_message"]
    assert r["low"].shape == (48, 48, 3) and r["high"].shape == (64, 64, 3) and r["low"].dtype == np.uint8
    return r


def _err(data: bytes, code: str) -> dict:
    r = DEC.decode_one(data)
    assert not r["ok"] and r["error_code"] == code, (r["error_code"], r["error_message"])
    assert r["error_message"]
    return r


def test_truncated_jpeg() -> None:
    data = _enc(_rgb(), "JPEG")
    _err(data[: len(data) // 2], "truncated")


def test_zero_bytes() -> None:
    _err(b"", "empty_file")


def test_random_bytes() -> None:
    _err(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_an_image")


@pytest.mark.parametrize("data", [b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
                                  b"<!DOCTYPE html><html><body><img src=x></body></html>"])
def test_pdf_or_html_named_jpg(data: bytes) -> None:
    _err(data, "not_an_image")


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that claims w x h pixels (the classic decompression bomb shape)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header() -> None:
    r = _err(_png_header_only(100_000, 100_000), "decompression_bomb")
    assert "pixels" in r["error_message"]


def test_huge_dimensions_small_file_within_pillow_limit_but_over_ours() -> None:
    d = Decoder(DecodeConfig(low_res=48, high_res=64, max_pixels=1_000_000))
    r = d.decode_one(_png_header_only(2000, 2000))
    assert r["error_code"] == "decompression_bomb"


def test_file_too_large_in_bytes() -> None:
    d = Decoder(DecodeConfig(max_bytes=1000))
    assert d.decode_one(_enc(_rgb(), "PNG"))["error_code"] == "file_too_large"


def test_one_pixel_image() -> None:
    _err(_enc(Image.new("RGB", (1, 1)), "PNG"), "image_too_small")


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    r = _ok(_enc(_rgb().convert("CMYK"), "JPEG"))
    ref = _ok(_enc(_rgb(), "JPEG"))
    assert np.abs(r["high"].astype(int) - ref["high"].astype(int)).mean() < 12


def test_16_bit_png_keeps_its_contrast() -> None:
    g = (np.asarray(_rgb().convert("L"), dtype=np.uint16) * 257)
    im = Image.fromarray(g)
    assert im.mode.startswith("I;16")
    r = _ok(_enc(im, "PNG"))
    assert r["high"].std() > 30  # not a flat white/black image


def test_palette_with_transparency_composited_on_white() -> None:
    im = Image.new("P", (64, 64), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.info["transparency"] = 0
    r = _ok(_enc(im, "PNG", transparency=0))
    assert (r["high"] == 255).all()  # fully transparent -> white


def test_animated_gif_and_webp_use_the_first_frame() -> None:
    frames = [Image.new("RGB", (80, 80), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("GIF", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                       **({"lossless": True} if fmt == "WEBP" else {}))
        r = _ok(buf.getvalue())
        assert r["high"][..., 0].mean() > 200 and r["high"][..., 1].mean() < 60, fmt


def test_exif_rotated_image_is_made_upright() -> None:
    base = Image.new("RGB", (120, 60), (0, 0, 0))
    base.paste((255, 255, 255), (0, 0, 60, 60))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    r = DEC.decode_one(_enc(base, "JPEG", exif=exif, quality=95))
    assert r["ok"]
    # displayed upright the white half is on top: 60 wide x 120 tall, white top
    top, bottom = r["high"][:20].mean(), r["high"][-20:].mean()
    assert top > 200 and bottom < 50, (top, bottom)


def test_every_mode_in_the_shared_edge_cases_decodes() -> None:
    d = shared_dir("edge-cases/image-modes")
    ref = DEC.decode_one((d / "original.jpg").read_bytes())["high"].astype(int)
    for f in sorted(d.iterdir()):
        r = DEC.decode_one(f.read_bytes())
        if f.suffix == ".md":
            assert r["error_code"] == "not_an_image"
            continue
        assert r["ok"], (f.name, r["error_message"])
        if f.stem not in {"HSV", "LAB", "F", "I", "1"}:  # colour-space/precision variants differ by design
            assert np.abs(r["high"].astype(int) - ref).mean() < 40, f.name


def test_batch_call_keeps_one_row_per_input() -> None:
    good = _enc(_rgb(), "PNG")
    out = DEC({"image_key": np.array(["a", "b", "c"], object), "bytes": np.array([good, b"", b"zz"], object),
               "read_error": np.array([None, None, None], object)})
    assert list(out["ok"]) == [True, False, False]
    assert list(out["error_code"]) == [None, "empty_file", "not_an_image"]
    assert out["low"].shape == (3, 48, 48, 3)
    r = DEC({"image_key": np.array(["m"], object), "bytes": np.array([b""], object),
             "read_error": np.array(["NoSuchKey"], object)})
    assert r["error_code"][0] == "read_error"


def test_decode_config_for_a_model_keeps_the_bounds_and_takes_the_sizes() -> None:
    from models.descriptor import DescriptorConfig

    base = DecodeConfig(max_bytes=1000, min_side=20)
    cfg = DecodeConfig.for_model(DescriptorConfig(high_res=160, low_res=128), base=base)
    assert (cfg.low_res, cfg.high_res, cfg.max_bytes, cfg.min_side) == (128, 160, 1000, 20)
    assert DecodeConfig.for_model(DescriptorConfig(high_res=224, low_res=160)).max_bytes == DecodeConfig().max_bytes


def test_decode_all_stacks_good_files_and_names_bad_ones() -> None:
    def jpeg(colour_shift: int) -> bytes:
        a = (np.indices((64, 80)).sum(0)[..., None] * [1, 2, 3] + colour_shift) % 256
        b = io.BytesIO()
        Image.fromarray(a.astype(np.uint8)).save(b, format="JPEG")
        return b.getvalue()

    dec = Decoder(DecodeConfig(low_res=32, high_res=48))
    out = dec.decode_all([jpeg(0), jpeg(40)])
    assert out["low"].shape == (2, 32, 32, 3) and out["high"].shape == (2, 48, 48, 3)
    assert out["low_content"].tolist() == [False, False]
    with pytest.raises(ValueError, match=r"undecodable images: \['broken.jpg \("):
        dec.decode_all([jpeg(0), b"not an image"], names=["good.jpg", "broken.jpg"])


# -- low-content guard ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,expected", [("flat", True), ("transparent", True), ("gradient", False),
                                           ("noise", False), ("text_screenshot", False)])
def test_low_content_is_decided_by_the_decoder(kind: str, expected: bool) -> None:
    dec = Decoder(DecodeConfig(low_res=48, high_res=64))
    for i in range(6):
        k, im = generate("low-content-test", i, (kind,))
        if kind == "gradient" and is_low_content(np.asarray(im.convert("RGB").resize((64, 64)))):
            continue  # a gradient between two near-identical colours is a flat picture
        r = dec.decode_one(png_bytes(im))
        assert r["ok"] and r["low_content"] is expected, (kind, i)


def test_photos_are_not_low_content() -> None:
    from conftest import photo

    dec = Decoder(DecodeConfig(low_res=48, high_res=64))
    for name in ("astronaut", "camera", "coins", "moon", "page", "horse", "brick"):
        buf = io.BytesIO()
        Image.fromarray(photo(name)).save(buf, format="JPEG")
        assert not dec.decode_one(buf.getvalue())["low_content"], name


def test_decode_config_checks_its_fields() -> None:
    for bad in ({"min_side": 0}, {"max_bytes": True}, {"low_res": 112.0}, {"max_pixels": "64"}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            DecodeConfig(**bad)
