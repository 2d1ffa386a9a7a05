"""``modscan bench waves``: planted waves in a day of real and generated pictures, found by the real pass.

A day is written as files: edited copies of a few pictures (the waves; 1-3 edits each from the
evaluation's suite, :func:`models.augment.random_edit_names`) among unrelated real photos (the
``--photos`` folders) and generated everyday pictures (:mod:`models.synthetic`). The day is
moderated by ``modscan moderate``'s own run on a local Ray cluster (which stores the signatures),
then clustered by ``modscan waves``' own pass. Reported: wave recall (members in their wave's
cluster: the cluster holding most of them), false merges (unrelated uploads in a wave's cluster,
distinct waves in one cluster, clusters of unrelated uploads only that reach the wave size) and the
pass's time, per stage and per 1M uploads. ``bench-out/waves.json`` keeps it all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from jobs.bench.common import machine, photo_paths, table

DAY = "2026-06-01"
DEFAULT_SIZES = (5, 10, 25, 60, 150, 500)
T0 = 1_780_000_000  # upload times of the day (POSIX seconds)


def _save(im: Any, path: Path, t: float) -> None:
    im.convert("RGB").save(path, format="JPEG", quality=88)
    os.utime(path, (t, t))


def plant_day(photos: list[Path], generated: int, sizes: tuple[int, ...], up: Path, seed: int) -> dict[str, Any]:
    """Write the day's uploads under ``up``. -> {"waves": {name: [keys]}, "unrelated": [keys]}."""
    from PIL import Image

    from models.augment import apply_named, random_edit_names
    from models.synthetic import generate

    rng = random.Random(seed)
    pool = list(photos)
    rng.shuffle(pool)
    sources, unrelated_photos = pool[:len(sizes)], pool[len(sizes):]
    up.mkdir(parents=True, exist_ok=True)
    waves: dict[str, list[str]] = {}
    for w, (src, size) in enumerate(zip(sources, sizes)):
        im = Image.open(src).convert("RGB")
        for i in range(size):
            key = f"wave{w}-{i:04d}.jpg"
            _save(apply_named(im, random_edit_names(rng), rng), up / key, T0 + rng.uniform(0, 86_000))
            waves.setdefault(f"wave{w} ({src.parent.name}/{src.name})", []).append(key)
    unrelated = []
    for i, p in enumerate(unrelated_photos):
        key = f"photo-{i:05d}{p.suffix.lower() if p.suffix.lower() in ('.jpg', '.jpeg', '.png') else '.jpg'}"
        shutil.copyfile(p, up / key) if key.endswith(p.suffix.lower()) else _save(Image.open(p), up / key, T0)
        unrelated.append(key)
    for i in range(generated):
        key = f"generated-{i:05d}.jpg"
        _save(generate("bench-waves", i)[1], up / key, T0)
        unrelated.append(key)
    return {"waves": waves, "unrelated": unrelated}


def score(df: Any, planted: dict[str, Any], wave_min_size: int) -> dict[str, Any]:
    """Recall and false merges of the committed clusters ``df`` (one row per upload) against the plant."""
    cid = df.set_index("image_key")["dup_cluster_id"].reindex(sorted(set(df["image_key"]) | {
        k for keys in planted["waves"].values() for k in keys}))
    unrelated = set(planted["unrelated"])
    rows: list[dict[str, Any]] = []
    owner: dict[str, list[str]] = {}
    for name, keys in planted["waves"].items():
        main = cid.loc[keys].value_counts()
        top = str(main.index[0])
        members = set(df.loc[df["dup_cluster_id"] == top, "image_key"])
        owner.setdefault(top, []).append(name)
        rows.append({"wave": name, "planted": len(keys), "found": len(members & set(keys)),
                     "recall": round(len(members & set(keys)) / len(keys), 3), "cluster_size": len(members),
                     "unrelated_in_it": len(members & unrelated),
                     "clusters_it_split_into": int(len(main))})
    wave_clusters = set(owner)
    other = df[~df["dup_cluster_id"].isin(wave_clusters)]
    only_unrelated = other[other["dup_cluster_size"] >= 2].drop_duplicates("dup_cluster_id")
    planted_n = sum(r["planted"] for r in rows)
    return {"rows": rows, "members_planted": planted_n, "members_found": sum(r["found"] for r in rows),
            "wave_recall": round(sum(r["found"] for r in rows) / planted_n, 4),
            "unrelated_in_waves": sum(r["unrelated_in_it"] for r in rows),
            "distinct_waves_merged": sum(len(v) - 1 for v in owner.values()),
            "unrelated_clusters_of_2_or_more": int(len(only_unrelated)),
            "unrelated_uploads_in_them": int(only_unrelated["dup_cluster_size"].sum()),
            "false_waves": int((only_unrelated["dup_cluster_size"] >= wave_min_size).sum())}


