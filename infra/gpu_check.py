"""GPU smoke check for a modscan node image: run it on one GPU node before scaling out.

    python infra/gpu_check.py [--model DIR | --random-model] [--photos DIR] [--out FILE]

Checks, each reported with numbers (a JSON file and a printed summary):
1. CUDA features equal CPU features (max |diff|, cosine) for the coarse query (adapter 2), the
   gallery pair (adapter 1, 512-d) and the rerank feature.
2. Feature throughput on the GPU (images/s, low-res and high-res) vs this process's CPU.
3. The production ``Moderator`` stage on ``cuda`` gives the same decisions as on ``cpu``, over a
   small gallery; faiss GPU search equals CPU search when faiss-gpu is installed.
4. Training throughput: one stage-1 epoch on the GPU (images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(photos: str | None, n: int) -> list:
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
        from jobs.demo import procedural

        rng = random.Random(0)
        out += [procedural(rng, (400, 300)) for _ in range(n - len(out))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-model", action="store_true", help="a seeded random ResNet-18 (speed/equality checks)")
    ap.add_argument("--photos", default=None)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    a = ap.parse_args()

    import torch

    from models.card import ModelCard, save_model
    from models.descriptor import DescriptorConfig, DescriptorModel

    res: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    res["device"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        res["faiss"] = faiss.__version__
        res["faiss_gpus"] = getattr(faiss, "get_num_gpus", lambda: 0)()
    except ImportError:
        res["faiss"] = None
    model_dir = a.model
    if a.random_model or model_dir is None and not (Path(__file__).resolve().parents[1] / "models/default/model.safetensors").exists():
        torch.manual_seed(0)
        model_dir = tempfile.mkdtemp()
        # coarse 0: every query goes through the rerank path, so the GPU rerank is exercised too
        save_model(DescriptorModel(DescriptorConfig()).eval(), model_dir,
                   ModelCard(DescriptorConfig(), thresholds={"coarse": 0.0, "fine": 0.97, "rerank_k": 50}))
        res["model"] = "random ResNet-18 160/112 (seeded)"
    from pipeline.decode import DecodeConfig, Decoder
    from pipeline.features import FeatureExtractor

    cpu = FeatureExtractor(model_dir, device="cpu")
    gpu = FeatureExtractor(model_dir, device="cuda", micro_batch=256)
    res["model"] = res.get("model", cpu.version_id)
    c = cpu.config
    imgs = _images(a.photos, 256)
    dec = Decoder(DecodeConfig(low_res=c.low_res, high_res=c.high_res))
    import io

    rows = []
    for im in imgs:
        b = io.BytesIO()
        im.save(b, format="JPEG", quality=90)
        rows.append(dec.decode_one(b.getvalue()))
    low = np.stack([r["low"] for r in rows])
    high = np.stack([r["high"] for r in rows])
    # 1. equality
    n = 64
    eq = {}
    for name, fc, fg, x in (("query_coarse", cpu.query_coarse, gpu.query_coarse, low[:n]),
                            ("rerank", cpu.rerank, gpu.rerank, high[:n])):
        a1, a2 = fc(x), fg(x)
        eq[name] = {"max_abs_diff": float(np.abs(a1 - a2).max()), "min_cosine": float((a1 * a2).sum(1).min())}
    g1, g2 = cpu.gallery(high[:n]), gpu.gallery(high[:n])
    eq["gallery_128"] = {"max_abs_diff": float(np.abs(g1[0] - g2[0]).max()), "min_cosine": float((g1[0] * g2[0]).sum(1).min())}
    res["cpu_vs_cuda"] = eq
    # 2. throughput
    tp = {}
    for name, fx in (("cuda", gpu), ("cpu", cpu)):
        m = len(low) if name == "cuda" else 64
        reps = 5 if name == "cuda" else 1
        fx.query_coarse(low[:m])  # warm-up
        fx.rerank(high[:m])
        if name == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fx.query_coarse(low[:m])
        if name == "cuda":
            torch.cuda.synchronize()
        t_low = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            fx.rerank(high[:m])
        if name == "cuda":
            torch.cuda.synchronize()
        t_high = (time.perf_counter() - t) / reps
        tp[name] = {"low_res_images_per_s": round(m / t_low, 1), "high_res_images_per_s": round(m / t_high, 1),
                    "threads": torch.get_num_threads() if name == "cpu" else None}
    res["throughput"] = tp
    # 3. Moderator on cuda vs cpu
    try:
        import pandas as pd

        from models.augment import apply_named
        from models.card import read_card
        from pipeline.banks import Bank
        from pipeline.gallery import GalleryContent, write_version
        from pipeline.stages import Moderator, RunContext
        from pipeline.storage import open_store

        gdir = tempfile.mkdtemp()
        gc, gr = cpu.gallery(high[:20])
        ids = np.arange(20, dtype=np.int64)
        ent = pd.DataFrame({"id": ids, "bank": "b", "category": "c", "action": "filter",
                            "source_uri": [f"img-{i}" for i in ids], "sha256": [str(i) for i in ids],
                            "added_at": pd.Timestamp.now(tz="UTC")})
        write_version(open_store(gdir, create=True), GalleryContent(ids, gc, gr, ent, {"b": Bank("b", "-", "c", "filter")}),
                      read_card(model_dir), n_shards=2)
        rng = random.Random(1)
        qs = [apply_named(imgs[i % 20], ["color"], rng) if i < 30 else imgs[20 + i] for i in range(80)]
        qrows = []
        for im in qs:
            b = io.BytesIO()
            im.save(b, format="JPEG", quality=85)
            qrows.append(b.getvalue())
        batch = dec({"image_key": np.asarray([f"q{i}" for i in range(80)], object),
                     "bytes": np.asarray(qrows, object), "read_error": np.asarray([None] * 80, object)})
        ctx = RunContext("2026-01-01", "gpu-check")
        out_c = Moderator(gdir, ctx, model_dir, device="cpu")(batch).to_pandas()
        out_g = Moderator(gdir, ctx, model_dir, device="cuda")(batch).to_pandas()
        same = (out_c[["status", "action", "reference_id"]].fillna(-1).values == out_g[["status", "action", "reference_id"]].fillna(-1).values).all()
        res["moderator_cuda_equals_cpu"] = bool(same)
        res["moderator_status_counts_cuda"] = out_g["status"].value_counts().to_dict()
        res["moderator_fine_score_max_abs_diff"] = float(np.nanmax(np.abs(out_c["fine_score"].astype(float) - out_g["fine_score"].astype(float)))) \
            if out_c["fine_score"].notna().any() else 0.0
    except ImportError as e:
        res["moderator_check"] = f"skipped: {e}"
    # 4. training throughput
    if a.photos:
        from models.train import TrainConfig, Trainer

        cfg = TrainConfig(epochs_backbone=a.train_epochs, workers=a.workers, device="cuda")
        tr = Trainer(a.photos, tempfile.mkdtemp(), cfg, command="gpu_check")
        t = time.perf_counter()
        _ = tr.images
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        tr.stage_backbone()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
        res["training_stage1"] = {"images": len(tr.paths), "epochs": a.train_epochs, "seconds": round(secs, 1),
                                  "seconds_per_epoch": round(secs / a.train_epochs, 1),
                                  "pairs_per_s": round(len(tr.paths) * a.train_epochs / secs, 1),
                                  "workers": a.workers, "preload_seconds": round(t_load, 1),
                                  "loss": tr.history["backbone"]}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
