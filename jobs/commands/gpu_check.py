"""``modscan gpu-check``: smoke check for a modscan node image; run it on one GPU node before scaling out.

    modscan gpu-check [--model DIR | --random-model] [--photos DIR] [--out FILE]
    python -m jobs.commands.gpu_check ...      (the same, without the modscan entry point)

Checks, each reported with numbers (a JSON file and a printed summary):
1. CUDA features equal CPU features (max |diff|, cosine) for the coarse query (adapter 2), the
   gallery pair (adapter 1, 512-d) and the rerank feature.
2. Feature throughput on the GPU (images/s, low-res and high-res) vs this process's CPU.
3. The production ``Moderator`` stage on ``cuda`` gives the same decisions as on ``cpu``, over a
   small gallery; faiss GPU search equals CPU search when faiss-gpu is installed.
4. Training throughput: one stage-1 epoch on the GPU (images/s); only with ``--photos``.

Without a CUDA device it prints ``no CUDA device: nothing to check`` and exits 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--random-model", action="store_true", help="a seeded random ResNet-18 (speed/equality checks)")
    p.add_argument("--photos", default=None)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="smoke check of a GPU node: CUDA vs CPU features, throughput, decisions")
    add_arguments(p)
    p.set_defaults(fn=cli_gpu_check)


def _images(photos: str | None, n: int) -> list:
    """n photos from ``photos`` when given, topped up with :func:`pipeline.evaluation.samples.procedural` pictures."""
    from PIL import Image

    out = []
    if photos and Path(photos).is_dir():
        for p in sorted(Path(photos).rglob("*"))[: n * 2]:
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                with Image.open(p) as im:
                    out.append(im.convert("RGB"))
            if len(out) >= n:
                break
    if len(out) < n:
        from pipeline.evaluation.samples import procedural

        rng = random.Random(0)
        out += [procedural(rng, (400, 300)) for _ in range(n - len(out))]
    return out


def _environment(res: dict[str, Any]) -> bool:
    """torch, CUDA device and faiss versions into ``res``; False without a CUDA device."""
    import torch

    res.update({"torch": torch.__version__, "cuda": torch.cuda.is_available()})
    if not torch.cuda.is_available():
        return False
    res["device"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        res["faiss"] = faiss.__version__
        res["faiss_gpus"] = getattr(faiss, "get_num_gpus", lambda: 0)()
    except ImportError:
        res["faiss"] = None
    return True


def _model_dir(a: argparse.Namespace, res: dict[str, Any]) -> str | None:
    """``--model``, or a seeded random model when asked for (or when no model is shipped)."""
    import torch

    from models.card import PACKAGED_MODEL_DIR, ModelCard, save_model
    from models.descriptor import DescriptorConfig, DescriptorModel

    model_dir = a.model
    if a.random_model or model_dir is None and not (PACKAGED_MODEL_DIR / "model.safetensors").exists():
        torch.manual_seed(0)
        model_dir = tempfile.mkdtemp()
        # coarse 0: every query goes through the rerank path, so the GPU rerank is exercised too
        save_model(DescriptorModel(DescriptorConfig()).eval(), model_dir,
                   ModelCard(DescriptorConfig(), thresholds={"coarse": 0.0, "fine": 0.97, "rerank_k": 50}))
        res["model"] = "random ResNet-18 160/112 (seeded)"
    return model_dir


def _decoded(imgs: list, dec: Any) -> tuple[np.ndarray, np.ndarray]:
    """The images JPEG-encoded and decoded by the production decoder -> (low, high) batches."""
    datas = []
    for im in imgs:
        b = io.BytesIO()
        im.save(b, format="JPEG", quality=90)
        datas.append(b.getvalue())
    d = dec.decode_all(datas)
    return d["low"], d["high"]


def _check_equality(cpu: Any, gpu: Any, low: np.ndarray, high: np.ndarray, n: int = 64) -> dict[str, Any]:
    """1. CUDA features vs CPU features."""
    eq = {}
    for name, fc, fg, x in (("query_coarse", cpu.query_coarse, gpu.query_coarse, low[:n]),
                            ("rerank", cpu.fine_features, gpu.fine_features, high[:n])):
        a1, a2 = fc(x), fg(x)
        eq[name] = {"max_abs_diff": float(np.abs(a1 - a2).max()), "min_cosine": float((a1 * a2).sum(1).min())}
    g1, g2 = cpu.gallery(high[:n]), gpu.gallery(high[:n])
    eq["gallery_128"] = {"max_abs_diff": float(np.abs(g1[0] - g2[0]).max()), "min_cosine": float((g1[0] * g2[0]).sum(1).min())}
    return eq


def _seconds_per_pass(fn: Any, x: np.ndarray, reps: int, cuda: bool) -> float:
    import torch

    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def _check_throughput(cpu: Any, gpu: Any, low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """2. Low-res and high-res feature throughput on CUDA (all images, 5 passes) and CPU (64, 1 pass)."""
    import torch

    tp = {}
    for name, fx in (("cuda", gpu), ("cpu", cpu)):
        cuda = name == "cuda"
        m = len(low) if cuda else 64
        reps = 5 if cuda else 1
        fx.query_coarse(low[:m])  # warm-up
        fx.fine_features(high[:m])
        if cuda:
            torch.cuda.synchronize()
        t_low = _seconds_per_pass(fx.query_coarse, low[:m], reps, cuda)
        t_high = _seconds_per_pass(fx.fine_features, high[:m], reps, cuda)
        tp[name] = {"low_res_images_per_s": round(m / t_low, 1), "high_res_images_per_s": round(m / t_high, 1),
                    "threads": torch.get_num_threads() if name == "cpu" else None}
    return tp


def _small_gallery(cpu: Any, high: np.ndarray, model_dir: str | None) -> str:
    """A 20-entry, 2-shard gallery of the first 20 images (CPU features) in a temporary folder."""
    import pandas as pd

    from models.card import read_card
    from pipeline.gallery import GalleryContent, VersionModel, write_version
    from pipeline.gallery.banks import Bank
    from pipeline.ingest.storage import open_store

    gdir = tempfile.mkdtemp()
    gc, gr = cpu.gallery(high[:20])
    ids = np.arange(20, dtype=np.int64)
    ent = pd.DataFrame({"id": ids, "bank": "b", "category": "c", "action": "filter",
                        "source_uri": [f"img-{i}" for i in ids], "sha256": [str(i) for i in ids],
                        "added_at": pd.Timestamp.now(tz="UTC")})
    write_version(open_store(gdir, create=True), GalleryContent(ids, gc, gr, ent, {"b": Bank("b", "-", "c", "filter")}),
                  VersionModel.from_card(read_card(model_dir)), n_shards=2)
    return gdir


def _query_batch(imgs: list, dec: Any) -> dict[str, np.ndarray]:
    """80 uploads: 30 colour-edited copies of gallery images, 50 other images, decoded as the job does."""
    from models.augment import apply_named

    rng = random.Random(1)
    qs = [apply_named(imgs[i % 20], ["color"], rng) if i < 30 else imgs[20 + i] for i in range(80)]
    qrows = []
    for im in qs:
        b = io.BytesIO()
        im.save(b, format="JPEG", quality=85)
        qrows.append(b.getvalue())
    return dec({"image_key": np.asarray([f"q{i}" for i in range(80)], object),
                "bytes": np.asarray(qrows, object), "read_error": np.asarray([None] * 80, object)})


def _check_moderator(cpu: Any, model_dir: str | None, imgs: list, high: np.ndarray, dec: Any) -> dict[str, Any]:
    """3. The job's Moderator stage on cuda vs cpu over a small gallery."""
    from pipeline.moderation.moderator import Moderator, RunContext

    gdir = _small_gallery(cpu, high, model_dir)
    batch = _query_batch(imgs, dec)
    ctx = RunContext("2026-01-01", "gpu-check")
    out_c = Moderator(gdir, ctx, model_dir, device="cpu")(batch).to_pandas()
    out_g = Moderator(gdir, ctx, model_dir, device="cuda")(batch).to_pandas()
    cols = ["status", "action", "reference_id"]
    same = (out_c[cols].fillna(-1).values == out_g[cols].fillna(-1).values).all()
    return {"moderator_cuda_equals_cpu": bool(same),
            "moderator_status_counts_cuda": out_g["status"].value_counts().to_dict(),
            "moderator_fine_score_max_abs_diff":
                float(np.nanmax(np.abs(out_c["fine_score"].astype(float) - out_g["fine_score"].astype(float))))
                if out_c["fine_score"].notna().any() else 0.0}


