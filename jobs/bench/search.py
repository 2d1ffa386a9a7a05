"""``modscan bench search``: the cascade's coarse stages (flat, IVF, HNSW) against an exhaustive
512-d search, on realistic vectors from the shipped model (:mod:`jobs.bench.common`), in one run:
queries/s, recall@1 and the share of the exhaustive search's flags each keeps. Writes
``bench-out/search.json``. Benchmarks never assert: they print what they measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench.common import VectorFactory, bench_args, cached_pooled_statistics, machine, photos_help, table, timed


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
    base: np.ndarray | None = None  # gallery row -> its base photo: a top-1 of the true row's base is correct

    def correct(self, I1: np.ndarray) -> np.ndarray:
        """``(n,)`` top-1 rows -> whether each is the query's picture (its row, or a row of its base)."""
        t = self.truth
        if self.base is None:
            return (I1 == t) & (t >= 0)
        ok = (t >= 0) & (I1 >= 0)
        out = np.zeros(len(t), bool)
        out[ok] = self.base[I1[ok]] == self.base[t[ok]]
        return out

    @property
    def n(self) -> int:
        return len(self.truth)

    @property
    def pos(self) -> np.ndarray:
        return self.truth >= 0

    def recall1(self, I: np.ndarray) -> float:
        return float(self.correct(I[:, 0])[self.pos].mean())

    def flags(self, I: np.ndarray, D: np.ndarray) -> np.ndarray:
        return self.pos & self.correct(I[:, 0]) & (D[:, 0] - self.offset >= self.fine)


@dataclass
class _Exhaustive:
    """The exhaustive search every other row is compared with."""

    qps: float
    recall1: float
    flags: np.ndarray


def _search_vectors(n: int, n_queries: int, photos: list[Path] | None, out_dir: Path) -> tuple[Any, np.ndarray, np.ndarray, _SearchQueries]:
    """Gallery vectors and queries from the shipped model -> (card, g128, g512, queries)."""
    from models.card import load_background
    from pipeline.gallery.index import ScoreNorm, background_term

    t0 = time.time()
    st = cached_pooled_statistics(photos, out_dir)
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
    return card, g128, g512, _SearchQueries(q128, q512, truth, offset, fine, thr_c, k, vf.gallery_base)


def _exhaustive_row(g512: np.ndarray, qs: _SearchQueries) -> tuple[dict[str, Any], _Exhaustive]:
    import faiss

    flat512 = faiss.IndexFlatIP(g512.shape[1])
    flat512.add(g512)
    t, (D, I) = timed(lambda: flat512.search(qs.q512, 1))
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
             "hit": float(np.stack([qs.correct(Ic[:, j]) for j in range(Ic.shape[1])], axis=1)[qs.pos].any(axis=1).mean())}
    best = np.argmax(Fs, axis=1)
    out = np.take_along_axis(Ic, best[:, None], 1)
    out[~surv] = -1
    return out, np.take_along_axis(Fs, best[:, None], 1), parts


def _cascade_row(name: str, idx: Any, qs: _SearchQueries, exh: _Exhaustive, build_s: float | None = None,
                 k: int | None = None) -> dict[str, Any]:
    kk = qs.k if k is None else k
    t, (I1, F1, parts) = timed(lambda: _run_cascade(idx, qs, kk))
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
    t, (D, I) = timed(lambda: idx.search_coarse(qs.q128, 1, -np.inf))
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
    card, g128, g512, qs = _search_vectors(n, n_queries, photos, out_dir)
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
    print(table(rows, ["method", "K", "QPS", "vs exhaustive QPS", "flags kept", "recall@1", "recall@1 / exhaustive",
                        "true match in coarse top-K", "ms/query coarse + rerank", "build s"]))
    (out_dir / "search.json").write_text(json.dumps(res, indent=2))
    return res


def cli_bench_search(a: argparse.Namespace) -> int:
    out, photos = bench_args(a)
    bench_search(a.gallery_size, a.queries, out, photos)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``search`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("search")
    q.add_argument("--gallery-size", type=int, default=1_000_000)
    q.add_argument("--queries", type=int, default=2000)
    q.add_argument("--photos", action="append", metavar="DIR", help=photos_help("the vectors' statistics come from them"))
    q.add_argument("--workdir", default=None, help="output folder (default bench-out); caches the photos' pooled statistics")
    q.set_defaults(fn=cli_bench_search)