def _moderate(root: Path, cfg: Any) -> dict[str, Any]:
    """A gallery of one generated reference (nothing of the day matches it), then the day moderated."""
    from jobs.runtime.run import moderate
    from models.card import read_card
    from models.synthetic import generate
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    refs = root / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    generate("bench-waves-ref", 0)[1].convert("RGB").save(refs / "ref.jpg", format="JPEG")
    G.build(open_store(str(root / "gallery"), create=True), [Bank("spam", str(refs), "low_quality/spam", "downrank")],
            read_card(None), local_extractor(None), n_shards=1)
    return moderate(str(root / "uploads"), str(root / "gallery"), str(root / "flags"), DAY, cfg=cfg, review=False)


SWEEP_INLIERS = (12, 16, 20, 25, 30, 40)


def sweep(plan: Any, planted: dict[str, Any]) -> list[dict[str, Any]]:
    """The clusters again at other ``min_inliers``, from the pass's own verified pairs (which pairs
    are verified does not depend on it): recall and false merges for each."""
    import numpy as np
    import pandas as pd

    from pipeline.moderation.waves import UnionFind

    v, keys = plan.verified, plan.sigs.keys
    rows = []
    for m in SWEEP_INLIERS:
        uf = UnionFind(len(keys))
        for a, b in v.get("base", []):
            uf.union(a, b)
        ok = v["inliers"] >= m if len(v.get("inliers", [])) else np.zeros(0, bool)
        for a, b in zip(v["a"][ok], v["b"][ok]) if len(ok) else []:
            uf.union(int(a), int(b))
        lab = uf.labels()
        df = pd.DataFrame({"image_key": keys, "dup_cluster_id": lab.astype(str),
                           "dup_cluster_size": np.bincount(lab, minlength=len(keys))[lab]})
        r = score(df, planted, plan.params.wave_min_size)
        rows.append({"min_inliers": m, **{k: r[k] for k in ("wave_recall", "unrelated_in_waves", "distinct_waves_merged",
                                                            "unrelated_clusters_of_2_or_more", "false_waves")}})
    return rows


def per_million(info: dict[str, Any]) -> dict[str, Any]:
    """The pass's measured seconds and their linear extrapolation to 1M uploads (the exact index's
    search grows as n^2: its line says so)."""
    n = max(1, int(info["uploads"]))
    secs = dict(info["seconds"])
    total = sum(v for k, v in secs.items() if k != "commit")
    per = {k: round(v * 1e6 / n, 1) for k, v in secs.items()}
    return {"uploads": n, "seconds": secs, "seconds_per_1M_linear": per,
            "pass_seconds": round(total, 2), "pass_seconds_per_1M_linear": round(total * 1e6 / n, 1),
            "described_share": round(info["described"] / n, 4), "verified_pairs_per_upload": round(info["verified_pairs"] / n, 4)}


