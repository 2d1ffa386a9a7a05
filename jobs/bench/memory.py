"""``modscan bench memory``: what a gallery costs a node's memory, with N actors on the node.

The real job's loading path (:func:`~pipeline.gallery.query.open_gallery`, as the Moderator calls
it) runs in ``N`` Ray actors on this node against one version of ``--gallery-size`` entries,
written from realistic vectors (:class:`jobs.bench.common.VectorFactory`), three ways:

- ``node``: the node cache (:mod:`pipeline.gallery.nodecache`, the job's default): the first actor
  fills it, every actor maps it;
- ``objstore``: Ray's object store: the driver puts the version's arrays once, each actor gets
  them zero-copy and builds its own faiss coarse index from the shared codes (faiss owns its
  codes: it cannot search memory it did not allocate or map from a file);
- ``private``: every actor loads its own verified copy (``[job] gallery_cache = "off"``).

Each actor then answers the same queries (the coarse stage reads every code, the rerank only
its candidates' rows), and reports its USS, PSS and anonymous memory against a baseline taken
before it opened the gallery. The node total is the actors' anonymous growth plus the gallery's
pages resident in the page cache (``mincore`` over the cache files; the object store's shared
memory for ``objstore``), counted once. One actor is then killed and restarted by Ray; its load
time is the restart's. Writes ``bench-out/memory.json`` (a row per mechanism and actor count,
with ``actors``, ``node_bytes_per_entry``, ``actor_uss_bytes``). Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench.common import VectorFactory, bench_args, cached_pooled_statistics, machine, photos_help, table

MECHANISMS = ("node", "objstore", "private")


def memory_now() -> dict[str, int]:
    """This process's USS, PSS and anonymous resident bytes (``/proc/self/smaps_rollup``)."""
    import psutil

    info = psutil.Process().memory_full_info()
    anon = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                anon = int(line.split()[1]) * 1024
    return {"uss": int(info.uss), "pss": int(info.pss), "anon": anon}


class GalleryHolder:
    """One actor of the benchmark: opens the version like the Moderator does, answers queries."""

    def __init__(self, gallery: str, version: str, mechanism: str, cache_root: str, queries: str,
                 shared: dict[str, Any] | None = None) -> None:
        from models.card import load_background, read_card
        from pipeline.gallery import ModelRef, open_gallery
        from pipeline.gallery.nodecache import NodeCache

        card = read_card()
        model = ModelRef(card.version_id, load_background(None, card))
        q = np.load(queries)
        _warm_up()  # what every Moderator has loaded anyway (torch, faiss's thread pools): not the gallery's
        self.before = memory_now()
        t = time.perf_counter()
        if mechanism == "objstore":
            self.g = _from_object_store(gallery, version, model, shared or {})
        else:
            cache = NodeCache(cache_root) if mechanism == "node" else None
            self.g = open_gallery(gallery, model, version=version, cache=cache)
        self.load_s = time.perf_counter() - t
        t = time.perf_counter()
        self.g.candidates(q["q128"], lambda rows: q["q512"][rows])
        self.query_s = time.perf_counter() - t
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what stays, not the queries' transient peaks
        self.after = memory_now()

    def report(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "load_s": self.load_s, "query_s": self.query_s,
                **{f"{k}_delta": self.after[k] - self.before[k] for k in self.after}}


def _warm_up() -> None:
    import faiss
    import torch

    torch.from_numpy(np.zeros((8192, 4), np.float16)).float()
    faiss.IndexFlatIP(8).search(np.zeros((64, 8), np.float32), 4)


