"""PDQ / MD5 signals of an upload: pdqhash's bits, ThreatExchange's hex, the bridge-mods fixture."""

from __future__ import annotations

import io

import faiss
import numpy as np
import pdqhash
import pytest
from conftest import jpeg_bytes, photo, png_bytes, shared_dir
from PIL import Image

from pipeline.ingest.decode import DecodeConfig, Decoder, open_image
from pipeline.signals.hashes import (
    NO_QUALITY,
    PDQ_MATCH_DISTANCE,
    PDQ_MIN_SIDE,
    PDQ_QUALITY_FLOOR,
    SignalDecoder,
    bits_to_hex,
    hamming,
    md5_hex,
    pack_hex,
    pdq_from_bytes,
    pdq_hex,
    pdq_input,
)

BRIDGE = "edge-cases/pdq-bridge-mods"
# ThreatExchange, python-threatexchange/threatexchange/signal_type/pdq/signal.py, PdqSignal.get_examples():
# "pdq/data/bridge-mods", the 12 files of that folder in name order (the first is also the expected hash
# of aaa-orig.jpg in HMA's OpenMediaMatch tests and of bridge-1-original.jpg in the Java PDQHasherTest).
BRIDGE_TE_HASHES = {
    "aaa-orig.jpg": "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22",
    "blur-a-little.jpg": "f8f8f0cee0f4a84f06370a2a038f63f0b36e26d596621e1d33e6b39c4e9c9b22",
    "blur-a-lot.jpg": "f8f8f0cee0f4a84f0637022a038f67f0b36e26d596621e1d33e6b39c4e9c9b22",
    "high-contrast.jpg": "f8f8f0cee0f4a84f06370a2a068f67f0b36e26d596621e1d33e6339c4e9c9b22",
    "high-saturation.jpg": "f8f8f0cee0f4a84f06370a22038f67f0b36e2ed596221e1d33e6b39c4e9c9b22",
    "sharpen-a-little.jpg": "f8f8f0cee0f4a84f0e370a22038f67f0b36e2ed596221e1d33e6b39c4a9c9b22",
    "sharpen-a-lot.jpg": "d8f8f0cec0f4a84f8e370a22038f67f0b36a2ed597231e1d72e6b39c4a9c9b22",
    "shrink-a-little.jpg": "f8f8f0cee0f4a84f06370a22038f67f0b36e2ed596621e1d33e6339c4e9c9b22",
    "shrink-a-lot.jpg": "d0f8f1ccc0f4a84d0a370a3a228f67f0b36e2ed5b6623e1d33e6339c4e9c9b22",
    "square-128x128.jpg": "d8f8f1eec0f4a84f0e37022a078f63f0b36e2ed596621e1d33e6239c4e9c9b22",
    "square-256x256.jpg": "d8f8f0cec4f4a84f0637022a078f67f0b36e2ee5b6621e1d33e6239c4e9c9b22",
    "square-512x512.jpg": "d8f8f0cec0f4a84f0637022a278f67f0b36e2ed596621e1d33e6339c4e9c9b22",
}


