"""``modscan bench search|memory|pipeline``: tables and ratios measured in one run.

Benchmarks never assert: they print what they measured (and write ``bench-out/*.json``).

Realistic vectors (search, memory): the shipped model's GeM-pooled features of real photos
(the ``--photos`` folders when given, else scikit-image's) define a Gaussian in pooled space (mean +
covariance); gallery entries are samples of it pushed through the model's own heads (adapter 1 ->
128-d, reduction -> 512-d). Queries with a true match are gallery entries displaced by *real*
edit displacements (pooled(edited low-res) - pooled(original), measured on the photos) pushed
through adapter 2 (128-d) and the reduction (512-d); queries without a match are fresh samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError
from pipeline.moderation.moderator import Moderator


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # no /proc (not Linux): the platform's name will do
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU ({cpu}), {mem:.0f} GiB RAM, {gpu}"


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# realistic vectors
# --------------------------------------------------------------------------------------------
def _photo_paths(photos: list[Path] | None, limit: int = 400) -> list[Path]:
    """The first ``limit`` JPEG/PNG files of the ``photos`` folders (each sorted, in the order
    given); none without ``photos`` (the callers fall back to the embedded samples)."""
    paths: list[Path] = []
    for d in photos or []:
        if not Path(d).is_dir():
            raise UsageError(f"--photos {d}: no such folder")
        paths += sorted(p for p in Path(d).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return paths[:limit]


def pooled_statistics(model_dir: str | None = None, seed: int = 0, photos: list[Path] | None = None) -> dict[str, Any]:
    """Pooled features of real photos (``photos`` folders; fewer than 50: plus scikit-image photos
    and crops of them) and real edit displacements (shipped model)."""
    import torch
    from PIL import Image

    from models.augment import apply_named, random_edit_names
    from models.card import load_model
    from models.preprocess import resize_pair, to_batch
    from pipeline.evaluation.samples import UNRELATED_PHOTOS, skimage_photo

    model, card = load_model(model_dir)
    c = card.config
    rng = random.Random(seed)
    paths = _photo_paths(photos)
    ims = []
    for p in paths:
        with Image.open(p) as im:
            ims.append(im.convert("RGB"))
    if len(ims) < 50:  # no shared data: scikit-image photos and crops of them
        base = [skimage_photo(n) for n in UNRELATED_PHOTOS + ["astronaut", "rocket", "coffee", "chelsea", "camera"]]
        from models.augment import crop

        ims += [crop(b, rng, 0.2) for b in base for _ in range(12)]
    hi_o, lo_e, hi_e = [], [], []
    for im in ims:  # the job's resize: the query's low square is made from its high one
        e = apply_named(im, random_edit_names(rng), rng)
        hi_o.append(resize_pair(im, c.low_res, c.high_res)[1])
        lo, hi = resize_pair(e, c.low_res, c.high_res)
        lo_e.append(lo)
        hi_e.append(hi)
    with torch.inference_mode():
        P = torch.cat([model.pooled(to_batch(hi_o[i:i + 64])) for i in range(0, len(hi_o), 64)]).numpy()
        Plo = torch.cat([model.pooled(to_batch(lo_e[i:i + 64])) for i in range(0, len(lo_e), 64)]).numpy()
        Phi = torch.cat([model.pooled(to_batch(hi_e[i:i + 64])) for i in range(0, len(hi_e), 64)]).numpy()
    return {"model": model, "card": card, "P": P, "d_lo": Plo - P, "d_hi": Phi - P, "n_photos": len(ims)}


class VectorFactory:
    """Samples pooled features like the photos' and maps them through the model's heads."""

    def __init__(self, stats: dict[str, Any], seed: int = 0) -> None:
        self.s = stats
        self.rng = np.random.default_rng(seed)
        P = stats["P"].astype(np.float64)
        self.mu = P.mean(0)
        U, S, Vt = np.linalg.svd(P - self.mu, full_matrices=False)
        self.basis = (S[:, None] * Vt) / np.sqrt(max(1, len(P) - 1))  # rows: principal directions x std
        self.iso = 0.1 * float(np.sqrt((S**2).sum() / (len(P) - 1) / P.shape[1]))  # keeps full rank

    def pooled(self, n: int) -> np.ndarray:
        z = self.rng.standard_normal((n, self.basis.shape[0]))
        x = self.mu + z @ self.basis + self.iso * self.rng.standard_normal((n, self.basis.shape[1]))
        return np.clip(x, 1e-6, None).astype(np.float32)

    def _heads(self, pooled: np.ndarray, head: str) -> np.ndarray:
        import torch

        m = self.s["model"]
        fn = {"a1": m.adapter1, "a2": m.adapter2, "red": m.reduction}[head]
        out = []
        with torch.inference_mode():
            for i in range(0, len(pooled), 65536):
                out.append(fn(torch.from_numpy(pooled[i:i + 65536])).numpy())
        return np.concatenate(out).astype(np.float32)

    def gallery(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        P = self.pooled(n)
        return P, self._heads(P, "a1"), self._heads(P, "red")

    def queries(self, P_gallery: np.ndarray, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (q128 from adapter 2, q512, true gallery row or -1)."""
        src = self.rng.integers(0, len(P_gallery), n_pos)
        j = self.rng.integers(0, len(self.s["d_lo"]), n_pos)
        lo = np.clip(P_gallery[src] + self.s["d_lo"][j], 1e-6, None)
        hi = np.clip(P_gallery[src] + self.s["d_hi"][j], 1e-6, None)
        neg = self.pooled(n_neg)
        q128 = np.concatenate([self._heads(lo, "a2"), self._heads(neg, "a2")])
        q512 = np.concatenate([self._heads(hi, "red"), self._heads(neg, "red")])
        truth = np.concatenate([src, -np.ones(n_neg, np.int64)])
        return q128, q512, truth


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# --------------------------------------------------------------------------------------------
# 1. search
# --------------------------------------------------------------------------------------------
@dataclass
class _SearchQueries:
    """The search benchmark's queries, and what counts as a flag in the job's terms: a correct
    top-1 whose normalised fine score reaches the card's fine threshold (normalisation subtracts
    a per-query offset from the model's background bank)."""

    q128: np.ndarray
    q512: np.ndarray
    truth: np.ndarray     # true gallery row, -1 for a query without a match
    offset: np.ndarray    # per-query normalisation offset
    fine: float
    coarse_threshold: float
    k: int

    @property
    def n(self) -> int:
        return len(self.truth)

    @property
    def pos(self) -> np.ndarray:
        return self.truth >= 0

    def recall1(self, I: np.ndarray) -> float:
        return float((I[self.pos, 0] == self.truth[self.pos]).mean())

    def flags(self, I: np.ndarray, D: np.ndarray) -> np.ndarray:
        return self.pos & (I[:, 0] == self.truth) & (D[:, 0] - self.offset >= self.fine)


