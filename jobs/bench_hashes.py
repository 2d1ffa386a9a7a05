"""``modscan bench hashes``: PDQ list indexes, flat against multi-index hashing, in one run.

For each list size: memory per hash (RSS growth of this process while the index is built, and
the bytes faiss serialises it to), build seconds, queries/s, and the recall of every other index
against the flat one (exact) at ``max_distance``; then a table and the ratios. Benchmarks never
assert: they print what they measured and write a JSON.

Data: uniformly random 256-bit hashes (PDQ bits are balanced by construction, each bit is a
comparison with the median) of which a share are *variants* of other entries at 1-48 bits, as
lists hold edited copies of one picture; queries are half planted near-duplicates of random
entries at known distances (:data:`PLANTED`, some beyond ``max_distance`` so that a miss and a
false hit both show) and half fresh random hashes (no match). Random hashes are the easy case for
multi-index hashing (even buckets); real lists with many near-identical entries fill some buckets
more. ``hnsw`` (``IndexBinaryHNSW``, knn + distance filter: faiss has no binary HNSW range search)
is measured for comparison up to ``hnsw_max_size`` entries (its build is slow), and ``mih16``
(ThreatExchange's ``PDQMultiHashIndex`` layout, 16 tables of 16 bits) on request.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench_common import host, table

PLANTED = (0, 4, 8, 16, 24, 31, 32, 40)
METHODS = ("flat", "mih", "mih16", "hnsw")
DEFAULT_METHODS = ("flat", "mih", "hnsw")
VARIANT_SHARE = 0.05


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _allocated() -> int | None:
    """Bytes malloc has handed out and not got back (glibc ``mallinfo2``: in-use heap + mmapped
    blocks), or None off glibc. Unlike RSS it does not hide an index that reuses memory freed
    earlier in the process."""
    try:
        libc = ctypes.CDLL(None)
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    m = f()
    return int(m.uordblks + m.hblkhd)


def flip_bits(codes: np.ndarray, k: np.ndarray, rng: np.random.Generator, chunk: int = 65536) -> np.ndarray:
    """``codes`` (n, 32) uint8 with exactly ``k[i]`` distinct random bits of row ``i`` flipped."""
    out = codes.copy()
    cols = np.arange(256)
    for s in range(0, len(codes), chunk):
        kk = np.asarray(k[s:s + chunk])
        order = np.argsort(rng.random((len(kk), 256), dtype=np.float32), axis=1)
        mask = np.zeros((len(kk), 256), bool)
        np.put_along_axis(mask, order, cols[None, :] < kk[:, None], axis=1)
        out[s:s + chunk] ^= np.packbits(mask, axis=1)
    return out


def make_data(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(entries (n, 32), queries (q, 32), planted source entry per query or -1, planted distance or -1)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    nv = int(n * VARIANT_SHARE)
    if nv and n > 1:
        dst = rng.choice(n, nv, replace=False)
        src = rng.integers(0, n, nv)
        codes[dst] = flip_bits(codes[src], rng.integers(1, 49, nv), rng)
    n_pos = n_queries // 2
    src_q = rng.integers(0, n, n_pos)
    d_q = np.asarray([PLANTED[i % len(PLANTED)] for i in range(n_pos)])
    pos = flip_bits(codes[src_q], d_q, rng)
    neg = rng.integers(0, 256, (n_queries - n_pos, 32), dtype=np.uint8)
    queries = np.concatenate([pos, neg])
    return codes, queries, np.concatenate([src_q, -np.ones(len(neg), int)]), np.concatenate([d_q, -np.ones(len(neg), int)])


def _pairs(lims: np.ndarray, I: np.ndarray) -> set[tuple[int, int]]:
    return {(q, int(i)) for q in range(len(lims) - 1) for i in I[lims[q]:lims[q + 1]]}


def _hnsw_search(codes: np.ndarray, queries: np.ndarray, max_distance: int, k: int = 16) -> tuple[Any, float, float, np.ndarray, np.ndarray]:
    import faiss

    t0 = time.perf_counter()
    idx = faiss.IndexBinaryHNSW(256, 16)
    idx.hnsw.efConstruction = 40
    idx.add(codes)
    build = time.perf_counter() - t0
    idx.hnsw.efSearch = 64
    t0 = time.perf_counter()
    D, I = idx.search(queries, k)
    secs = time.perf_counter() - t0
    keep = (D <= max_distance) & (I >= 0)
    lims = np.zeros(len(queries) + 1, np.int64)
    np.cumsum(keep.sum(1), out=lims[1:])
    return idx, build, secs, lims, I[keep]


def bench_size(n: int, n_queries: int, max_distance: int, methods: Sequence[str], hnsw_max_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """One size: a row per method (flat first: the reference for recall)."""
    import faiss

    from pipeline.signals.index import PdqIndex

    codes, queries, src, dist = make_data(n, n_queries, seed)
    planted_in = (src >= 0) & (dist <= max_distance)
    rows: list[dict[str, Any]] = []
    ref: set[tuple[int, int]] | None = None
    alive: list[Any] = []  # every index stays until the size is done: RSS growth is then each one's own
    for m in ["flat"] + [m for m in methods if m != "flat"]:
        if m == "hnsw" and n > hnsw_max_size:
            continue
        gc.collect()
        base, base_alloc = _rss(), _allocated()
        if m == "hnsw":
            idx, build, secs, lims, I = _hnsw_search(codes, queries, max_distance)
            ser = int(faiss.serialize_index_binary(idx).size)
        else:
            t0 = time.perf_counter()
            idx = PdqIndex(codes, "mih", 16, 16) if m == "mih16" else PdqIndex(codes, m)
            build = time.perf_counter() - t0
            idx.search(queries[:10], max_distance)  # warm up
            t0 = time.perf_counter()
            lims, _D, I = idx.search(queries, max_distance)
            secs = time.perf_counter() - t0
            ser = idx.memory_bytes()
        rss = _rss() - base
        alloc = _allocated()
        heap = (alloc - base_alloc) if alloc is not None and base_alloc is not None else None
        got = _pairs(lims, I)
        if ref is None:
            ref = got
        found_planted = sum((q, int(src[q])) in got for q in np.flatnonzero(planted_in))
        rows.append({"size": n, "method": m, "build s": round(build, 4), "queries/s": round(n_queries / max(secs, 1e-9), 1),
                     "heap B/hash": round(heap / n, 1) if heap is not None else "n/a", "RSS B/hash": round(rss / n, 1),
                     "serialised B/hash": round(ser / n, 1),
                     "recall vs flat": round(len(got & ref) / len(ref), 4) if ref else 1.0,
                     "extra vs flat": len(got - ref), "planted found": f"{found_planted}/{int(planted_in.sum())}"})
        print(rows[-1], flush=True)
        alive.append(idx)
    del alive
    gc.collect()
    return rows


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in sorted({r["size"] for r in rows}):
        flat = next(r for r in rows if r["size"] == n and r["method"] == "flat")
        for r in rows:
            if r["size"] == n and r["method"] != "flat":
                out[f"{r['method']}/flat queries/s @{n:,}"] = round(r["queries/s"] / flat["queries/s"], 2)
                out[f"{r['method']}/flat serialised bytes @{n:,}"] = round(r["serialised B/hash"] / flat["serialised B/hash"], 2)
                if isinstance(r["heap B/hash"], float) and isinstance(flat["heap B/hash"], float) and flat["heap B/hash"] > 0:
                    out[f"{r['method']}/flat heap bytes @{n:,}"] = round(r["heap B/hash"] / flat["heap B/hash"], 2)
    return out


def bench_hashes(sizes: Sequence[int] = (1_000_000, 10_000_000), queries: int = 2000, max_distance: int = 31,
                 out: str | os.PathLike[str] = "bench-out/hashes.json", methods: Sequence[str] = DEFAULT_METHODS,
                 threads: int = 1, hnsw_max_size: int = 1_000_000, seed: int = 0) -> dict[str, Any]:
    """Measure every method at every size in one run; print the table and ratios; write ``out``."""
    import faiss

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad} (known: {list(METHODS)})")
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        rows = [r for n in sizes for r in bench_size(int(n), int(queries), int(max_distance), methods, hnsw_max_size, seed)]
    finally:
        faiss.omp_set_num_threads(old)
    res = {"machine": host(), "faiss": faiss.__version__, "threads": threads, "queries": queries,
           "max_distance": max_distance, "planted_distances": list(PLANTED), "variant_share": VARIANT_SHARE,
           "rows": rows, "ratios": _ratios(rows)}
    print(f"\nPDQ index benchmark on {res['machine']}, faiss {res['faiss']}, {threads} thread(s); "
          f"{queries} queries (half planted at {list(PLANTED)} bits), max distance {max_distance}\n")
    print(table(rows, list(rows[0])))
    print("\nratios:\n" + "\n".join(f"  {k}: {v}" for k, v in res["ratios"].items()))
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2))
    return res


def cli_bench_hashes(a: argparse.Namespace) -> int:
    bench_hashes(sizes=[int(s.replace("_", "")) for s in a.sizes.split(",") if s.strip()], queries=a.queries,
                 max_distance=a.max_distance, out=a.out, methods=[m for m in a.methods.split(",") if m],
                 threads=a.threads, hnsw_max_size=a.hnsw_max_size)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``hashes`` under ``modscan bench`` (``jobs/cli.py``'s bench sub-parsers)."""
    q = bench_subparsers.add_parser("hashes", help="PDQ list indexes: flat vs multi-hash (memory, build, queries/s, recall)")
    q.add_argument("--sizes", default="1000000,10000000", help="comma-separated list sizes")
    q.add_argument("--queries", type=int, default=2000)
    q.add_argument("--max-distance", type=int, default=31)
    q.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {list(METHODS)} (mih16: ThreatExchange's 16 x 16-bit layout)")
    q.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    q.add_argument("--hnsw-max-size", type=int, default=1_000_000, help="skip hnsw above this size (slow build)")
    q.add_argument("--out", default="bench-out/hashes.json")
    q.set_defaults(fn=cli_bench_hashes)
