"""``modscan bench job``: a day of uploads moderated for real against a gallery of millions, on
this node, with the node's peak memory.

The gallery version is written shard by shard (memory stays at one shard's vectors, whatever
``--gallery-size``): ``--gallery-size - R`` entries from realistic vectors
(:class:`jobs.bench.common.VectorFactory`, resampled from real photos' pooled features) plus the
``R`` real reference pictures of ``--references`` described by the shipped model. The uploads
are edited copies of those references (``--copies`` of them, JPEG re-encoded, cropped, resized)
and unrelated real photos (``--unrelated``: the photos held out of the vectors' resampling,
never in the gallery, then the pictures of ``--references`` beyond the copies'). Then ``modscan
moderate`` runs in its own process with ``--actors`` actors and the node cache, while this process
samples the node's used memory (``MemTotal - MemAvailable``) every 0.5 s and, every 5 s, the
node-cache pages resident in the page cache (``mincore`` over the filled version's files: mapped
file pages count as "available" in ``/proc/meminfo``, so they are added; a fill's own write-back
cache is not). Reported: the peaks over the run and over the idle
baseline, the flags' rows (one per upload), the copies flagged (and to the right reference) and
the unrelated uploads flagged.
Writes ``bench-out/job.json``. Benchmarks never assert.

The synthetic entries carry no keypoints, so the version has no verification stage: its fine
threshold is the sure threshold sized for its size (:func:`pipeline.gallery.calibration.sized`).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench.common import VectorFactory, bench_args, cached_pooled_statistics, machine, photo_paths, table


def node_used_bytes() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def cache_resident_bytes(root: Path) -> int:
    """Bytes of the node cache's filled files under ``root`` resident in the page cache (files that
    vanish meanwhile: 0). A fill's partial folder is not counted: what it writes is write-back
    cache that the kernel reclaims (and the fill drops when done), not pages the job reads."""
    from pipeline.gallery.nodecache import resident_bytes

    total = 0
    for f in root.rglob("*") if root.exists() else []:
        if ".partial-" in str(f):
            continue
        try:
            total += resident_bytes(f) if f.is_file() else 0
        except (OSError, ValueError):
            pass
    return total


def _shard_files(vstore: Any, s: int, ids: np.ndarray, c128: np.ndarray, r512: np.ndarray, spec: Any) -> Any:
    from pipeline.gallery.index import CascadeIndex
    from pipeline.gallery.manifest import ShardFiles
    from pipeline.gallery.store import sha256_hex

    sh = CascadeIndex.build(ids, c128, r512, 1, "float16", coarse_spec=spec).shards[0]
    ib, rb = sh.index_bytes(), sh.rerank_bytes()
    iname, rname = f"shard-{s:03d}.faiss", f"shard-{s:03d}.rerank.safetensors"
    vstore.write_bytes(iname, ib)
    vstore.write_bytes(rname, rb)
    return ShardFiles(iname, sha256_hex(ib), rname, sha256_hex(rb), sh.ntotal)


def _entries_file(vstore: Any, n: int, real_uris: list[str]) -> Any:
    """The entries (one bank) as Parquet, written in row groups without a DataFrame of n rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.gallery.manifest import EntriesFile
    from pipeline.gallery.store import sha256_hex
    from pipeline.schemas import ENTRY_SCHEMA

    buf = io.BytesIO()
    now = pa.scalar(int(time.time() * 1e6), pa.timestamp("us", tz="UTC"))
    n_syn = n - len(real_uris)
    with pq.ParquetWriter(buf, ENTRY_SCHEMA) as w:
        for a in range(0, n, 1_000_000):
            b = min(n, a + 1_000_000)
            ids = np.arange(a, b, dtype=np.int64)
            uris = [real_uris[i - n_syn] if i >= n_syn else f"s3://refs/synthetic/{i:08d}.jpg" for i in range(a, b)]
            cols = {"id": pa.array(ids), "bank": pa.array(["known"] * (b - a)), "category": pa.array(["bench"] * (b - a)),
                    "action": pa.array(["filter"] * (b - a)), "source_uri": pa.array(uris),
                    "sha256": pa.array([f"{i:064x}" for i in range(a, b)]),
                    "added_at": pa.array([now.value] * (b - a), pa.timestamp("us", tz="UTC"))}
            for f in ENTRY_SCHEMA:
                if f.name not in cols:
                    cols[f.name] = pa.nulls(b - a, f.type)
            w.write_table(pa.table(cols, schema=ENTRY_SCHEMA))
    data = buf.getvalue()
    vstore.write_bytes("entries.parquet", data)
    return EntriesFile("entries.parquet", sha256_hex(data), n)