def search_at(n: int, k: int, threshold: float, queries: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """The candidate stage alone at ``n`` uploads: :func:`~pipeline.moderation.waves.feature_index`
    over ``n`` random unit 128-d vectors (IVF beyond 200K: balanced lists, a lower bound for real
    features, whose lists are uneven) and :class:`~pipeline.moderation.waves.NeighbourSearch` for
    ``queries`` of them; the search of all ``n`` is extrapolated linearly from those."""
    import faiss
    import numpy as np

    from pipeline.moderation.waves import NeighbourSearch, feature_index

    x = np.random.default_rng(seed).standard_normal((n, 128), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.time()
    index_bytes = faiss.serialize_index(feature_index(x))
    t_index = time.time() - t
    del x
    st = NeighbourSearch(index_bytes, k, threshold)
    q = min(queries, n)
    t = time.time()
    for i in range(0, q, 4096):
        st({"id": np.arange(i, min(q, i + 4096))})
    t_q = time.time() - t
    return {"uploads": n, "index": "flat" if n <= 200_000 else "ivf", "index_seconds": round(t_index, 1),
            "queries_timed": q, "search_seconds_all_extrapolated": round(t_q * n / q, 1)}


def bench_waves(photos: list[Path], generated: int, sizes: tuple[int, ...], workdir: Path, seed: int = 0,
                actors: int = 1, search_n: int = 0) -> dict[str, Any]:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.ray_stages import init_ray
    from jobs.runtime.waves import execute_waves, prepare_waves
    from pipeline.moderation.wave_output import read_waves, waves_root

    root = workdir / "day"
    shutil.rmtree(root, ignore_errors=True)
    t = time.time()
    planted = plant_day(photos, generated, sizes, root / "uploads", seed)
    t_plant = time.time() - t
    cfg = JobConfig(actors=actors, verify_gallery=False)
    init_ray(None)
    t = time.time()
    mod = _moderate(root, cfg)
    t_mod = time.time() - t
    t = time.time()
    plan = prepare_waves(str(root / "flags"), DAY, cfg)
    info = execute_waves(plan, review=False)
    t_waves = time.time() - t
    df = read_waves(waves_root(str(root / "flags")), DAY)
    res = {"machine": machine(), "uploads": int(mod["inputs"]), "unrelated": len(planted["unrelated"]),
           "real_photos": len(photos) - len(sizes), "generated": generated, "wave_sizes": list(sizes), "seed": seed,
           "params": info["params"], "counts": {k: info[k] for k in ("searched", "candidate_pairs", "described",
                                                                    "sure_edges", "zone_pairs", "verified_pairs",
                                                                    "verified_edges", "same_bytes_pairs", "waves")},
           **score(df, planted, info["params"]["wave_min_size"]), "time": per_million(info),
           "wall_seconds": {"plant": round(t_plant, 1), "moderate": round(t_mod, 1), "waves_command": round(t_waves, 1)}}
    res["min_inliers_sweep"] = sweep(plan, planted)
    if search_n:
        res["search_at_scale"] = search_at(search_n, info["params"]["k"], info["params"]["coarse_threshold"])
    (workdir / "waves.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def cli_bench_waves(a: argparse.Namespace) -> int:
    from pipeline.errors import UsageError

    photos = photo_paths([Path(p) for p in a.photos], limit=a.limit) if a.photos else []
    sizes = tuple(int(s) for s in a.sizes.split(","))
    if len(photos) + a.generated - len(sizes) < 2000 and not a.small:
        raise UsageError(f"{len(photos)} photos and {a.generated} generated pictures: the benchmark needs at least "
                         f"2,000 unrelated uploads (add --photos folders, raise --generated, or pass --small)")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = bench_waves(photos, a.generated, sizes, workdir, a.seed, a.actors, a.search_at)
    tm = res["time"]
    print(f"machine: {res['machine']}; {res['uploads']} uploads: {sum(sizes)} planted in {len(sizes)} waves, "
          f"{res['unrelated']} unrelated ({res['real_photos']} real photos, {res['generated']} generated)")
    print(table(res["rows"], ["wave", "planted", "found", "recall", "cluster_size", "unrelated_in_it",
                              "clusters_it_split_into"]))
    print(f"wave recall {res['wave_recall']:.3f} ({res['members_found']} of {res['members_planted']}); unrelated uploads "
          f"in a wave: {res['unrelated_in_waves']}; distinct waves merged: {res['distinct_waves_merged']}; clusters of "
          f"unrelated uploads only: {res['unrelated_clusters_of_2_or_more']} ({res['unrelated_uploads_in_them']} uploads, "
          f"{res['false_waves']} of wave size)")
    print(table([{"stage": k, "seconds": round(v, 2), "per 1M uploads (linear)": tm["seconds_per_1M_linear"][k]}
                 for k, v in tm["seconds"].items()], ["stage", "seconds", "per 1M uploads (linear)"]))
    print(f"pass: {tm['pass_seconds']} s for {tm['uploads']} uploads = {tm['pass_seconds_per_1M_linear']} s per 1M "
          f"(linear); {tm['described_share']:.1%} re-read for the fine score")
    print("the same verified pairs at other min_inliers (the pass's own run is the row of its default):")
    print(table(res["min_inliers_sweep"], ["min_inliers", "wave_recall", "unrelated_in_waves", "distinct_waves_merged",
                                           "unrelated_clusters_of_2_or_more", "false_waves"]))
    if res.get("search_at_scale"):
        sa = res["search_at_scale"]
        print(f"candidate stage at {sa['uploads']:,} uploads ({sa['index']} index, random vectors): index built in "
              f"{sa['index_seconds']} s, top-k search of all of them {sa['search_seconds_all_extrapolated']} s "
              f"(from {sa['queries_timed']:,} queries)")
    print(f"written: {workdir / 'waves.json'}")
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``waves`` under ``modscan bench`` (the sub-parsers of ``jobs/commands/bench_cmd.py``)."""
    q = bench_subparsers.add_parser("waves", help="planted waves among unrelated real and generated pictures: recall, "
                                                  "false merges, time per 1M uploads")
    q.add_argument("--photos", action="append", default=[], help="folder of real photos (repeat), e.g. "
                                                                  "../shared/data/photos/imagenet-sample")
    q.add_argument("--limit", type=int, default=5000, help="photos taken from the folders, at most")
    q.add_argument("--generated", type=int, default=300, help="generated everyday pictures among the unrelated")
    q.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="planted wave sizes, comma-separated")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--actors", type=int, default=1)
    q.add_argument("--search-at", type=int, default=0, metavar="N",
                   help="also time the candidate stage alone at N uploads (random vectors), e.g. 1000000")
    q.add_argument("--small", action="store_true", help="allow fewer than 2,000 unrelated uploads (a quick check)")
    q.add_argument("--workdir", default="bench-out", help="the day is written under WORKDIR/day; waves.json here")
    q.set_defaults(fn=cli_bench_waves)