def _from_object_store(gallery: str, version: str, model: Any, shared: dict[str, Any]) -> Any:
    """A GalleryIndex over arrays handed out by Ray's object store (zero-copy numpy), each shard's
    faiss index built in this process from the shared float16 codes."""
    import faiss
    import ray

    from pipeline.gallery.index import CascadeIndex, Shard
    from pipeline.gallery.query import GalleryIndex
    from pipeline.gallery.store import read_manifest
    from pipeline.ingest.storage import open_store

    m = read_manifest(open_store(gallery), version)
    arrays = ray.get(shared["arrays"])
    shards = []
    for codes, labels in zip(arrays["coarse"], arrays["labels"]):
        index = faiss.IndexScalarQuantizer(m.model.coarse_dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        for i in range(0, len(codes), 65536):
            index.add(np.asarray(codes[i:i + 65536], np.float32))
        shards.append(Shard(index, labels, np.empty((0, 0)), positional=True))
    cascade = CascadeIndex.attached(shards, m.model.coarse_dim, m.model.rerank_dim, arrays["ids"], arrays["rerank"],
                                    arrays["rows"])
    params = m.model.params()
    return GalleryIndex(m, cascade, arrays["entries"], params, model.background.f512 if model.background else None)


def _object_store_arrays(gallery: str, version: str, cache_root: Path) -> Any:
    """Put a version's arrays into the object store once (from a node-cache copy on the driver)."""
    import faiss
    import ray

    from pipeline.gallery.nodecache import NodeCache

    att = NodeCache(cache_root).attach(gallery, version)
    c = att.cascade()
    coarse = [faiss.downcast_index(s.index).reconstruct_n(0, s.ntotal).astype(np.float16) for s in c.shards]
    return ray.put({"coarse": coarse, "labels": [np.asarray(s.ids) for s in c.shards], "ids": np.asarray(c.sorted_ids),
                    "rerank": np.asarray(c.rerank_matrix), "rows": None if c.row_table is None else np.asarray(c.row_table),
                    "entries": att.entries()})


def _object_store_bytes() -> int:
    import ray

    mem = ray._private.internal_api.memory_summary(stats_only=True)  # "Plasma memory usage N MiB"
    for line in mem.splitlines():
        if "Plasma memory usage" in line:
            return int(float(line.split("Plasma memory usage")[1].split("MiB")[0]) * (1 << 20))
    return 0


def measure(gallery: str, version: str, n: int, mechanism: str, actors: int, work: Path, queries: Path) -> dict[str, Any]:
    """One row: ``actors`` holders of ``mechanism`` on this node, then one of them restarted."""
    import ray

    from pipeline.gallery.nodecache import resident_bytes

    cache_root = work / "node-cache"
    shutil.rmtree(cache_root, ignore_errors=True)  # a cold node: the first actor fills
    shared, plasma = None, 0
    if mechanism == "objstore":
        plasma = -_object_store_bytes()
        shared = {"arrays": _object_store_arrays(gallery, version, work / "driver-cache")}
        plasma += _object_store_bytes()
    holder: Any = ray.remote(num_cpus=0.25, max_restarts=1)(GalleryHolder)
    hs: list[Any] = [holder.remote(gallery, version, mechanism, str(cache_root), str(queries), shared) for _ in range(actors)]
    reports: list[dict[str, Any]] = ray.get([h.report.remote() for h in hs])
    resident = sum(resident_bytes(p) for p in cache_root.rglob("*") if p.is_file()) if mechanism == "node" else 0
    ray.kill(hs[0], no_restart=False)  # Ray restarts it: __init__ runs again in a new process
    again: dict[str, Any] = reports[0]
    for _ in range(1200):
        try:
            again = ray.get(hs[0].report.remote())
            if again["pid"] != reports[0]["pid"]:
                break
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.25)
    else:
        raise RuntimeError("the killed actor was not restarted")
    for h in hs:
        ray.kill(h, no_restart=True)
    del hs, shared
    time.sleep(2)  # the object store frees what the killed actors pinned
    first = max(reports, key=lambda r: r["load_s"])
    node = sum(max(0, r["anon_delta"]) for r in reports) + resident + plasma
    return {"mechanism": mechanism, "actors": actors, "gallery_size": n,
            "node_bytes": node, "node_bytes_per_entry": round(node / n, 1),
            "actor_uss_bytes": [r["uss_delta"] for r in reports], "actor_pss_bytes": [r["pss_delta"] for r in reports],
            "actor_anon_bytes": [r["anon_delta"] for r in reports], "sum_pss_bytes": sum(r["pss_delta"] for r in reports),
            "page_cache_bytes": resident, "object_store_bytes": plasma,
            "first_load_s": round(first["load_s"], 3), "restarted_load_s": round(again["load_s"], 3),
            "query_s": round(float(np.mean([r["query_s"] for r in reports])), 3)}


