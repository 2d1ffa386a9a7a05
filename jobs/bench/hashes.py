"""``modscan bench hashes``: PDQ list indexes, flat against multi-index hashing, in one run.

For each list size, every method is measured the way a job meets it: the list's index is built
once (``build s``: what writing a gallery version costs) and stored (``file B/hash``), then opened
by **two fresh processes**, as two actors of a node open a version (one after the other, so that
they do not share the cores while timed): ``load s`` is the slower of their loads (map the stored file;
for faiss's multi-hash, the path before this index: read the codes and rebuild), ``queries/s`` the
faster one's search speed after 10 warm-up queries, and, while both hold the index, their memory after
loading and querying, per hash, from ``/proc/self/smaps_rollup`` less what the process held
before loading: ``USS`` (private to the process: what a second process adds to the node),
``PSS`` (its fair share of shared pages), ``anon`` (heap; never shareable). ``recall vs flat``
compares every method's matches with flat's (exact) at ``max_distance``. Benchmarks never
assert: they print what they measured and write a JSON.

Methods: ``flat`` (brute force over the stored codes), ``mih`` (:mod:`pipeline.signals.multihash`,
memory-mapped), ``mih_faiss`` (faiss ``IndexBinaryMultiHash`` 11 x 23, the index used before
this one), ``mih16`` (faiss with ThreatExchange's 16 x 16 layout), ``hnsw`` (``IndexBinaryHNSW``,
approximate, knn + distance filter: faiss has no binary HNSW range search; measured in this
process up to ``hnsw_max_size``, its build is slow). faiss's indexes are private by construction,
so ``mih_faiss`` / ``mih16`` run in one process (two would hold two copies).

Data: uniformly random 256-bit hashes (PDQ bits are balanced by construction, each bit is a
comparison with the median) of which a share are *variants* of other entries at 1-48 bits, as
lists hold edited copies of one picture; queries are half planted near-duplicates of random
entries at known distances (:data:`PLANTED`, some beyond ``max_distance`` so that a miss and a
false hit both show) and half fresh random hashes (no match). Random hashes are the easy case for
multi-index hashing (even buckets); real lists with many near-identical entries fill some buckets
more.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench.common import host, table

PLANTED = (0, 4, 8, 16, 24, 31, 32, 40)
METHODS = ("flat", "mih", "mih_faiss", "mih16", "hnsw")
DEFAULT_METHODS = ("flat", "mih", "mih_faiss")
SHARED = ("flat", "mih")  # memory-mapped: opened by two processes at once
VARIANT_SHARE = 0.05
WARMUP = 10


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


def memory() -> dict[str, int]:
    """This process's ``uss`` (private clean + dirty), ``pss`` and ``anon`` bytes
    (``/proc/self/smaps_rollup``, Linux)."""
    kb: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                kb[parts[0][:-1]] = int(parts[1])
    return {"uss": 1024 * (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)), "pss": 1024 * kb.get("Pss", 0),
            "anon": 1024 * kb.get("Anonymous", 0)}


def _open(method: str, path: str) -> Any:
    """What a process does to get a searchable index of the stored list: map it, or (faiss's
    multi-hash, the index used before) read the codes and rebuild. -> a ``search(xq, r)``."""
    from pipeline.signals.index import PdqIndex

    if method in SHARED:
        index = PdqIndex.mapped(path, kind=method)
        return lambda xq, r: index.search(xq, r)
    import faiss

    codes = PdqIndex.mapped(path).codes()
    nhash, bits = (16, 16) if method == "mih16" else (11, 23)
    mih = faiss.IndexBinaryMultiHash(256, nhash, bits)
    mih.add(codes)
    del codes

    def search(xq: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nflip = r // nhash
        mih.nflip = nflip
        index = mih if nflip <= 2 else mih.storage  # type: ignore[attr-defined]  # not in faiss's stubs
        return index.range_search(xq, r + 1)  # faiss's radius is strict
    return search


def _child(method: str, path: str, queries: np.ndarray, max_distance: int, threads: int, turn: Any, barrier: Any,
           out: Any) -> None:
    """One fresh process: open the stored index and query (one process at a time, so that they do
    not share the cores while timed), wait until its sibling holds the index too, then measure."""
    import faiss

    import pipeline.signals.index  # noqa: F401  (imports are not the index's load or memory)

    faiss.omp_set_num_threads(threads)
    search_queries = np.ascontiguousarray(queries)
    before = memory()
    with turn:
        t0 = time.perf_counter()
        search = _open(method, path)
        load = time.perf_counter() - t0
        search(search_queries[:WARMUP], max_distance)
        t0 = time.perf_counter()
        lims, _D, I = search(search_queries, max_distance)
        secs = time.perf_counter() - t0
    if barrier is not None:
        barrier.wait()  # both processes hold the index now: shared pages count once between them
    after = memory()
    out.put({"load": load, "secs": secs, "lims": np.asarray(lims, np.int64), "I": np.asarray(I, np.int64),
             **{k: after[k] - before[k] for k in after}})


def _in_processes(method: str, path: str, queries: np.ndarray, max_distance: int, threads: int) -> list[dict[str, Any]]:
    """:func:`_child` in two processes at once (one for faiss's private indexes)."""
    ctx = mp.get_context("forkserver")  # fresh processes, forked from one that imported the modules once
    ctx.set_forkserver_preload(["jobs.bench.hashes", "pipeline.signals.index"])
    n = 2 if method in SHARED else 1
    barrier = ctx.Barrier(n) if n > 1 else None
    out = ctx.Queue()
    turn = ctx.Lock()
    procs = [ctx.Process(target=_child, args=(method, path, queries, max_distance, threads, turn, barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    res = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return res


def _hnsw(codes: np.ndarray, queries: np.ndarray, max_distance: int, k: int = 16) -> dict[str, Any]:
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
    return {"build": build, "load": None, "secs": secs, "lims": lims, "I": I[keep], "uss": None, "pss": None, "anon": None}


def _row(n: int, m: str, build: float, file_bytes: int, runs: list[dict[str, Any]], n_queries: int) -> dict[str, Any]:
    def per_hash(key: str) -> float | str:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return round(max(vals) / n, 1) if vals else "n/a"
    loads = [r["load"] for r in runs if r.get("load") is not None]
    return {"size": n, "method": m, "build s": round(build, 3), "file B/hash": round(file_bytes / n, 1),
            "load s": round(max(loads), 4) if loads else "n/a", "processes": len(runs),
            "queries/s": round(n_queries / max(min(r["secs"] for r in runs), 1e-9), 1),
            "USS B/hash": per_hash("uss"), "PSS B/hash": per_hash("pss"), "anon B/hash": per_hash("anon")}


def bench_size(n: int, n_queries: int, max_distance: int, methods: Sequence[str], hnsw_max_size: int,
               workdir: str, threads: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """One size: a row per method (flat first: the reference for recall)."""
    from pipeline.signals.index import PdqIndex

    codes, queries, src, dist = make_data(n, n_queries, seed)
    planted_in = (src >= 0) & (dist <= max_distance)
    path = os.path.join(workdir, f"pdq-{n}.safetensors")
    t0 = time.perf_counter()
    data = PdqIndex(codes, "mih").to_bytes()  # what a gallery version stores beside the list
    build = time.perf_counter() - t0
    Path(path).write_bytes(data)
    file_bytes = len(data)
    del data
    rows: list[dict[str, Any]] = []
    ref: set[tuple[int, int]] | None = None
    for m in ["flat"] + [m for m in methods if m != "flat"]:
        if m == "hnsw" and n > hnsw_max_size:
            continue
        runs = [_hnsw(codes, queries, max_distance)] if m == "hnsw" else _in_processes(m, path, queries, max_distance, threads)
        b = runs[0]["build"] if m == "hnsw" else {"flat": 0.0, "mih": build}.get(m, max(r["load"] for r in runs))
        row = _row(n, m, b, file_bytes if m in SHARED else 32 * n, runs, n_queries)
        got = _pairs(runs[0]["lims"], runs[0]["I"])
        ref = got if ref is None else ref
        found = sum((int(q), int(src[q])) in got for q in np.flatnonzero(planted_in))
        row.update({"recall vs flat": round(len(got & ref) / len(ref), 4) if ref else 1.0, "extra vs flat": len(got - ref),
                    "planted found": f"{found}/{int(planted_in.sum())}"})
        rows.append(row)
        print(rows[-1], flush=True)
    os.unlink(path)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in sorted({r["size"] for r in rows}):
        at = {r["method"]: r for r in rows if r["size"] == n}
        for m, r in at.items():
            if m != "flat":
                out[f"{m}/flat queries/s @{n:,}"] = round(r["queries/s"] / at["flat"]["queries/s"], 2)
        if "mih" in at and "mih_faiss" in at:
            old, new = at["mih_faiss"], at["mih"]
            out[f"mih_faiss/mih load time @{n:,}"] = round(old["load s"] / max(new["load s"], 1e-6), 1)
            if isinstance(old["USS B/hash"], float) and isinstance(new["USS B/hash"], float):
                out[f"mih_faiss/mih USS @{n:,}"] = round(old["USS B/hash"] / max(new["USS B/hash"], 0.1), 1)
    return out


def bench_hashes(sizes: Sequence[int] = (1_000_000, 10_000_000), queries: int = 2000, max_distance: int = 31,
                 out: str | os.PathLike[str] = "bench-out/hashes.json", methods: Sequence[str] = DEFAULT_METHODS,
                 threads: int = 1, hnsw_max_size: int = 1_000_000, seed: int = 0,
                 workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Measure every method at every size in one run; print the table and ratios; write ``out``.
    ``workdir``: where the stored indexes are written (a temporary folder by default)."""
    import faiss

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad} (known: {list(METHODS)})")
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as wd:
            rows = [r for n in sizes for r in bench_size(int(n), int(queries), int(max_distance), methods, hnsw_max_size,
                                                         wd, int(threads), seed)]
    finally:
        faiss.omp_set_num_threads(old)
    res: dict[str, Any] = {"machine": host(), "faiss": faiss.__version__, "threads": threads, "queries": queries,
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
                 threads=a.threads, hnsw_max_size=a.hnsw_max_size, workdir=a.workdir)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``hashes`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("hashes", help="PDQ list indexes: flat vs multi-hash (build, load, memory, queries/s, recall)")
    q.add_argument("--sizes", default="1000000,10000000", help="comma-separated list sizes")
    q.add_argument("--queries", type=int, default=2000)
    q.add_argument("--max-distance", type=int, default=31)
    q.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {list(METHODS)} (mih_faiss: faiss's multi-hash, rebuilt per process; "
                        "mih16: ThreatExchange's 16 x 16-bit layout)")
    q.add_argument("--threads", type=int, default=1, help="search threads (faiss OpenMP)")
    q.add_argument("--hnsw-max-size", type=int, default=1_000_000, help="skip hnsw above this size (slow build)")
    q.add_argument("--workdir", default=None, help="folder for the stored indexes (default: a temporary one)")
    q.add_argument("--out", default="bench-out/hashes.json")
    q.set_defaults(fn=cli_bench_hashes)
