"""``modscan bench resume``: what a rerun after a killed driver costs, against a full run.

On the same day of generated uploads and the same gallery, three runs of ``modscan moderate``,
each its own process with its own local Ray, as a scheduler would start them:

1. an uninterrupted run;
2. a run whose driver (with its local Ray) is SIGKILLed once about 80 % of its chunks are recorded;
3. the rerun of that killed run, which resumes from its recorded chunks.

It reports images decoded and wall time for each (the process's, the driver's own from its
``_run.json``, and the moderating time from the first to the last model batch) and the resumed
rerun as a share of the full run, checks that the two published partitions are identical row for
row (``image_key``, ``status``, ``action``, ``reference_id`` and the scores) and writes
``WORKDIR/resume.json``. A run's start-up (Ray, the actors' model and gallery) costs the same in a
rerun; at this size it is most of a run's wall time, at a night's scale a rounding error.
Benchmarks never assert: they print what they measured.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jobs.bench.common import machine, table

DAY = "2026-06-15"
REFS = ("astronaut", "rocket", "coffee", "chelsea")
COMPARED = ["image_key", "status", "action", "reference_id", "coarse_score", "fine_score", "fine_score_raw"]


def _jpeg(im: Any, q: int = 85) -> bytes:
    b = io.BytesIO()
    im.convert("RGB").save(b, format="JPEG", quality=q)
    return b.getvalue()


def _world(root: Path, uploads: int) -> tuple[Path, Path]:
    """A gallery of :data:`REFS` and a day of ``uploads`` uploads: generated everyday pictures and,
    one in twenty, an edited copy of a reference. -> (gallery, uploads folder)."""
    from models.augment import apply_named
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.evaluation.samples import procedural, skimage_photo
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    rng = random.Random(0)
    refs, up = root / "refs", root / "uploads"
    refs.mkdir(parents=True)
    up.mkdir(parents=True)
    for n in REFS:
        (refs / f"{n}.jpg").write_bytes(_jpeg(skimage_photo(n), 95))
    for i in range(uploads):
        if i % 20 == 0:
            name = REFS[(i // 20) % len(REFS)]
            im = apply_named(skimage_photo(name), [["color"], ["rescale_jpeg"], ["crop"], ["flip"]][(i // 20) % 4], rng)
            (up / f"up-{i:05d}-copy-{name}.jpg").write_bytes(_jpeg(im))
        else:
            (up / f"up-{i:05d}.jpg").write_bytes(_jpeg(procedural(rng, (320, 240))))
    G.build(open_store(str(root / "gallery"), create=True), [Bank("banned", str(refs), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    return root / "gallery", up


def _command(gallery: Path, up: Path, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "moderate", "--input", str(up), "--gallery", str(gallery),
            "--output", str(out), "--date", DAY, "--config", str(config)]


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # each run starts its own local Ray, as a fresh scheduled job would
    return env


def _full_run(cmd: list[str]) -> float:
    """One run to its end. -> wall seconds (process start to exit)."""
    t = time.perf_counter()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench run failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - t


def _killed_run(cmd: list[str], out: Path, kill_at: int) -> tuple[float, int]:
    """A run SIGKILLed (its process group: the driver and its local Ray) once ``kill_at`` chunks
    are recorded. -> (wall seconds until the kill, chunks recorded by then)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    while p.poll() is None:
        done = len(list(out.glob("_staging/*/chunks/*.json")))
        if done >= kill_at:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    return time.perf_counter() - t, len(list(out.glob("_staging/*/chunks/*.json")))


def _decoded_by_killed_run(out: Path) -> int:
    """Uploads the killed run's decode tasks read (their records, left in its attempt's staging)."""
    n = 0
    for rec in out.glob("_staging/*/*/timings/decode-*.json"):
        try:
            n += json.loads(rec.read_text())["rows"]
        except (ValueError, KeyError):  # a record the kill cut short
            continue
    return n


def _same_rows(a: Path, b: Path) -> bool:
    import pandas as pd

    frames = [pd.read_parquet(p / f"dt={DAY}").sort_values("image_key").reset_index(drop=True)[COMPARED] for p in (a, b)]
    return len(frames[0]) == len(frames[1]) and frames[0].equals(frames[1])


