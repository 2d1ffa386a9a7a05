"""``modscan bench retro``: a retro pass against a full backfill, on the same days and the same
gallery change (a handful of references added), in one run: wall time, images decoded and the
ratios. Writes ``WORKDIR/retro.json``. Benchmarks never assert: they print what they measured
(and whether both ways flag the same uploads).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import random
import time
from pathlib import Path
from typing import Any

from jobs.bench.common import machine, table

BASE_REFS = ("coffee", "chelsea")
ADDED_REFS = ("astronaut", "rocket", "camera")


def _jpeg(im: Any, q: int = 85) -> bytes:
    b = io.BytesIO()
    im.convert("RGB").save(b, format="JPEG", quality=q)
    return b.getvalue()


def _world(root: Path, days: list[str], uploads: int) -> dict[str, Path]:
    """Reference folders (base, added) and one upload folder per day: copies of every reference
    (re-encoded, resized) among ``uploads`` generated unrelated pictures."""
    import numpy as np
    from PIL import Image

    from pipeline.evaluation.samples import procedural, skimage_photo

    rng = random.Random(0)
    paths = {"base": root / "refs-base", "added": root / "refs-added"}
    for kind, names in (("base", BASE_REFS), ("added", ADDED_REFS)):
        paths[kind].mkdir(parents=True, exist_ok=True)
        for n in names:
            (paths[kind] / f"{n}.jpg").write_bytes(_jpeg(Image.fromarray(np.asarray(skimage_photo(n))), 95))
    for dt in days:
        d = root / "uploads" / dt
        d.mkdir(parents=True, exist_ok=True)
        for i in range(uploads):
            (d / f"other-{i:05d}.jpg").write_bytes(_jpeg(procedural(rng, (320, 240))))
        for n in BASE_REFS + ADDED_REFS:
            im = Image.fromarray(np.asarray(skimage_photo(n)))
            (d / f"copy-{n}.jpg").write_bytes(_jpeg(im.resize((im.width * 3 // 4, im.height * 3 // 4)), 80))
    return paths


def _flagged(root: str, days: list[str]) -> set[tuple[str, str]]:
    from pipeline.moderation.flags import read_flags

    df = read_flags(root)
    df = df[df["dt"].isin(days) & df["action"].isin(["filter", "downrank", "review"])]
    return set(zip(df["dt"], df["image_key"]))


def bench_retro(workdir: Path, days: int = 2, uploads: int = 200) -> dict[str, Any]:
    """Moderate ``days`` days against a gallery, add a handful of references, then re-check the
    days both ways: ``modscan retro`` and a full re-moderation (what ``backfill --force`` does)."""
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.retro import retro
    from jobs.runtime.run import moderate
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.gallery.update import list_source
    from pipeline.ingest.storage import open_store

    dts = [(_dt.date(2026, 6, 1) + _dt.timedelta(days=i)).isoformat() for i in range(days)]
    paths = _world(workdir, dts, uploads)
    gal = open_store(str(workdir / "gallery"), create=True)
    card, extract = read_card(None), local_extractor(None)
    G.build(gal, [Bank("banned", str(paths["base"]), "sensitive/x", "filter")], card, extract, n_shards=2)
    since = G.current_version(gal)
    assert since is not None  # just built
    cfg = JobConfig(batch_size=32)
    flags, full = str(workdir / "flags"), str(workdir / "flags-backfill")
    for dt in dts:
        moderate(str(workdir / "uploads" / dt), gal.uri, flags, dt, cfg=cfg, review=False)
    G.add(gal, "banned", list_source(str(paths["added"])), card, extract, note="bench retro")
    t = time.perf_counter()
    rep = retro(gal.uri, since, dts[0], dts[-1], flags, cfg=cfg)
    t_retro = time.perf_counter() - t
    t = time.perf_counter()
    infos = [moderate(str(workdir / "uploads" / dt), gal.uri, full, dt, cfg=cfg, review=False) for dt in dts]
    t_full = time.perf_counter() - t
    decoded_full = sum(i["decoded"] for i in infos)
    rows = [{"way": "retro pass", "seconds": round(t_retro, 1), "images_decoded": rep["decoded"],
             "decisions_changed": rep["totals"]["changed"]},
            {"way": "full backfill", "seconds": round(t_full, 1), "images_decoded": decoded_full,
             "decisions_changed": ""}]
    res = {"machine": machine(), "days": days, "uploads_per_day": uploads + len(BASE_REFS) + len(ADDED_REFS),
           "references_added": len(rep["references_added"]), "rows": rows,
           "time_ratio_backfill_over_retro": round(t_full / t_retro, 2) if t_retro else None,
           "decode_ratio_backfill_over_retro": round(decoded_full / max(1, rep["decoded"]), 1),
           "same_flags": _flagged(flags, dts) == _flagged(full, dts)}
    (workdir / "retro.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def cli_bench_retro(a: argparse.Namespace) -> int:
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = bench_retro(workdir, a.days, a.uploads)
    print(f"machine: {res['machine']}; {res['days']} days x {res['uploads_per_day']} uploads, "
          f"{res['references_added']} references added")
    print(table(res["rows"], ["way", "seconds", "images_decoded", "decisions_changed"]))
    print(f"backfill / retro: {res['time_ratio_backfill_over_retro']}x wall time, "
          f"{res['decode_ratio_backfill_over_retro']}x images decoded; same flags: {res['same_flags']}")
    print(f"written: {workdir / 'retro.json'}")
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``retro`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("retro", help="a retro pass against a full backfill after a gallery change")
    q.add_argument("--days", type=int, default=2)
    q.add_argument("--uploads", type=int, default=200, help="generated unrelated uploads per day (plus the copies)")
    q.add_argument("--workdir", default="bench-out/retro")
    q.set_defaults(fn=cli_bench_retro)
