"""``modscan bench pipeline``: the job end to end at the card's thresholds against the single-stage
fp32 baseline (:mod:`jobs.bench.baseline`), in one run, with the ratios against the zero-survivor
bound measured here too; with an S3 endpoint (``--s3-endpoint``, else a moto server when the
``bench`` extra is installed) the default job also reads its input from S3. Writes
``WORKDIR/pipeline/pipeline.json``. Benchmarks never assert: they print what they measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.bench.common import bench_args, machine, photo_paths, photos_help, table

if TYPE_CHECKING:
    from pipeline.moderation.moderator import Moderator


def _make_images(root: Path, n: int, refs: Path, seed: int = 0, photos: list[Path] | None = None) -> int:
    """n uploads (1% edited copies of the references), JPEG ~640x480 like phone uploads, made from
    the ``photos`` folders (none: scikit-image's photos)."""
    from PIL import Image

    from models.augment import apply_named, crop, random_edit_names
    from pipeline.evaluation.samples import procedural

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    pool = []
    for p in photo_paths(photos, 300):
        with Image.open(p) as f:
            pool.append(f.convert("RGB"))
    if not pool:
        from pipeline.evaluation.samples import UNRELATED_PHOTOS, skimage_photo

        pool = [skimage_photo(x) for x in UNRELATED_PHOTOS]
    ref_imgs = pool[:20]
    for i, im in enumerate(ref_imgs):
        im.save(refs / f"ref-{i:03d}.jpg", quality=92)
    n_pos = max(1, n // 100)
    for i in range(n):
        if i < n_pos:
            im = apply_named(ref_imgs[i % len(ref_imgs)], random_edit_names(rng), rng)
        elif i % 4 == 0:
            im = procedural(rng, (640, 480))
        else:
            im = crop(pool[20 + i % max(1, len(pool) - 20)] if len(pool) > 20 else pool[i % len(pool)], rng, 0.3)
        im.convert("RGB").resize((640, 480)).save(root / f"up-{i:05d}.jpg", quality=85)
    return n_pos


def _model_costs(images: Path, n_max: int = 512) -> dict[str, float]:
    """Per-image costs on this machine, measured apart in one process: decode + resize (the
    production decoder), the low-res coarse pass and the high-res rerank pass in the job's
    precision (``auto``), and the same two passes in fp32 and in bf16 (model-only)."""
    import torch

    from models.card import read_card
    from models.precision import cpu_has_native_bf16
    from pipeline.features import FeatureExtractor
    from pipeline.ingest.decode import DecodeConfig, Decoder

    card = read_card(None)
    dec = Decoder(DecodeConfig.for_model(card.config))
    files = sorted(images.iterdir())[:n_max]
    datas = [f.read_bytes() for f in files]
    t = time.perf_counter()
    decoded = dec.decode_all(datas, names=[f.name for f in files])
    t_dec = (time.perf_counter() - t) / len(files)
    low, high = decoded["low"], decoded["high"]
    out: dict[str, Any] = {"images": len(files), "decode_s_per_image": t_dec, "native_bf16": bool(cpu_has_native_bf16() or torch.cuda.is_available())}
    for prec in ("auto", "fp32", "bf16"):
        fx = FeatureExtractor(None, threads=torch.get_num_threads(), precision=prec)
        n = len(files) if prec != "bf16" or out["native_bf16"] else 32  # emulated bf16 is ~10x slower: sample
        fx.query_coarse(low[:8])  # warm-up
        t = time.perf_counter()
        for i in range(0, n, 64):
            fx.query_coarse(low[i:min(n, i + 64)])
        t_low = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for i in range(0, n, 64):
            fx.fine_features(high[i:min(n, i + 64)])
        t_high = (time.perf_counter() - t) / n
        out[f"low_res_s_per_image_{prec}"], out[f"high_res_s_per_image_{prec}"] = t_low, t_high
        if prec == "auto":
            out["auto_is"] = fx.precision.value
    d, lo, hi = t_dec, out["low_res_s_per_image_auto"], out["high_res_s_per_image_auto"]
    out["zero_survivor_bound"] = (d + hi) / (d + lo)
    return out


def _pipeline_gallery(work: Path, n: int, photos: list[Path] | None) -> tuple[Path, int, str]:
    """The uploads and a 2-shard gallery of their 20 references -> (uploads folder, edited copies, gallery root)."""
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    images, refs = work / "uploads", work / "refs"
    n_pos = _make_images(images, n, refs, photos=photos)
    gal = str(work / "gallery")
    G.build(open_store(gal, create=True), [Bank("bench", str(refs), "sensitive/bench", "filter")], read_card(None),
            local_extractor(None), n_shards=2)
    return images, n_pos, gal


def _s3_uploads(images: Path, endpoint: str | None, stack: contextlib.ExitStack) -> bool:
    """The uploads under ``s3://bench-up/day/`` of the S3 endpoint ``endpoint`` (None: a moto
    server when moto is installed), kept up until ``stack`` closes. -> whether there is an S3 input."""
    import boto3

    from jobs.bench.s3 import moto_available, s3_endpoint

    if endpoint is None and not moto_available():
        print("S3 run skipped: no --s3-endpoint given and moto is not installed (pip install 'modscan[bench]')",
              flush=True)
        return False
    url = stack.enter_context(s3_endpoint(endpoint))
    cli = boto3.client("s3", endpoint_url=url)
    cli.create_bucket(Bucket="bench-up")
    for f in sorted(images.iterdir()):
        cli.upload_file(str(f), "bench-up", f"day/{f.name}")
    return True


def _job_row(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """One table row of a finished job: throughput, survivors, flags, per-stage ms per image."""
    st = info["stage_seconds_summed_over_workers"]
    per = {k: 1000 * st.get(k, 0.0) / max(1, info["inputs"])
           for k in ("decode_resize", "model_coarse", "model_rerank", "search")}
    return {"job": name, "images": info["inputs"], "seconds": f"{info['pipeline_seconds']:.1f}",
            "images/s": f"{info['images_per_second']:.1f}",
            "steady-state images/s": f"{info['steady_state_images_per_second'] or 0:.1f}",
            "high-res passes": info["survivors"], "flagged": info["counts"]["by_status"].get("matched", 0),
            **{f"{k} ms/img": f"{v:.1f}" for k, v in per.items()}}


def _steady(info: dict[str, Any]) -> float:
    return info["steady_state_images_per_second"] or info["images_per_second"]


def _pipeline_ratios(infos: dict[str, dict[str, Any]], default_job: str, costs: dict[str, Any], s3: bool) -> dict[str, Any]:
    default, single = infos[default_job], infos["single-stage-fp32 (512-d for every image)"]
    ratios: dict[str, Any] = {
        "default / single-stage fp32 (steady state; target >= 2.0)": _steady(default) / _steady(single),
        "default / single-stage fp32 (end to end)": default["images_per_second"] / single["images_per_second"],
        "zero-survivor bound (decode + high) / (decode + low)": costs["zero_survivor_bound"],
        "cascade / single-stage as a share of the bound (target >= 0.85)": (_steady(default) / _steady(single)) / costs["zero_survivor_bound"],
        "survivors (share of uploads given the high-res pass)": default["survivors"] / max(1, default["decoded"]),
        "bf16 / fp32 model throughput (model-only)": (costs["low_res_s_per_image_fp32"] + costs["high_res_s_per_image_fp32"])
        / (costs["low_res_s_per_image_bf16"] + costs["high_res_s_per_image_bf16"]),
    }
    if costs["native_bf16"]:
        ratios["bf16 job / fp32 job (steady state; target >= 1.8)"] = _steady(default) / _steady(infos["cascade-fp32"])
    if s3:
        ratios["default S3 / default local"] = infos["default-s3"]["images_per_second"] / default["images_per_second"]
    return ratios


def _print_pipeline(res: dict[str, Any]) -> None:
    rows, costs, ratios = res["rows"], res["costs"], res["ratios"]
    print(f"\npipeline benchmark on {res['machine']}: {res['images']} images, {res['positives']} edited copies of 20 gallery images\n")
    print(table(rows, list(rows[0])))
    print(f"\nper image, measured apart: decode+resize {1000 * costs['decode_s_per_image']:.1f} ms; "
          f"low-res {1000 * costs['low_res_s_per_image_auto']:.1f} ms, high-res {1000 * costs['high_res_s_per_image_auto']:.1f} ms "
          f"(precision auto = {costs['auto_is']}); bf16 low/high {1000 * costs['low_res_s_per_image_bf16']:.1f}/"
          f"{1000 * costs['high_res_s_per_image_bf16']:.1f} ms vs fp32 {1000 * costs['low_res_s_per_image_fp32']:.1f}/"
          f"{1000 * costs['high_res_s_per_image_fp32']:.1f} ms" + ("" if costs["native_bf16"] else
          " (this CPU has no native bf16: the bf16 job is not run, auto picks fp32)"))
    print("ratios:\n" + "\n".join(f"  {k}: {v:.3f}" for k, v in ratios.items()))


def bench_pipeline(n: int, work: Path, s3: bool = True, photos: list[Path] | None = None,
                   s3_endpoint: str | None = None) -> dict[str, Any]:
    """The job at the card's thresholds, against the single-stage fp32 job, in one run; ratios
    against the zero-survivor bound measured here too. With ``s3``, the default job also reads
    its input from S3 (``s3_endpoint``, else a moto server if installed, else no S3 run)."""
    import shutil

    from jobs.bench.baseline import SingleStageModerator
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.ray_stages import init_ray
    from jobs.runtime.run import moderate

    shutil.rmtree(work, ignore_errors=True)
    images, n_pos, gal = _pipeline_gallery(work, n, photos)
    rows, infos = [], {}

    def run(name: str, inp: str, c: JobConfig, moderator: type[Moderator] | None = None) -> None:
        info = moderate(inp, gal, str(work / f"flags-{name.split()[0]}"), "2026-06-01", cfg=c, review=False,
                        moderator=moderator)
        infos[name] = info
        rows.append(_job_row(name, info))
        print(rows[-1], flush=True)

    with contextlib.ExitStack() as stack:
        s3 = s3 and _s3_uploads(images, s3_endpoint, stack)  # before Ray starts: workers inherit the endpoint
        init_ray(None)
        run("default (cascade, card thresholds, precision auto)", str(images), JobConfig(batch_size=64))
        if s3:
            run("default-s3", "s3://bench-up/day/", JobConfig(batch_size=64))
        run("single-stage-fp32 (512-d for every image)", str(images), JobConfig(batch_size=64, precision="fp32"),
            SingleStageModerator)
        costs = _model_costs(images)
        if costs["native_bf16"]:
            run("cascade-fp32", str(images), JobConfig(batch_size=64, precision="fp32"))
    ratios = _pipeline_ratios(infos, rows[0]["job"], costs, s3)
    res = {"machine": machine(), "images": n, "positives": n_pos, "rows": rows, "costs": costs, "ratios": ratios}
    _print_pipeline(res)
    (work / "pipeline.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def cli_bench_pipeline(a: argparse.Namespace) -> int:
    out, photos = bench_args(a)
    bench_pipeline(a.images, out / "pipeline", s3=not a.no_s3, photos=photos, s3_endpoint=a.s3_endpoint)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``pipeline`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("pipeline")
    q.add_argument("--images", type=int, default=2000)
    q.add_argument("--workdir", default="bench-out")
    q.add_argument("--photos", action="append", metavar="DIR", help=photos_help("the uploads are made from them"))
    q.add_argument("--no-s3", action="store_true", help="skip the run that reads its input from S3")
    q.add_argument("--s3-endpoint", metavar="URL", default=None,
                   help="S3 endpoint for the S3 run (credentials from the AWS environment); default: a local moto "
                        "server if the bench extra is installed (pip install 'modscan[bench]'), else no S3 run")
    q.set_defaults(fn=cli_bench_pipeline)
