"""``modscan bench memory``: a gallery's bytes per entry on disk and in RAM (peak RSS of a fresh
process that opens it and answers queries), by rerank dtype, with recall@1 and top-1 agreement
with float32, on realistic vectors from the shipped model (:mod:`jobs.bench_common`). Writes
``bench-out/memory.json``. Benchmarks never assert: they print what they measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench_common import VectorFactory, bench_args, cached_pooled_statistics, machine, photos_help, table

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

    st = cached_pooled_statistics(photos, out_dir)
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
    print(table(rows, list(rows[0])))
    (out_dir / "memory.json").write_text(json.dumps(res, indent=2))
    return res


def cli_bench_memory(a: argparse.Namespace) -> int:
    out, photos = bench_args(a)
    bench_memory(a.gallery_size, out, photos=photos)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``memory`` under ``modscan bench`` (``jobs/cli.py``'s bench sub-parsers)."""
    q = bench_subparsers.add_parser("memory")
    q.add_argument("--gallery-size", type=int, default=1_000_000)
    q.add_argument("--photos", action="append", metavar="DIR", help=photos_help("the vectors' statistics come from them"))
    q.add_argument("--workdir", default=None, help="output folder (default bench-out); caches the photos' pooled statistics")
    q.set_defaults(fn=cli_bench_memory)
