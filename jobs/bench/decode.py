"""``modscan bench decode``: decode + resize per image by format and size, the production decoder
(JPEG draft scale) against a full decode, in one run. Writes ``bench-out/decode.json``.
Benchmarks never assert: they print what they measured.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from jobs.bench.common import bench_args, machine, photo_paths, photos_help, table, timed

DECODE_SIZES = ((640, 480), (1920, 1080), (4032, 3024))


def _encoded(fmt: str, size: tuple[int, int], photos: list[Path] | None) -> bytes:
    import io

    from PIL import Image

    from models.synthetic import generate

    src = photo_paths(photos, 1)
    if src:
        with Image.open(src[0]) as im:
            img = im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    else:
        img = generate("bench-decode", 0, ("smooth_field",))[1].resize(size)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 88} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def bench_decode(out_dir: Path, repeat: int = 20, photos: list[Path] | None = None) -> dict[str, Any]:
    """Decode + resize per image by format and size, with the JPEG draft scale that fits the
    high-res side (today's decoder) and without a draft (full decode), in one run. The picture is
    the first of the ``photos`` folders (none: a generated one)."""
    from PIL import Image

    from models.card import read_card
    from models.preprocess import resize_pair
    from pipeline.ingest.decode import DecodeConfig, Decoder, to_rgb

    c = read_card(None).config
    dec = Decoder(DecodeConfig.for_model(c))

    def full(data: bytes) -> None:
        import io

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            resize_pair(to_rgb(im), c.low_res, c.high_res)

    rows = []
    for fmt in ("JPEG", "PNG", "WEBP"):
        for size in DECODE_SIZES:
            data = _encoded(fmt, size, photos)
            t_dec, _ = timed(functools.partial(dec.decode_one, data), repeat)
            t_full, _ = timed(functools.partial(full, data), max(3, repeat // 4))
            rows.append({"format": fmt, "size": f"{size[0]}x{size[1]}", "KB": len(data) // 1024,
                         "decode+resize ms (modscan)": f"{1000 * t_dec:.1f}",
                         "full decode+resize ms": f"{1000 * t_full:.1f}", "speed-up": f"{t_full / t_dec:.2f}x"})
    print(f"\ndecode benchmark on {machine()} (high {c.high_res} px, low {c.low_res} px; per image)\n")
    print(table(rows, list(rows[0])))
    res = {"machine": machine(), "rows": rows}
    (out_dir / "decode.json").write_text(json.dumps(res, indent=2))
    return res


def cli_bench_decode(a: argparse.Namespace) -> int:
    out, photos = bench_args(a)
    bench_decode(out, photos=photos)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``decode`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("decode", help="decode + resize per image by format and size")
    q.add_argument("--photos", action="append", metavar="DIR",
                   help=photos_help("the first photo is the picture encoded", "a generated picture"))
    q.set_defaults(fn=cli_bench_decode)