def _check_training(a: argparse.Namespace) -> dict[str, Any]:
    """4. Stage-1 training throughput on the GPU over ``--photos``."""
    import torch

    from models.training import TrainConfig, Trainer

    cfg = TrainConfig(epochs_backbone=a.train_epochs, workers=a.workers, device="cuda")
    tr = Trainer(a.photos, tempfile.mkdtemp(), cfg, command="gpu_check")
    t = time.perf_counter()
    _ = tr.images
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    tr.stage_backbone()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return {"images": len(tr.paths), "epochs": a.train_epochs, "seconds": round(secs, 1),
            "seconds_per_epoch": round(secs / a.train_epochs, 1),
            "pairs_per_s": round(len(tr.paths) * a.train_epochs / secs, 1),
            "workers": a.workers, "preload_seconds": round(t_load, 1),
            "loss": tr.history["backbone"]}


def cli_gpu_check(a: argparse.Namespace) -> int:
    """Run the checks, write ``--out`` and print the same JSON; 1 when there is no CUDA device."""
    res: dict[str, Any] = {}
    if not _environment(res):
        print("no CUDA device: nothing to check")
        return 1
    model_dir = _model_dir(a, res)
    from pipeline.features import FeatureExtractor
    from pipeline.ingest.decode import DecodeConfig, Decoder

    cpu = FeatureExtractor(model_dir, device="cpu")
    gpu = FeatureExtractor(model_dir, device="cuda", micro_batch=256)
    res["model"] = res.get("model", cpu.version_id)
    c = cpu.config
    imgs = _images(a.photos, 256)
    dec = Decoder(DecodeConfig.for_model(c))
    low, high = _decoded(imgs, dec)
    res["cpu_vs_cuda"] = _check_equality(cpu, gpu, low, high)
    res["throughput"] = _check_throughput(cpu, gpu, low, high)
    try:
        res.update(_check_moderator(cpu, model_dir, imgs, high, dec))
    except ImportError as e:
        res["moderator_check"] = f"skipped: {e}"
    if a.photos:
        res["training_stage1"] = _check_training(a)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.commands.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return cli_gpu_check(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