@dataclass
class _Exhaustive:
    """The exhaustive search every other row is compared with."""

    qps: float
    recall1: float
    flags: np.ndarray


def _search_vectors(n: int, n_queries: int, photos: list[Path] | None) -> tuple[Any, np.ndarray, np.ndarray, _SearchQueries]:
    """Gallery vectors and queries from the shipped model -> (card, g128, g512, queries)."""
    from models.card import load_background
    from pipeline.gallery.index import ScoreNorm, background_term

    t0 = time.time()
    st = pooled_statistics(photos=photos)
    card = st["card"]
    vf = VectorFactory(st)
    P, g128, g512 = vf.gallery(n)
    n_pos = max(1, n_queries // 2)
    q128, q512, truth = vf.queries(P, n_pos, n_queries - n_pos)
    del P
    thr_c = float(card.thresholds["coarse"])
    k = int(card.thresholds.get("rerank_k", 500))
    print(f"vectors: {n} gallery, {n_queries} queries ({n_pos} with a true match) from {st['n_photos']} photos "
          f"in {time.time() - t0:.0f}s; coarse threshold {thr_c}, K={k}", flush=True)
    norm, fine = ScoreNorm.from_dict(card.thresholds.get("norm")), float(card.thresholds["fine"])
    bank = load_background(None, card)
    offset = norm.beta * background_term(q512, bank.f512 if bank is not None else None, norm.k)
    return card, g128, g512, _SearchQueries(q128, q512, truth, offset, fine, thr_c, k)


def _exhaustive_row(g512: np.ndarray, qs: _SearchQueries) -> tuple[dict[str, Any], _Exhaustive]:
    import faiss

    flat512 = faiss.IndexFlatIP(g512.shape[1])
    flat512.add(g512)
    t, (D, I) = _timed(lambda: flat512.search(qs.q512, 1))
    exh = _Exhaustive(qs.n / t, qs.recall1(I), qs.flags(I, D))
    flat512.reset()  # free the copy before the next index
    row = {"method": f"exhaustive {g512.shape[1]}-d flat", "QPS": f"{exh.qps:.0f}", "recall@1": f"{exh.recall1:.4f}",
           "vs exhaustive QPS": "1.00x", "recall@1 / exhaustive": "1.000",
           "flags kept": f"1.000 ({int(exh.flags.sum())})"}
    return row, exh


def _build_cascade(g128: np.ndarray, g512: np.ndarray, spec: str, **kw: Any) -> tuple[Any, float]:
    """One-shard cascade index with the coarse stage ``spec`` (a faiss factory string) -> (index, build s)."""
    from pipeline.gallery.index import CascadeIndex

    tb = time.perf_counter()
    idx = CascadeIndex.build(np.arange(len(g128), dtype=np.int64), g128, g512, 1, "float16", coarse_spec=spec)
    if kw:
        idx = _retuned(idx, **kw)
    return idx, time.perf_counter() - tb


def _retuned(idx: Any, **kw: Any) -> Any:
    """The same shards searched with other parameters (``nprobe``, ``ef_search``)."""
    from pipeline.gallery.index import CascadeIndex

    return CascadeIndex(idx.shards, idx.coarse_dim, idx.rerank_dim, **kw)


def _run_cascade(idx: Any, qs: _SearchQueries, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Coarse top-k above the coarse threshold, rerank of the survivors -> (top-1 ids, their fine
    scores, {coarse s, rerank s, share of true matches in the coarse top-k})."""
    t1 = time.perf_counter()
    Dc, Ic = idx.search_coarse(qs.q128, k, qs.coarse_threshold)
    t2 = time.perf_counter()
    surv = Ic[:, 0] >= 0
    Fs = np.full(Ic.shape, -np.inf, np.float32)
    if surv.any():
        Fs[surv] = idx.score_fine(qs.q512[surv], Ic[surv])
    parts = {"coarse": t2 - t1, "rerank": time.perf_counter() - t2,
             "hit": float((Ic[qs.pos] == qs.truth[qs.pos][:, None]).any(axis=1).mean())}
    best = np.argmax(Fs, axis=1)
    out = np.take_along_axis(Ic, best[:, None], 1)
    out[~surv] = -1
    return out, np.take_along_axis(Fs, best[:, None], 1), parts


def _cascade_row(name: str, idx: Any, qs: _SearchQueries, exh: _Exhaustive, build_s: float | None = None,
                 k: int | None = None) -> dict[str, Any]:
    kk = qs.k if k is None else k
    t, (I1, F1, parts) = _timed(lambda: _run_cascade(idx, qs, kk))
    rec = qs.recall1(I1)
    kept = (qs.flags(I1, F1) & exh.flags).sum() / max(1, exh.flags.sum())
    row = {"method": name, "K": kk, "QPS": f"{qs.n / t:.0f}", "recall@1": f"{rec:.4f}",
           "vs exhaustive QPS": f"{qs.n / t / exh.qps:.2f}x",
           "recall@1 / exhaustive": f"{rec / exh.recall1:.3f}" if exh.recall1 else "-",
           "true match in coarse top-K": f"{parts['hit']:.3f}", "flags kept": f"{kept:.3f}",
           "ms/query coarse + rerank": f"{1000 * parts['coarse'] / qs.n:.2f} + "
                                       f"{1000 * parts['rerank'] / qs.n:.2f}",
           "build s": f"{build_s:.1f}" if build_s is not None else ""}
    print(row, flush=True)
    return row


def _coarse_only_row(idx: Any, qs: _SearchQueries, exh: _Exhaustive) -> dict[str, Any]:
    """The exact coarse scan alone, top-1 only."""
    t, (D, I) = _timed(lambda: idx.search_coarse(qs.q128, 1, -np.inf))
    return {"method": f"{idx.coarse_dim}-d only (flat)", "K": 1, "QPS": f"{qs.n / t:.0f}",
            "recall@1": f"{qs.recall1(I):.4f}", "vs exhaustive QPS": f"{qs.n / t / exh.qps:.2f}x",
            "recall@1 / exhaustive": f"{qs.recall1(I) / exh.recall1:.3f}" if exh.recall1 else "-"}


def _approximate_rows(g128: np.ndarray, g512: np.ndarray, qs: _SearchQueries, exh: _Exhaustive) -> list[dict[str, Any]]:
    """(d) approximate coarse stages (IVF, HNSW), each at two search depths on the same index."""
    nlist = int(max(64, min(4096, 4 * np.sqrt(len(g128)))))
    ivf, sec = _build_cascade(g128, g512, f"IVF{nlist},Flat", nprobe=32)
    rows = [_cascade_row(f"cascade: IVF{nlist} coarse (nprobe 32) + rerank", ivf, qs, exh, sec),
            _cascade_row(f"cascade: IVF{nlist} coarse (nprobe 128) + rerank", _retuned(ivf, nprobe=128), qs, exh)]
    del ivf
    hnsw, sec = _build_cascade(g128, g512, "HNSW32", ef_search=128)
    rows += [_cascade_row("cascade: HNSW32 coarse (efSearch 128) + rerank", hnsw, qs, exh, sec),
             _cascade_row("cascade: HNSW32 coarse (efSearch 512) + rerank", _retuned(hnsw, ef_search=512), qs, exh)]
    return rows


def bench_search(n: int, n_queries: int, out_dir: Path, photos: list[Path] | None = None) -> dict[str, Any]:
    card, g128, g512, qs = _search_vectors(n, n_queries, photos)
    row, exh = _exhaustive_row(g512, qs)  # (b) exhaustive rerank-dimension search
    rows = [row]
    # (a) the cascade with an exact coarse scan, K swept on one index
    flat, sec = _build_cascade(g128, g512, "Flat")
    name = f"cascade: {flat.coarse_dim}-d flat coarse + {flat.rerank_dim}-d rerank"
    rows.append(_cascade_row(name, flat, qs, exh, sec))
    rows += [_cascade_row(name, flat, qs, exh, k=kk) for kk in (100, 2000)]
    rows.append(_coarse_only_row(flat, qs, exh))  # (c) coarse dimension only
    flat = None
    rows += _approximate_rows(g128, g512, qs, exh)
    res = {"machine": machine(), "gallery_size": n, "queries": n_queries, "positives": int(qs.pos.sum()),
           "coarse_threshold": qs.coarse_threshold, "rerank_k": qs.k, "model": card.version_id, "rows": rows}
    print(f"\nsearch benchmark on {res['machine']}; gallery {n:,}; K={qs.k}; coarse threshold {qs.coarse_threshold}\n")
    print(_table(rows, ["method", "K", "QPS", "vs exhaustive QPS", "flags kept", "recall@1", "recall@1 / exhaustive",
                        "true match in coarse top-K", "ms/query coarse + rerank", "build s"]))
    (out_dir / "search.json").write_text(json.dumps(res, indent=2))
    return res


# --------------------------------------------------------------------------------------------
# 3. memory
# --------------------------------------------------------------------------------------------
_RSS_PROBE = """
import sys, time, numpy as np
def hwm():  # peak RSS of this process since exec (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from models.card import load_background, read_card
from pipeline.gallery import ModelRef, open_gallery
card = read_card()
bank = load_background(None, card)  # the query model's (normalisation), ~1 MB: before the baseline
base = hwm()
t = time.time()
g = open_gallery(sys.argv[1], ModelRef(card.version_id, bank))
q = np.load(sys.argv[2])
q128, q512 = q["q128"], q["q512"]
c = g.candidates(q128, lambda rows: q512[rows])
best = np.take_along_axis(c.I, np.argmax(c.F, axis=1)[:, None], 1)[:, 0]
best[~c.survivors] = -1
np.save(sys.argv[3], best)
print(hwm(), base, time.time() - t)
"""


def bench_memory(n: int, out_dir: Path, n_queries: int = 1000, photos: list[Path] | None = None) -> dict[str, Any]:
    import pandas as pd

    from pipeline.gallery import GalleryContent, VersionModel, write_version
    from pipeline.gallery.banks import Bank
    from pipeline.ingest.storage import open_store

    st = pooled_statistics(photos=photos)
    card = st["card"]
    vf = VectorFactory(st, seed=1)
    P, g128, g512 = vf.gallery(n)
    q128, q512, truth = vf.queries(P, n_queries // 2, n_queries - n_queries // 2)
    del P
    qfile = out_dir / "mem_queries.npz"
    np.savez(qfile, q128=q128, q512=q512)
    now = pd.Timestamp.now(tz="UTC")
    ids = np.arange(n, dtype=np.int64)
    entries = pd.DataFrame({"id": ids, "bank": "b", "category": "c", "action": "filter",
                            "source_uri": [f"s3://refs/b/{i:08d}.jpg" for i in range(n)],
                            "sha256": [f"{i:064x}" for i in range(n)], "added_at": now})
    rows = []
    base_best = None
    pos = truth >= 0
    for dtype in ("float32", "float16", "int8"):
        root = out_dir / f"mem-gallery-{dtype}"
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        content = GalleryContent(ids, g128, g512, entries, {"b": Bank("b", "-", "c", "filter")})
        write_version(open_store(str(root), create=True), content, VersionModel.from_card(card), n_shards=4, rerank_dtype=dtype)
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(root), str(qfile), str(out_dir / f"best-{dtype}.npy")],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        peak, base, secs = r.stdout.split()
        best = np.load(out_dir / f"best-{dtype}.npy")
        if base_best is None:
            base_best = best
        rec = float((best[pos] == truth[pos]).mean())
        agree = float((best == base_best).mean())
        per = (int(peak) - int(base)) / n
        rows.append({"rerank dtype": dtype, "disk bytes/entry": f"{disk / n:.0f}", "RSS bytes/entry": f"{per:.0f}",
                     f"peak RSS @{n // 1000}k": f"{int(peak) / 2**30:.2f} GiB",
                     "peak RSS @10M (extrapolated)": f"{(int(base) + per * 10_000_000) / 2**30:.1f} GiB",
                     "recall@1": f"{rec:.4f}", "same top-1 as float32": f"{agree:.4f}", "load+query s": f"{float(secs):.1f}"})
        print(rows[-1], flush=True)
        shutil.rmtree(root, ignore_errors=True)
    res = {"machine": machine(), "gallery_size": n, "rows": rows}
    print(f"\nmemory benchmark on {res['machine']}; gallery {n:,} entries (4 shards)\n")
    print(_table(rows, list(rows[0])))
    (out_dir / "memory.json").write_text(json.dumps(res, indent=2))
    return res


# --------------------------------------------------------------------------------------------
# 2. pipeline
# --------------------------------------------------------------------------------------------
def single_stage_search(gallery: Any, xq512: np.ndarray) -> list[Any]:
    """Baseline without the cascade: exhaustive 512-d search of a loaded
    :class:`~pipeline.gallery.GalleryIndex` for every query, then the job's own normalisation
    and bank rules. -> one ``Match`` per query."""
    D, I = gallery.cascade.search_fine_exhaustive(xq512, min(gallery.params.rerank_k, max(1, gallery.cascade.ntotal)))
    F, offset = gallery.normalise(xq512, D)
    return gallery.decide(D, I, F, offset)


class SingleStageModerator(Moderator):
    """The job's Moderator with the benchmark's single-stage search: the high-res 512-d pass for
    every decoded image and :func:`single_stage_search`, no low-res coarse stage (every image is a
    "survivor"). Passed to :func:`jobs.run.moderate` as ``moderator``; the production job
    never runs it."""

    def _search(self, batch: dict[str, Any], rows: np.ndarray) -> tuple[dict[int, Any], dict[str, Any]]:
        timing: dict[str, Any] = {"model_coarse": 0.0, "search": 0.0, "model_rerank": 0.0, "survivors": len(rows)}
        if not len(rows):
            return {}, timing
        t = time.perf_counter()
        xq512 = self.fx.fine_features(batch["high"][rows])
        timing["model_rerank"] = time.perf_counter() - t
        t = time.perf_counter()
        decisions = single_stage_search(self.gallery, xq512)
        timing["search"] = time.perf_counter() - t
        return {int(r): d for r, d in zip(rows, decisions)}, timing


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
    for p in _photo_paths(photos, 300):
        with Image.open(p) as im:
            pool.append(im.convert("RGB"))
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
    out = {"images": len(files), "decode_s_per_image": t_dec, "native_bf16": bool(cpu_has_native_bf16() or torch.cuda.is_available())}
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
    from jobs.gallery_cmd import local_extractor
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
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

    from jobs.bench_s3 import moto_available, s3_endpoint

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
    print(_table(rows, list(rows[0])))
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

    from jobs.job_config import JobConfig
    from jobs.ray_stages import init_ray
    from jobs.run import moderate

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


# --------------------------------------------------------------------------------------------
# 4. decode
# --------------------------------------------------------------------------------------------
DECODE_SIZES = ((640, 480), (1920, 1080), (4032, 3024))


def _encoded(fmt: str, size: tuple[int, int], photos: list[Path] | None) -> bytes:
    import io

    from PIL import Image

    from models.synthetic import generate

    src = _photo_paths(photos, 1)
    if src:
        with Image.open(src[0]) as im:
            img = im.convert("RGB").resize(size, Image.BILINEAR)
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
            t_dec, _ = _timed(lambda d=data: dec.decode_one(d), repeat)
            t_full, _ = _timed(lambda d=data: full(d), max(3, repeat // 4))
            rows.append({"format": fmt, "size": f"{size[0]}x{size[1]}", "KB": len(data) // 1024,
                         "decode+resize ms (modscan)": f"{1000 * t_dec:.1f}",
                         "full decode+resize ms": f"{1000 * t_full:.1f}", "speed-up": f"{t_full / t_dec:.2f}x"})
    print(f"\ndecode benchmark on {machine()} (high {c.high_res} px, low {c.low_res} px; per image)\n")
    print(_table(rows, list(rows[0])))
    res = {"machine": machine(), "rows": rows}
    (out_dir / "decode.json").write_text(json.dumps(res, indent=2))
    return res


def cli_bench(a: argparse.Namespace) -> int:
    out = Path(getattr(a, "workdir", None) or "bench-out")
    out.mkdir(parents=True, exist_ok=True)
    photos = [Path(p) for p in a.photos] if getattr(a, "photos", None) else None
    if a.bcmd == "search":
        bench_search(a.gallery_size, a.queries, out, photos)
    elif a.bcmd == "memory":
        bench_memory(a.gallery_size, out, photos=photos)
    elif a.bcmd == "decode":
        bench_decode(out, photos=photos)
    elif a.bcmd == "pipeline":
        bench_pipeline(a.images, out / "pipeline", s3=not a.no_s3, photos=photos, s3_endpoint=a.s3_endpoint)
    return 0