def write_bench_gallery(n: int, work: Path, photos: list[Path] | None, n_queries: int = 200) -> tuple[str, str, Path]:
    """A version of ``n`` realistic entries (4 shards, default coarse codes and rerank dtype) and
    ``n_queries`` queries. -> (gallery folder, version, queries file)."""
    import pandas as pd

    from pipeline.gallery import GalleryContent, VersionModel, write_version
    from pipeline.gallery.banks import Bank
    from pipeline.ingest.storage import open_store

    st = cached_pooled_statistics(photos, work)
    vf = VectorFactory(st, seed=1)
    P, g128, g512 = vf.gallery(n)
    q128, q512, _ = vf.queries(P, n_queries // 2, n_queries - n_queries // 2)
    del P
    qfile = work / "mem_queries.npz"
    np.savez(qfile, q128=q128, q512=q512)
    ids = np.arange(n, dtype=np.int64)
    entries = pd.DataFrame({"id": ids, "bank": "b", "category": "c", "action": "filter",
                            "source_uri": [f"s3://refs/b/{i:08d}.jpg" for i in range(n)],
                            "sha256": [f"{i:064x}" for i in range(n)], "added_at": pd.Timestamp.now(tz="UTC")})
    root = work / f"mem-gallery-{n}"
    shutil.rmtree(root, ignore_errors=True)
    content = GalleryContent(ids, g128, g512, entries, {"b": Bank("b", "-", "c", "filter")})
    version = write_version(open_store(str(root), create=True), content, VersionModel.from_card(st["card"]), n_shards=4)
    return str(root), version, qfile


def bench_memory(n: int, out_dir: Path, actor_counts: tuple[int, ...] = (1, 2, 4),
                 mechanisms: tuple[str, ...] = MECHANISMS, photos: list[Path] | None = None) -> dict[str, Any]:
    import ray

    from jobs.runtime.ray_stages import init_ray

    gallery, version, qfile = write_bench_gallery(n, out_dir, photos)
    disk = sum(f.stat().st_size for f in Path(gallery).rglob("*") if f.is_file())
    init_ray(None)
    rows = []
    try:
        for mech in mechanisms:
            for a in actor_counts:
                rows.append(measure(gallery, version, n, mech, a, out_dir, qfile))
                r = rows[-1]
                print(f"{mech:8s} actors={a}: node {r['node_bytes_per_entry']:.0f} B/entry, first load "
                      f"{r['first_load_s']} s, restarted {r['restarted_load_s']} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(out_dir / "node-cache", ignore_errors=True)
        shutil.rmtree(out_dir / "driver-cache", ignore_errors=True)
    base = {m: next((r["node_bytes_per_entry"] for r in rows if r["mechanism"] == m and r["actors"] == 1), None)
            for m in mechanisms}
    shown = [{"mechanism": r["mechanism"], "actors": r["actors"], "node B/entry": f"{r['node_bytes_per_entry']:.0f}",
              "vs 1 actor": f"{r['node_bytes_per_entry'] / base[r['mechanism']]:.2f}x" if base[r["mechanism"]] else "",
              "actor USS B/entry": "/".join(f"{u / n:.0f}" for u in r["actor_uss_bytes"]),
              "page cache GiB": f"{r['page_cache_bytes'] / 2**30:.2f}", "object store GiB": f"{r['object_store_bytes'] / 2**30:.2f}",
              "first load s": r["first_load_s"], "restarted load s": r["restarted_load_s"],
              "restart / first": f"{r['restarted_load_s'] / max(r['first_load_s'], 1e-9):.3f}"} for r in rows]
    res = {"machine": machine(), "gallery_size": n, "disk_bytes_per_entry": round(disk / n, 1), "version": version,
           "rows": rows}
    print(f"\nmemory benchmark on {res['machine']}; gallery {n:,} entries (4 shards, float16 coarse codes and "
          f"rerank vectors, {disk / n:.0f} B/entry on disk)\n")
    print(table(shown, list(shown[0])))
    (out_dir / "memory.json").write_text(json.dumps(res, indent=2))
    shutil.rmtree(gallery, ignore_errors=True)
    return res


def cli_bench_memory(a: argparse.Namespace) -> int:
    out, photos = bench_args(a)
    counts = tuple(int(x) for x in str(a.actors).split(","))
    mechs = tuple(a.mechanism) if a.mechanism else MECHANISMS
    bench_memory(a.gallery_size, out, counts, mechs, photos=photos)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``memory`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("memory")
    q.add_argument("--gallery-size", type=int, default=1_000_000)
    q.add_argument("--actors", default="1,2,4", help="actor counts on this node, comma-separated (default 1,2,4)")
    q.add_argument("--mechanism", action="append", choices=MECHANISMS,
                   help="how actors share the gallery (repeat; default: all three)")
    q.add_argument("--photos", action="append", metavar="DIR", help=photos_help("the vectors' statistics come from them"))
    q.add_argument("--workdir", default=None, help="output folder (default bench-out); caches the photos' pooled statistics")
    q.set_defaults(fn=cli_bench_memory)