def write_big_version(root: Path, n: int, vf: VectorFactory, card: Any, real: dict[str, np.ndarray],
                      real_uris: list[str], n_shards: int) -> str:
    """A published version of ``n`` entries, written one shard at a time: ids ``0..n-R-1`` are
    synthetic, the last ``R`` the real references (``real``: their ``coarse`` and ``rerank``)."""
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.calibration import sized
    from pipeline.gallery.index import CoarseIndexSpec
    from pipeline.gallery.manifest import BankRecord, Counts, Manifest, VersionModel
    from pipeline.gallery.store import now_utc, publish_version
    from pipeline.ingest.storage import open_store

    store = open_store(str(root), create=True)
    vstore = store.child("versions/v000001")
    spec = CoarseIndexSpec()
    n_syn = n - len(real_uris)
    shards = []
    for s in range(n_shards):
        ids = np.arange(s, n, n_shards, dtype=np.int64)
        syn = ids[ids < n_syn]
        parts128, parts512 = [], []
        for a in range(0, len(syn), 200_000):
            m = min(200_000, len(syn) - a)
            P = vf.pooled(m)
            parts128.append(vf.heads(P, "a1"))
            parts512.append(vf.heads(P, "red").astype(np.float16))
        rows = ids[ids >= n_syn] - n_syn
        parts128.append(real["coarse"][rows])
        parts512.append(real["rerank"][rows].astype(np.float16))
        shards.append(_shard_files(vstore, s, ids, np.concatenate(parts128), np.concatenate(parts512), spec))
        print(f"  shard {s + 1}/{n_shards}: {len(ids):,} entries", flush=True)
    bank = Bank("known", "-", "bench", "filter")
    model = sized(VersionModel.from_card(card), n, verifies=False)
    manifest = Manifest(version="v000001", parent=None, created_at=now_utc().isoformat(), model=model,
                 rerank_dtype="float16", coarse_index=spec, shards=tuple(shards),
                 entries=_entries_file(vstore, n, real_uris), banks={"known": BankRecord(bank, n)}, counts=Counts(n, n))
    vstore.write_text("manifest.json", manifest.to_json())
    publish_version(store, "v000001")
    return "v000001"


