"""What the ``modscan bench`` commands share: the machine line, the Markdown table, the
``--photos`` folders, best-of timing, and realistic vectors from the shipped model.

Benchmarks never assert: they print what they measured (and write ``bench-out/*.json``).

Realistic vectors (search, memory): the shipped model's GeM-pooled features of real photos (the
``--photos`` folders when given, else scikit-image's), resampled with jitter (:class:`VectorFactory`)
and pushed through the model's own heads (adapter 1 -> 128-d, reduction -> 512-d). Queries with a
true match are gallery entries displaced by *real* edit displacements (pooled(edited low-res) -
pooled(original), measured on the photos) pushed through adapter 2 (128-d) and the reduction
(512-d); queries without a match are held-out photos displaced the same way. ``modscan bench
scale`` checks their per-pair score tails against real pictures'.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError


def host() -> str:
    """``N CPU (model name), M GiB RAM`` of this machine, without importing torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # no /proc (not Linux): the platform's name will do
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU ({cpu}), {mem:.0f} GiB RAM"


def machine() -> str:
    """:func:`host` plus the GPU torch sees (or ``no GPU``)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{host()}, {gpu}"


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """``rows`` as a Markdown table of the columns ``cols`` (a missing value: empty)."""
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best of ``repeat`` calls of ``fn`` -> (seconds, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def photos_help(use: str, default: str = "scikit-image's sample photos") -> str:
    """The ``--photos`` help of a bench command: what ``use`` the photos are put to."""
    return (f"folder of real photos (JPEG/PNG; repeat for more folders, e.g. ../shared/data/coco256): {use}; "
            f"default: none, {default} instead")


def bench_args(a: argparse.Namespace) -> tuple[Path, list[Path] | None]:
    """A bench command's output folder (``--workdir``, default ``bench-out``; created) and its
    ``--photos`` folders (None when none are given)."""
    out = Path(getattr(a, "workdir", None) or "bench-out")
    out.mkdir(parents=True, exist_ok=True)
    photos = [Path(p) for p in a.photos] if getattr(a, "photos", None) else None
    return out, photos


# --------------------------------------------------------------------------------------------
# realistic vectors
# --------------------------------------------------------------------------------------------
def photo_paths(photos: list[Path] | None, limit: int = 400) -> list[Path]:
    """The first ``limit`` image files of the ``photos`` folders (each sorted, in the order given;
    every suffix the job reads, ``.JPEG`` too); none without ``photos`` (the callers fall back to
    the embedded samples)."""
    from models.preprocess import IMAGE_SUFFIXES

    paths: list[Path] = []
    for d in photos or []:
        if not Path(d).is_dir():
            raise UsageError(f"--photos {d}: no such folder")
        paths += sorted(p for p in Path(d).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:limit]
def pooled_statistics(model_dir: str | None = None, seed: int = 0, photos: list[Path] | None = None,
                      limit: int = 2000) -> dict[str, Any]:
    """Pooled features of real photos (``photos`` folders; fewer than 50: plus scikit-image photos
    and crops of them) and real edit displacements (shipped model)."""
    from PIL import Image

    from models.augment import apply_named, random_edit_names
    from models.card import load_model
    from models.preprocess import batched_features, resize_pair
    from pipeline.evaluation.samples import UNRELATED_PHOTOS, skimage_photo

    model, card = load_model(model_dir)
    c = card.config
    rng = random.Random(seed)
    paths = photo_paths(photos, limit)
    ims = []
    for p in paths:
        with Image.open(p) as f:
            ims.append(f.convert("RGB"))
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
    P, Plo, Phi = (batched_features(model.pooled, views).numpy() for views in (hi_o, lo_e, hi_e))
    return {"model": model, "card": card, "P": P, "d_lo": Plo - P, "d_hi": Phi - P, "n_photos": len(ims)}


def cached_pooled_statistics(photos: list[Path] | None, work: Path, limit: int = 2000) -> dict[str, Any]:
    """:func:`pooled_statistics` of ``photos`` (default seed), kept in ``work/pooled-<key>.npz``
    for reruns with the same model and photos: the model passes over up to 2,000 photos are most
    of a benchmark's set-up time."""
    import hashlib
    import json

    from models.card import load_model, read_card

    paths = photo_paths(photos, limit)
    if not paths:
        return pooled_statistics(photos=photos, limit=limit)
    key = hashlib.sha256(json.dumps([read_card(None).version_id, [str(p) for p in paths]]).encode()).hexdigest()[:16]
    path = Path(work) / f"pooled-{key}.npz"
    if path.exists():  # the model is loaded once either way: here, or by pooled_statistics
        model, card = load_model(None)
        z = np.load(path, allow_pickle=False)
        return {"model": model, "card": card, "P": z["P"], "d_lo": z["d_lo"], "d_hi": z["d_hi"], "n_photos": len(z["P"])}
    st = pooled_statistics(photos=photos, limit=limit)
    np.savez(path, P=st["P"], d_lo=st["d_lo"], d_hi=st["d_hi"])
    return st


