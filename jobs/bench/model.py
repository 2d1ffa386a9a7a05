"""``modscan bench model``: what each pass of a model costs per image, measured in one run.

For every model directory given (default: the shipped model) and every precision asked for, the
table gives milliseconds per image of the job's two model passes on decoded photos: the
**low-res coarse pass** (``query_coarse``: every upload pays it) and the **high-res pass**
(``fine_features``: only coarse survivors pay it), plus the gallery-side pass. With ``--compile``
it also measures ``torch.compile`` of the trunk against eager at the model's default precision,
with the cosine between their features: worth adopting only when it is at least 1.3x faster with
cosine >= 0.999.

Benchmarks never assert: they print what they measured and write ``OUT/model.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

if TYPE_CHECKING:
    import torch

Batch = TypeVar("Batch", np.ndarray, "torch.Tensor")

ADOPT_SPEEDUP = 1.3
ADOPT_COSINE = 0.999


def _photos(dirs: list[str] | None, n: int) -> list[Any]:
    """``n`` RGB photos: from ``dirs`` when given, else scikit-image's bundled photos (repeated)."""
    from PIL import Image

    from models.preprocess import IMAGE_SUFFIXES

    if dirs:
        paths = sorted(p for d in dirs for p in Path(d).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        ims = []
        for p in paths[:n]:
            with Image.open(p) as im:
                ims.append(im.convert("RGB"))
        return ims
    from pipeline.evaluation.samples import UNRELATED_PHOTOS, skimage_photo

    return [skimage_photo(UNRELATED_PHOTOS[i % len(UNRELATED_PHOTOS)]) for i in range(n)]


def _ms_per_image(fn: Callable[[Batch], Any], x: Batch, repeats: int) -> float:
    fn(x[: min(8, len(x))])  # warm-up (allocator, autotuning)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return 1000.0 * best / len(x)


def measure_model(model_dir: str | None, precision: str, images: list[Any], repeats: int) -> dict[str, Any]:
    """ms per image of the coarse (low-res), fine (high-res) and gallery passes of one model."""
    from models.preprocess import resize_pair
    from pipeline.features import FeatureExtractor

    fx = FeatureExtractor(model_dir, precision=precision)
    pairs = [resize_pair(im, fx.config.low_res, fx.config.high_res) for im in images]
    low, high = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    return {"model": fx.version_id, "precision": fx.precision.value,
            "low_res": fx.config.low_res, "high_res": fx.config.high_res,
            "ms_coarse_pass": round(_ms_per_image(fx.query_coarse, low, repeats), 2),
            "ms_fine_pass": round(_ms_per_image(fx.fine_features, high, repeats), 2),
            "ms_gallery_pass": round(_ms_per_image(fx.gallery, high, repeats), 2)}


def measure_compile(model_dir: str | None, images: list[Any], repeats: int) -> dict[str, Any]:
    """``torch.compile`` of the trunk vs eager at the default precision: speed and feature cosine."""
    import torch

    from models.preprocess import resize_pair
    from pipeline.features import FeatureExtractor

    fx = FeatureExtractor(model_dir)
    high = np.stack([resize_pair(im, fx.config.low_res, fx.config.high_res)[1] for im in images])
    eager = fx.fine_features(high)
    ms_eager = _ms_per_image(fx.fine_features, high, repeats)
    t = time.perf_counter()
    fx.model.backbone = cast(torch.nn.Module, torch.compile(fx.model.backbone))  # of a Module: an OptimizedModule
    compiled = fx.fine_features(high)  # includes compilation
    compile_s = time.perf_counter() - t
    ms_compiled = _ms_per_image(fx.fine_features, high, repeats)
    cos = float(np.min(np.sum(eager * compiled, axis=1)))
    speedup = ms_eager / ms_compiled
    return {"precision": fx.precision.value, "ms_eager": round(ms_eager, 2), "ms_compiled": round(ms_compiled, 2),
            "speedup": round(speedup, 3), "min_cosine_to_eager": round(cos, 6), "compile_seconds": round(compile_s, 1),
            "adopt": bool(speedup >= ADOPT_SPEEDUP and cos >= ADOPT_COSINE)}


def measure_trunk_sizes(model_dir: str | None, precisions: list[str], sizes: list[int], n: int,
                        repeats: int) -> list[dict[str, Any]]:
    """ms per image of the model's trunk + heads at square input ``sizes``: what each candidate
    resolution pair would cost per pass."""
    import torch

    from models.card import load_model

    rows = []
    model, card = load_model(model_dir, "cpu")
    for prec in precisions:
        used = model.set_precision(prec, "cpu")
        for size in sizes:
            x = torch.randn(n, 3, size, size)

            def run(batch: torch.Tensor) -> Any:
                with torch.inference_mode():
                    return model.rerank_features(batch)

            rows.append({"model": card.version_id, "precision": used.value, "size": size,
                         "ms_per_image": round(_ms_per_image(run, x, repeats), 2)})
    return rows


def bench_model(models: list[str | None], precisions: list[str], photos: list[str] | None, n: int, repeats: int,
                compile_check: bool, out: Path, trunk_sizes: list[int] | None = None) -> dict[str, Any]:
    images = _photos(photos, n)
    rows = [measure_model(m, p, images, repeats) for m in models for p in precisions]
    res: dict[str, Any] = {"images": len(images), "rows": rows}
    if trunk_sizes:
        res["sizes"] = measure_trunk_sizes(models[0], precisions, trunk_sizes, min(n, 32), repeats)
    if compile_check:
        res["compile"] = measure_compile(models[0], images, repeats)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(res, indent=2) + "\n")
    _print(res)
    return res