def make_uploads(refs: list[Path], unrelated: list[Path], out: Path, seed: int = 0) -> dict[str, str]:
    """Edited copies of ``refs`` and the ``unrelated`` photos as a day's uploads -> key -> kind."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for i, p in enumerate(refs):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        c = rng.uniform(0.0, 0.08, 4)
        im = im.crop((int(c[0] * w), int(c[1] * h), int(w * (1 - c[2])), int(h * (1 - c[3]))))
        im = im.resize((max(64, int(im.width * 0.8)), max(64, int(im.height * 0.8))))
        key = f"copy-{i:04d}.jpg"
        im.save(out / key, quality=int(rng.integers(60, 90)))
        kinds[key] = "copy"
    for i, p in enumerate(unrelated):
        key = f"upload-{i:04d}{p.suffix.lower()}"
        shutil.copyfile(p, out / key)
        kinds[key] = "unrelated"
    return kinds


def _results(n: int, n_shards: int, actors: int, disk: int, write_s: float, run_s: float, r: Any, idle: int,
             peaks: list[int], kinds: dict[str, str], flags: Path, root: Path, n_refs: int) -> dict[str, Any]:
    import pandas as pd

    res: dict[str, Any] = {"machine": machine(), "gallery_size": n, "shards": n_shards, "actors": actors,
                           "disk_bytes": disk, "write_s": round(write_s, 1), "run_s": round(run_s, 1),
                           "exit_code": r.returncode, "node_idle_bytes": idle, "node_used_peak_bytes": peaks[0],
                           "gallery_resident_peak_bytes": peaks[1], "node_peak_bytes": peaks[2],
                           "node_peak_over_idle_bytes": peaks[2] - idle, "uploads": len(kinds)}
    if r.returncode == 0:
        df = pd.read_parquet(flags / "dt=2026-12-04")
        df["kind"] = df["image_key"].map(kinds)
        res.update(rows=len(df), one_row_per_upload=bool(len(df) == len(kinds) and df["image_key"].is_unique),
                   copies_flagged=int(((df["kind"] == "copy") & (df["status"] == "matched")).sum()),
                   # copy-i is an edit of the i-th real reference, stored as id n - R + i
                   copies_flagged_right=int(sum(k.startswith("copy-") and st == "matched" and rid == n - n_refs + int(k[5:9])
                                                for k, st, rid in zip(df["image_key"], df["status"], df["reference_id"]))),
                   copies=int((df["kind"] == "copy").sum()),
                   unrelated_flagged=int(((df["kind"] == "unrelated") & (df["status"] == "matched")).sum()),
                   unrelated=int((df["kind"] == "unrelated").sum()), errors=int((df["status"] == "error").sum()),
                   fine_threshold=json.loads((root / "versions/v000001/manifest.json").read_text())["thresholds"]["fine"])
    else:
        res["stderr_tail"] = r.stderr[-3000:]
    res["shown"] = [{"gallery": f"{n:,}", "disk GiB": f"{disk / 2**30:.1f}", "actors": actors, "uploads": len(kinds),
              "rows": res.get("rows"), "used peak GiB": f"{peaks[0] / 2**30:.1f}",
              "gallery resident GiB": f"{peaks[1] / 2**30:.1f}", "node peak GiB": f"{peaks[2] / 2**30:.1f}",
              "peak over idle GiB": f"{(peaks[2] - idle) / 2**30:.1f}", "run s": res["run_s"],
              "copies flagged (right ref)": f"{res.get('copies_flagged')} ({res.get('copies_flagged_right')})/{res.get('copies')}",
              "unrelated flagged": f"{res.get('unrelated_flagged')}/{res.get('unrelated')}"}]
    return res


def _written(root: Path, n: int, reuse: bool, write: Any) -> float:
    """Seconds ``write()`` took to write the version, or 0 when ``reuse`` keeps the one there."""
    manifest = root / "versions/v000001/manifest.json"
    if reuse and manifest.exists() and json.loads(manifest.read_text())["counts"]["images"] == n:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    t = time.time()
    write()
    return time.time() - t


def bench_job(n: int, out_dir: Path, photos: list[Path], references: Path, copies: int, unrelated: int,
              actors: int, n_shards: int, reuse: bool = False) -> dict[str, Any]:

    from pipeline.gallery.extract import local_extractor

    st = cached_pooled_statistics(photos, out_dir)
    vf = VectorFactory(st, seed=3)
    refs = sorted(photo_paths([references], 100_000))[:copies]
    # unrelated uploads: the photos whose features the gallery never resamples (the factory's
    # held-out queries), then the pictures of --references beyond the copies' references
    pool = photo_paths(photos, 2000)
    held = [pool[i] for i in sorted(vf.query_rows) if i < len(pool)] if len(pool) == len(st["P"]) else []
    others = (held + sorted(photo_paths([references], 100_000))[copies:])[:unrelated]
    rows = local_extractor()([str(p) for p in refs])
    real = {"coarse": np.stack([r["coarse"] for r in rows]).astype(np.float32),
            "rerank": np.stack([r["rerank"] for r in rows]).astype(np.float32)}
    root = out_dir / f"job-gallery-{n}"
    write_s = _written(root, n, reuse, lambda: write_big_version(root, n, vf, st["card"], real, [str(p) for p in refs], n_shards))
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    up, flags = out_dir / "job-uploads", out_dir / "job-flags"
    shutil.rmtree(up, ignore_errors=True)
    shutil.rmtree(flags, ignore_errors=True)
    kinds = make_uploads(refs, others, up)
    cfg = out_dir / "job.toml"
    cfg.write_text(f"[job]\nactors = {actors}\nactor_num_cpus = 0.5\ndecode_num_cpus = 0.25\nbatch_size = 32\n"
                   f"gallery_cache_dir = \"{out_dir / 'job-node-cache'}\"\n")
    shutil.rmtree(out_dir / "job-node-cache", ignore_errors=True)
    idle = node_used_bytes()
    peak = [idle, 0, idle]  # used (MemTotal - MemAvailable), node-cache pages resident, used + resident
    stop = threading.Event()

    def sample() -> None:
        i, resident = 0, 0
        while not stop.is_set():
            if i % 10 == 0:  # mapped gallery pages count as "available" (reclaimable): add them (mincore)
                resident = cache_resident_bytes(out_dir / "job-node-cache")
            used = node_used_bytes()
            peak[0], peak[1], peak[2] = max(peak[0], used), max(peak[1], resident), max(peak[2], used + resident)
            time.sleep(0.5)
            i += 1

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "moderate", "--input", str(up), "--gallery", str(root),
                        "--output", str(flags), "--date", "2026-12-04", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    run_s = time.time() - t
    stop.set()
    th.join()
    res = _results(n, n_shards, actors, disk, write_s, run_s, r, idle, peak, kinds, flags, root, len(refs))
    print(f"\njob benchmark on {res['machine']}\n")
    shown = res.pop("shown")
    print(table(shown, list(shown[0])))
    (out_dir / "job.json").write_text(json.dumps(res, indent=2))
    return res


def cli_bench_job(a: argparse.Namespace) -> int:
    out, photos = bench_args(a)
    bench_job(a.gallery_size, out, photos or [], Path(a.references), a.copies, a.unrelated, a.actors, a.shards,
              a.reuse_gallery)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``job`` under ``modscan bench``."""
    q = bench_subparsers.add_parser("job")
    q.add_argument("--gallery-size", type=int, default=10_000_000)
    q.add_argument("--shards", type=int, default=16)
    q.add_argument("--actors", type=int, default=2)
    q.add_argument("--references", required=True, metavar="DIR", help="real reference pictures (their copies are uploads)")
    q.add_argument("--copies", type=int, default=100, help="references put in the gallery, one edited copy of each uploaded")
    q.add_argument("--unrelated", type=int, default=300, help="unrelated real photos uploaded (from --photos)")
    q.add_argument("--photos", action="append", metavar="DIR", required=True,
                   help="real photos: the vectors' statistics and the unrelated uploads")
    q.add_argument("--workdir", default=None, help="output folder (default bench-out)")
    q.add_argument("--reuse-gallery", action="store_true",
                   help="keep the version a previous run wrote in the work folder (same --gallery-size, references "
                        "and photos); the node cache is filled again either way")
    q.set_defaults(fn=cli_bench_job)