class VectorFactory:
    """Vectors like the photos', by resampling the photos' own pooled features.

    A Gaussian fitted to pooled features (mean + covariance) gives vectors far more alike than real
    photos (its 512-d per-pair rate at the fine threshold was ~2,000x the real one: ``modscan bench
    scale``'s synthetic check), so every vector here is a *real* photo's pooled feature (its
    *base*) with multiplicative jitter ``exp(sigma * N(0, 1))`` per channel, pushed through the
    model's heads. The photos are split once: the gallery's distractors resample the ``1 -
    holdout`` gallery bases; half of the held-out photos are references stored once each (the true
    matches of the queries with a match, which are edited copies of them: real edit displacements);
    the other half are the queries without a match (never in the gallery, so unrelated to every
    entry, as a real unrelated upload is), displaced the same way. Distractors of one base are
    alike (N entries from B bases repeat each about N / B times): per-pair score tails follow the
    photos', but the distractors' near-duplicate structure is denser than a real gallery's."""

    def __init__(self, stats: dict[str, Any], seed: int = 0, holdout: float = 0.2, sigma: float = 0.1) -> None:
        self.s = stats
        self.rng = np.random.default_rng(seed)
        P = np.asarray(stats["P"], np.float32)
        order = np.random.default_rng(12345).permutation(len(P))  # one split, whatever the seed
        n_held = max(2, int(round(holdout * len(P))))
        held = P[order[:n_held]]
        # held-out photos: half are unrelated queries, half are references stored exactly once (the
        # true matches of the queries with a match: unique in the gallery, as a real reference is)
        self.query_bases, self.reference_bases = held[: n_held // 2], held[n_held // 2:]
        self.query_rows = order[: n_held // 2]  # rows of stats["P"] (photos) never in the gallery
        self.gallery_bases = P[order[n_held:]]
        self.reference_rows = np.zeros(0, np.int64)
        self.sigma = float(sigma)
        self.mu = P.mean(0)

    def pooled(self, n: int, chunk: int = 65536, held_out: bool = False) -> np.ndarray:
        """``(n, C)`` float32 resampled pooled features of the gallery bases (``held_out``: of the
        query bases), drawn in chunks; :attr:`last_bases` holds each row's base."""
        bases = self.query_bases if held_out else self.gallery_bases
        out = np.empty((n, bases.shape[1]), np.float32)
        self.last_bases = np.empty(n, np.int64)
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            idx = self.rng.integers(0, len(bases), m)
            b = bases[idx]
            jitter = np.exp(self.sigma * self.rng.standard_normal(b.shape, dtype=np.float32) - self.sigma ** 2 / 2)
            out[i:i + m] = np.clip(b * jitter, 1e-6, None)
            self.last_bases[i:i + m] = idx
        return out

    def heads(self, pooled: np.ndarray, head: str) -> np.ndarray:
        import torch

        m = self.s["model"]
        fn = {"a1": m.adapter1, "a2": m.adapter2, "red": m.reduction}[head]
        out = []
        with torch.inference_mode():
            for i in range(0, len(pooled), 65536):
                out.append(fn(torch.from_numpy(pooled[i:i + 65536])).numpy())
        if not out:  # no rows: the head's output width, no rows
            with torch.inference_mode():
                return np.zeros((0, fn(torch.zeros(1, pooled.shape[1])).shape[1]), np.float32)
        return np.concatenate(out).astype(np.float32)

    def gallery(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pooled, 128-d, 512-d)`` of ``n`` entries; :attr:`gallery_base` holds each entry's
        base photo: entries of one base are near-duplicates, one picture stored many times."""
        n_ref = min(len(self.reference_bases), max(n // 2, 1))
        P = self.pooled(n - n_ref)
        base = self.last_bases.copy()
        jitter = np.exp(self.sigma * self.rng.standard_normal((n_ref, P.shape[1]), dtype=np.float32) - self.sigma ** 2 / 2)
        P = np.concatenate([P, np.clip(self.reference_bases[:n_ref] * jitter, 1e-6, None)])
        self.reference_rows = np.arange(n - n_ref, n)
        self.gallery_base = np.concatenate([base, len(self.gallery_bases) + np.arange(n_ref)])
        return P, self.heads(P, "a1"), self.heads(P, "red")

    def _displaced(self, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features displaced by real edit displacements -> (low-res query, high-res query)."""
        j = self.rng.integers(0, len(self.s["d_lo"]), len(P))
        return np.clip(P + self.s["d_lo"][j], 1e-6, None), np.clip(P + self.s["d_hi"][j], 1e-6, None)

    def queries(self, P_gallery: np.ndarray, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (q128 from adapter 2, q512, true gallery row or -1). A query with a match is an
        edited copy of one of the references stored once (:attr:`reference_rows`)."""
        rows = self.reference_rows if len(self.reference_rows) else np.arange(len(P_gallery))
        src = rows[self.rng.integers(0, len(rows), n_pos)]
        lo, hi = self._displaced(P_gallery[src])
        nlo, nhi = self._displaced(self.pooled(n_neg, held_out=True))
        q128 = np.concatenate([self.heads(lo, "a2"), self.heads(nlo, "a2")])
        q512 = np.concatenate([self.heads(hi, "red"), self.heads(nhi, "red")])
        truth = np.concatenate([src, -np.ones(n_neg, np.int64)])
        return q128, q512, truth