def te_pdq_from_numpy_array(array: np.ndarray) -> tuple[str, int]:
    """ThreatExchange's ``_pdq_from_numpy_array`` (python-threatexchange, signal_type/pdq/pdq_hasher.py),
    re-implemented line for line: the code path that writes the hex of every ThreatExchange PDQ signal."""
    hash_vector, quality = pdqhash.compute(array)
    bin_str = "".join([str(x) for x in hash_vector])
    hex_str = "%0*X" % ((len(bin_str) + 3) // 4, int(bin_str, 2))  # noqa: UP031  (verbatim)
    hex_str = hex_str.lower()
    return hex_str, quality


def te_convert_image(image: Image.Image) -> np.ndarray:
    """ThreatExchange's ``_convert_image_to_correct_array_dimension`` (same file), force_rgb=False."""
    if image.mode == "LA":
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.concatenate([array[..., np.newaxis]] * 3, axis=2)
    return array


def _bits(h: str) -> np.ndarray:
    """64 hex digits -> ``(256,)`` uint8 of 0/1, first hex digit's high bit first."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8))


PICTURES = ["astronaut", "coffee", "chelsea", "rocket"]


# ---------------------------------------------------------------------------------------------
# hex convention and pdqhash's bits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PICTURES)
def test_pdq_hex_is_pdqhash_bits_in_threatexchange_hex(name: str) -> None:
    rgb = photo(name)
    h, q = pdq_hex(rgb)
    bits, quality = pdqhash.compute(np.ascontiguousarray(rgb))
    assert np.array_equal(_bits(h), np.asarray(bits, np.uint8))  # the same 256 bits, in order
    assert q == int(quality)
    assert (h, q) == te_pdq_from_numpy_array(np.ascontiguousarray(rgb))  # ThreatExchange's own hex
    assert len(h) == 64 and h == h.lower()


def test_bits_to_hex_first_bit_is_most_significant() -> None:
    bits = np.zeros(256, np.uint8)
    bits[0] = 1
    assert bits_to_hex(bits) == "8" + "0" * 63
    bits[:] = 0
    bits[255] = 1
    assert bits_to_hex(bits) == "0" * 63 + "1"
    rng = np.random.default_rng(3)
    for _ in range(20):  # leading zero bits must stay (zero-padded to 64 digits)
        b = rng.integers(0, 2, 256).astype(np.uint8)
        b[:9] = 0
        h = bits_to_hex(b)
        assert h == f"{int(''.join(map(str, b)), 2):064x}"
        assert np.array_equal(_bits(h), b)
    with pytest.raises(ValueError):
        bits_to_hex(np.zeros(255))


def test_grey_arrays_hash_like_threatexchange_mode_l() -> None:
    grey = np.asarray(Image.fromarray(photo("camera")).convert("L"))
    assert pdq_hex(grey) == te_pdq_from_numpy_array(te_convert_image(Image.fromarray(grey)))


def test_pdq_hex_refuses_what_pdqhash_cannot_take() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pdq_hex(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        pdq_hex(np.zeros((64, 64, 4), np.uint8))


def test_threatexchange_library_itself_when_installed() -> None:
    te = pytest.importorskip("threatexchange.signal_type.pdq.pdq_hasher", reason="needs the exchange extra (threatexchange)")
    for name in PICTURES:
        rgb = photo(name)
        data = png_bytes(rgb)
        assert te.pdq_from_bytes(data) == pdq_from_bytes(data, min_side=None)
        assert te.pdq_from_bytes(data) == pdq_hex(rgb)


# ---------------------------------------------------------------------------------------------
# ThreatExchange's bridge-mods photos
# ---------------------------------------------------------------------------------------------
def test_bridge_mods_full_resolution_equals_threatexchange_published_hashes() -> None:
    d = shared_dir(BRIDGE)
    for name, expected in BRIDGE_TE_HASHES.items():
        data = (d / name).read_bytes()
        assert te_pdq_from_numpy_array(te_convert_image(Image.open(io.BytesIO(data))))[0] == expected, name
        h, q = pdq_from_bytes(data, min_side=None)
        assert (h, q) == (expected, 100), name


def test_bridge_mods_match_their_original_within_31_as_the_job_hashes_them() -> None:
    """Every edit matches the original's list hash (ThreatExchange's full-resolution hash) within 31 as
    the job's SignalDecoder computes it (the shipped model's decode sizes), and within a few bits of its
    own list hash. Measured (module docstring of pipeline.signals.hashes, the decoder's draft): at most
    16 bits to the original, 0-14 to its own; none of the 12 fail."""
    from models.card import read_card

    d = shared_dir(BRIDGE)
    names = sorted(BRIDGE_TE_HASHES)
    datas = [(d / n).read_bytes() for n in names]
    dec = SignalDecoder(DecodeConfig.for_model(read_card(None).config))
    out = dec({"image_key": np.asarray(names, dtype=object), "bytes": np.asarray(datas, dtype=object)})
    orig = BRIDGE_TE_HASHES["aaa-orig.jpg"]
    to_orig = {n: hamming(h, orig) for n, h in zip(names, out["pdq_hash"])}
    assert max(to_orig.values()) <= 16 < PDQ_MATCH_DISTANCE, to_orig
    own = {n: hamming(h, BRIDGE_TE_HASHES[n]) for n, h in zip(names, out["pdq_hash"])}
    assert max(own.values()) <= 14, own
    assert list(out["pdq_quality"]) == [100] * len(names)


def test_the_decoder_square_is_a_worse_pdq_input_than_the_draft() -> None:
    """Why PDQ is computed on the decoded image, not on the decoder's 160 px square: there an exact copy is already far off."""
    d = shared_dir(BRIDGE)
    data = (d / "aaa-orig.jpg").read_bytes()
    sq = Decoder(DecodeConfig(high_res=160, low_res=128)).decode_one(data)["high"]
    off_square = hamming(pdq_hex(sq)[0], BRIDGE_TE_HASHES["aaa-orig.jpg"])
    off_draft = hamming(pdq_from_bytes(data)[0], BRIDGE_TE_HASHES["aaa-orig.jpg"])
    assert off_draft < off_square
    assert off_draft <= 6


# ---------------------------------------------------------------------------------------------
# hamming, packing, md5
# ---------------------------------------------------------------------------------------------
def test_hamming() -> None:
    assert hamming("0" * 64, "0" * 64) == 0
    assert hamming("0" * 64, "f" * 64) == 256
    assert hamming("0" * 63 + "1", "0" * 64) == 1
    assert hamming("8" + "0" * 63, "0" * 64) == 1
    assert hamming("F" * 64, "f" * 64) == 0
    assert hamming(BRIDGE_TE_HASHES["aaa-orig.jpg"], BRIDGE_TE_HASHES["blur-a-little.jpg"]) == 2
    assert hamming("0" * 32, "f" * 32) == 128  # MD5-sized hex too
    for a, b in (("0" * 64, "0" * 63), ("g" * 64, "0" * 64), ("", "")):
        with pytest.raises(ValueError):
            hamming(a, b)


def test_faiss_hamming_on_packed_codes_equals_hamming() -> None:
    rng = np.random.default_rng(0)
    hs = [rng.bytes(32).hex() for _ in range(40)]
    hs += ["0" * 64, "f" * 64, "8" + "0" * 63, "0" * 63 + "1"]
    codes = pack_hex(hs)
    assert codes.shape == (len(hs), 32) and codes.dtype == np.uint8
    index = faiss.IndexBinaryFlat(256)
    index.add(codes)
    D, I = index.search(codes, len(hs))
    for q in range(len(hs)):
        for d, i in zip(D[q], I[q]):
            assert int(d) == hamming(hs[q], hs[i])
    assert [row.tobytes().hex() for row in codes] == hs  # byte i is hex digits 2i, 2i+1


def test_pack_hex_names_the_bad_hash() -> None:
    assert pack_hex([]).shape == (0, 32)
    with pytest.raises(ValueError, match="zz"):
        pack_hex(["0" * 64, "zz" + "0" * 62])
    with pytest.raises(ValueError, match="64 hex"):
        pack_hex(["0" * 62])


def test_md5_hex() -> None:
    # ThreatExchange VideoMD5Signal.get_examples(): the MD5 of no bytes
    assert md5_hex(b"") == "d41d8cd98f00b204e9800998ecf8427e"
    assert md5_hex(b"abc") == "900150983cd24fb0d6963f7d28e17f72"  # RFC 1321 test suite


# ---------------------------------------------------------------------------------------------
# PDQ input and the stage
# ---------------------------------------------------------------------------------------------
def test_pdq_input_reduces_by_an_integer_factor_keeping_min_side() -> None:
    im = Image.fromarray(np.zeros((800, 1100, 3), np.uint8))
    out = pdq_input(im)
    assert out.size == (-(-1100 // 3), -(-800 // 3)) and min(out.size) >= PDQ_MIN_SIDE  # reduce rounds up
    small = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    assert pdq_input(small).size == (400, 300)  # factor 1: as decoded
    assert pdq_input(im, None).size == (1100, 800)


def test_signal_decoder_adds_md5_and_pdq_rows_in_rows_out_and_never_raises_for_a_bad_row() -> None:
    good = jpeg_bytes(photo("astronaut"))
    png = png_bytes(photo("coffee"))
    flat = png_bytes(np.full((200, 200, 3), 128, np.uint8))
    corrupt = good[: len(good) // 3]
    batch = {"image_key": np.asarray(["a", "b", "c", "d", "e", "f", "g"], dtype=object),
             "bytes": np.asarray([good, png, corrupt, b"", b"not an image", flat, good], dtype=object),
             "read_error": np.asarray([None, None, None, None, None, None, "timeout"], dtype=object)}
    out = SignalDecoder()(batch)
    assert list(out["image_key"]) == list(batch["image_key"])
    assert len(out["md5"]) == len(out["pdq_hash"]) == len(out["pdq_quality"]) == len(out["ok"]) == 7
    assert out["md5"][0] == md5_hex(good) and out["md5"][2] == md5_hex(corrupt) and out["md5"][4] == md5_hex(b"not an image")
    assert out["md5"][3] is None and out["md5"][6] is None  # empty object, read error
    # PDQ of the image the decoder opened (its own JPEG draft), reduced by pdq_input: one decode for both
    assert (out["pdq_hash"][0], out["pdq_quality"][0]) == pdq_hex(np.asarray(pdq_input(open_image(good, DecodeConfig()))))
    assert out["pdq_hash"][1] == pdq_hex(photo("coffee"))[0]  # a PNG smaller than 2x256: as decoded
    for i in (2, 3, 4, 6):
        assert not out["ok"][i] and out["pdq_hash"][i] is None and out["pdq_quality"][i] == NO_QUALITY
    assert out["ok"][5] and out["low_content"][5]
    assert out["pdq_hash"][5] is not None and out["pdq_quality"][5] < PDQ_QUALITY_FLOOR  # flat: too unreliable
    assert out["pdq_quality"].dtype == np.int16


def test_signal_decoder_hashes_only_what_its_bounds_let_it_decode() -> None:
    good = jpeg_bytes(photo("astronaut"))
    tight = SignalDecoder(DecodeConfig(max_pixels=1000))({"image_key": np.asarray(["k"], dtype=object),
                                                          "bytes": np.asarray([good], dtype=object)})
    assert not tight["ok"][0] and tight["pdq_hash"][0] is None and tight["md5"][0] == md5_hex(good)  # MD5 lists match files
    empty = SignalDecoder()({"image_key": np.asarray([], dtype=object), "bytes": np.asarray([], dtype=object)})
    assert len(empty["md5"]) == 0 and len(empty["pdq_quality"]) == 0 and empty["pdq_quality"].dtype == np.int16