def bench_resume(workdir: Path, uploads: int = 400, chunks: int = 10, kill_share: float = 0.8) -> dict[str, Any]:
    """The three runs (module doc) on ``uploads`` uploads in ``chunks`` chunks; -> the results."""
    if workdir.exists():
        shutil.rmtree(workdir)
    gallery, up = _world(workdir, uploads)
    n = len(list(up.iterdir()))
    chunk_size = math.ceil(n / chunks)
    config = workdir / "job.toml"
    config.write_text(f"[job]\nchunk_size = {chunk_size}\nbatch_size = 8\n")
    full, resumed = workdir / "flags-full", workdir / "flags-resumed"
    t_full = _full_run(_command(gallery, up, full, config))
    t_killed, done = _killed_run(_command(gallery, up, resumed, config), resumed, math.ceil(kill_share * chunks))
    decoded_killed = _decoded_by_killed_run(resumed)
    t_rerun = _full_run(_command(gallery, up, resumed, config))
    info_full = json.loads((full / f"dt={DAY}" / "_run.json").read_text())
    info_rerun = json.loads((resumed / f"dt={DAY}" / "_run.json").read_text())
    r_full, r_rerun = info_full["resume"], info_rerun["resume"]
    work = {k: i["stage_seconds_summed_over_workers"].get("moderator_window", 0.0)
            for k, i in (("full", info_full), ("rerun", info_rerun))}
    rows = [
        {"run": "uninterrupted", "chunks_run": r_full["chunks_run"], "images_decoded": r_full["images_decoded"],
         "wall_s": round(t_full, 1), "driver_s": info_full["wall_seconds"], "moderating_s": work["full"]},
        {"run": f"killed at {done}/{chunks} chunks", "chunks_run": done, "images_decoded": decoded_killed,
         "wall_s": round(t_killed, 1), "driver_s": "", "moderating_s": ""},
        {"run": "resumed rerun", "chunks_run": r_rerun["chunks_run"], "images_decoded": r_rerun["images_decoded"],
         "wall_s": round(t_rerun, 1), "driver_s": info_rerun["wall_seconds"], "moderating_s": work["rerun"]},
    ]
    res = {"machine": machine(), "uploads": n, "chunk_size": chunk_size, "chunks": r_full["chunks_total"],
           "chunks_done_at_kill": r_rerun["chunks_done_before"], "rows": rows,
           "rerun_share_of_full": {
               "images_decoded": round(r_rerun["images_decoded"] / max(1, r_full["images_decoded"]), 3),
               "wall_time": round(t_rerun / t_full, 3),
               "driver_time": round(info_rerun["wall_seconds"] / info_full["wall_seconds"], 3),
               "moderating_time": round(work["rerun"] / work["full"], 3) if work["full"] else None},
           "identical_partitions": _same_rows(full, resumed)}
    (workdir / "resume.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def cli_bench_resume(a: argparse.Namespace) -> int:
    workdir = Path(a.workdir)
    res = bench_resume(workdir, a.uploads, a.chunks, a.kill_at)
    share = res["rerun_share_of_full"]
    print(f"machine: {res['machine']}; {res['uploads']} uploads in {res['chunks']} chunks of {res['chunk_size']}")
    print(table(res["rows"], ["run", "chunks_run", "images_decoded", "wall_s", "driver_s", "moderating_s"]))
    print(f"resumed rerun / uninterrupted run: {share['images_decoded']:.0%} of the images decoded, "
          f"{share['moderating_time']:.0%} of the moderating time, {share['wall_time']:.0%} of the wall time "
          f"({share['driver_time']:.0%} of the driver's own: start-up costs the same in both); "
          f"partitions identical row for row: {res['identical_partitions']}")
    print(f"written: {workdir.parent / workdir.name / 'resume.json'}")
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``resume`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("resume", help="a rerun after a driver killed at ~80 %% of its chunks, against a full run")
    q.add_argument("--uploads", type=int, default=400, help="generated uploads of the day (one in twenty a copy)")
    q.add_argument("--chunks", type=int, default=10, help="chunks the day is cut into ([job] chunk_size follows)")
    q.add_argument("--kill-at", type=float, default=0.8, help="share of the chunks recorded when the driver is killed")
    q.add_argument("--workdir", default="bench-out/resume", help="replaced; resume.json is written here")
    q.set_defaults(fn=cli_bench_resume)