def _print(res: dict[str, Any]) -> None:
    print(f"model passes, ms per image ({res['images']} photos, best of the repeats)")
    print(f"{'model':<44} {'prec':<5} {'low':>4} {'high':>4} {'coarse pass':>12} {'fine pass':>10} {'gallery':>8}")
    for r in res["rows"]:
        print(f"{r['model']:<44} {r['precision']:<5} {r['low_res']:>4} {r['high_res']:>4} {r['ms_coarse_pass']:>12.2f} "
              f"{r['ms_fine_pass']:>10.2f} {r['ms_gallery_pass']:>8.2f}")
    for r in res["rows"]:
        print(f"ratio fine/coarse pass, {r['model']} {r['precision']}: {r['ms_fine_pass'] / r['ms_coarse_pass']:.2f}")
    if res.get("sizes"):
        print("trunk + heads at each input size, ms per image")
        for r in res["sizes"]:
            print(f"  {r['precision']:<5} {r['size']:>4} px  {r['ms_per_image']:>7.2f}")
    c = res.get("compile")
    if c:
        print(f"torch.compile trunk ({c['precision']}): eager {c['ms_eager']:.2f} ms, compiled {c['ms_compiled']:.2f} ms, "
              f"speedup {c['speedup']:.2f}x, min cosine {c['min_cosine_to_eager']:.6f}, compile {c['compile_seconds']} s "
              f"-> {'adopt' if c['adopt'] else 'keep eager'} (needs >= {ADOPT_SPEEDUP}x and cosine >= {ADOPT_COSINE})")


def cli_bench_model(a: argparse.Namespace) -> int:
    models = a.model or [None]
    sizes = [int(x) for x in a.trunk_sizes.split(",")] if a.trunk_sizes else None
    bench_model(models, a.precision or ["auto", "fp32"], a.photos, a.images, a.repeats, a.compile, Path(a.out), sizes)
    return 0


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    q = bench_sub.add_parser("model", help="ms per image of each model pass (coarse low-res, fine high-res, gallery)")
    q.add_argument("--model", action="append", help="model directory (repeatable; default: the shipped model)")
    q.add_argument("--precision", action="append", choices=["auto", "bf16", "fp32"], default=None,
                   help="precisions to measure (repeatable; default: auto and fp32)")
    q.add_argument("--photos", action="append", help="photo folder (repeatable; default: scikit-image's photos)")
    q.add_argument("--images", type=int, default=64)
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--compile", action="store_true", help="also measure torch.compile of the trunk against eager")
    q.add_argument("--trunk-sizes", default=None, metavar="N,N,...",
                   help="also time the first model at these square input sizes (candidate resolution pairs)")
    q.add_argument("--out", default="bench-out")
    q.set_defaults(fn=cli_bench_model)
