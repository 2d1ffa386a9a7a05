"""The moderation job: uploads of one day -> decode -> cascade -> one committed flags partition.

Wiring only: the stages live in ``pipeline/`` and are plain classes. ``moderate`` is what
``modscan moderate``, ``nightly``, ``backfill``, ``demo`` and the benchmarks call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import posixpath
import sys
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from pipeline import flags as F
from pipeline.decode import DecodeConfig, Decoder
from pipeline.floodguard import guard_staged
from pipeline.floodguard import summary_lines as flood_summary_lines
from pipeline.jobmetrics import MetricsPushError
from pipeline.jobmetrics import publish as publish_metrics
from pipeline.storage import Store, open_store, redact, split_uri

MANIFEST_SUFFIXES = (".parquet", ".csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif")


@dataclass(frozen=True)
class JobConfig:
    """Resources and sizes of the job. Defaults suit a 2-core machine; see configs/moderate.toml.

    ``actors = 0`` means: one actor per GPU on a GPU cluster, else one actor per 2 CPUs (min 1).
    ``actor_num_cpus`` is fractional on small machines: an actor pool that claims every CPU starves
    the read/decode tasks and the job stalls without an error.
    """

    batch_size: int = 64
    actors: int = 0
    actor_num_cpus: float = 0.5
    decode_num_cpus: float = 0.5
    torch_threads: int = 0           # 0: min(4, CPUs on the node) for CPU actors
    image_extensions_only: bool = False  # prefix input: skip keys without an image extension
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    coarse_threshold: float | None = None   # None: the gallery manifest's (= the model card's)
    fine_threshold: float | None = None
    rerank_k: int | None = None
    review_max_rows: int = 200
    single_stage: bool = False       # benchmark baseline only: high-res 512-d pass for every image
    max_matches_per_reference: int = 1000  # flood guard: more matches in one run -> action review (0: off)
    metrics_textfile: str | None = None    # node-exporter textfile (*.prom) written after each commit
    metrics_pushgateway: str | None = None  # Pushgateway base URL; metrics PUT after each commit

    def threshold_overrides(self) -> dict[str, float]:
        """The thresholds this config sets over the gallery manifest's (job and ``lookup`` alike)."""
        return {k: v for k, v in {"coarse": self.coarse_threshold, "fine": self.fine_threshold,
                                  "rerank_k": self.rerank_k}.items() if v is not None}

    @classmethod
    def from_toml(cls, path: str | None, **overrides: Any) -> "JobConfig":
        d: dict[str, Any] = {}
        if path:
            with open(path, "rb") as f:
                d = tomllib.load(f).get("job", {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{path}: unknown [job] keys {sorted(unknown)}; known: {sorted(known)}")
        if "decode" in d:
            d["decode"] = DecodeConfig(**d["decode"])
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Ray plumbing
# --------------------------------------------------------------------------------------------
def init_ray(address: str | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if not addr:
        kwargs["include_dashboard"] = False
        # Workers inherit this environment (S3 endpoint, credentials, thread caps).
    ray.init(address=addr, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()


def _resources(cfg: JobConfig) -> tuple[int, float, float, int]:
    """-> (actors, num_cpus per actor, num_gpus per actor, torch threads)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    if gpus:
        return (cfg.actors or gpus), cfg.actor_num_cpus, 1.0, cfg.torch_threads or 2
    actors = cfg.actors or max(1, int(cpus // 2))
    threads = cfg.torch_threads or max(1, min(4, int(cpus // actors)))
    return actors, cfg.actor_num_cpus, 0.0, threads


def _decode_batch(batch: dict[str, Any], cfg: DecodeConfig, timings_uri: str | None) -> dict[str, Any]:
    """Decode task (stateless, so a plain task pool) with a per-batch timing record (best effort)."""
    t = time.perf_counter()
    out = Decoder(cfg)(batch)
    if timings_uri:
        try:
            open_store(timings_uri).write_text(
                f"decode-{uuid.uuid4().hex}.json",
                json.dumps({"rows": len(out["ok"]), "seconds": {"decode_resize": time.perf_counter() - t}}))
        except Exception:  # noqa: BLE001
            pass
    return out


def _relkey_fn(root: str):  # noqa: ANN202
    def relkey(batch: dict[str, Any]) -> dict[str, Any]:
        keys = [posixpath.relpath(str(p), root) for p in batch["path"]]
        return {"image_key": np.asarray(keys, dtype=object), "bytes": batch["bytes"],
                "read_error": np.asarray([None] * len(keys), dtype=object)}
    return relkey


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def read_manifest_keys(uri: str) -> list[str]:
    """Keys from a Parquet/CSV manifest: column ``key`` (or ``image_key``/``uri``), one per row."""
    import pandas as pd
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    st, name = split_uri(uri)
    with st.fs.open_input_file(st.path(name)) if name.endswith(".parquet") else st.fs.open_input_stream(st.path(name)) as f:
        table = pq.read_table(f) if name.endswith(".parquet") else pacsv.read_csv(f)
    df: pd.DataFrame = table.to_pandas()
    for col in ("key", "image_key", "uri"):
        if col in df.columns:
            keys = [str(k) for k in df[col].tolist() if isinstance(k, str) and k]
            if len(set(keys)) != len(keys):
                raise ValueError(f"manifest {uri} lists some keys twice; each upload must appear once")
            return keys
    raise ValueError(f"manifest {uri} needs a column 'key' (or 'image_key' / 'uri'); has {list(df.columns)}")


def resolve_key(manifest_uri: str, key: str) -> str:
    """A manifest key is a full URI (``s3://``, absolute path) or relative to the manifest's folder."""
    if key.startswith("s3://") or key.startswith("/"):
        return key
    st, _ = split_uri(manifest_uri)
    return st.uri.rstrip("/") + "/" + key


def build_input(input_uri: str, cfg: JobConfig) -> tuple[Any, int]:
    """-> (Ray dataset with ``image_key, bytes, read_error``, number of inputs)."""
    import ray

    if input_uri.lower().endswith(MANIFEST_SUFFIXES):
        keys = read_manifest_keys(input_uri)
        items = [{"image_key": k, "uri": resolve_key(input_uri, k)} for k in keys]
        from pipeline.stages import Fetcher

        ds = ray.data.from_items(items, override_num_blocks=max(1, min(200, len(items) // 64 or 1)))
        return ds.map_batches(Fetcher, batch_size=64, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
                              num_cpus=cfg.decode_num_cpus), len(keys)
    st = open_store(input_uri)
    keys = [k for k in st.list() if not posixpath.basename(k).startswith((".", "_"))
            and (not cfg.image_extensions_only or k.lower().endswith(IMAGE_SUFFIXES))]
    if not keys:
        return ray.data.from_items([]), 0
    paths = [st.path(k) for k in keys]
    ds = ray.data.read_binary_files(paths, filesystem=st.fs, include_paths=True,
                                    override_num_blocks=max(1, min(200, len(paths) // 64 or 1)))
    return ds.map_batches(_relkey_fn(st.root), batch_size=256, num_cpus=0.1), len(keys)


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def new_run_id(dt: str) -> str:
    return f"{dt.replace('-', '')}T{_dt.datetime.now(_dt.timezone.utc).strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _sum_timings(st: Store) -> dict[str, float]:
    """Sum the per-batch timing records; ``moderator_window`` spans the first to the last
    Moderator batch (steady-state throughput, without cluster and actor start-up)."""
    tot: dict[str, float] = {}
    t0, t1 = float("inf"), 0.0
    for k in st.list():
        try:
            rec = json.loads(st.read_text(k))
        except Exception:  # noqa: BLE001
            continue
        if "t_start" in rec:
            t0, t1 = min(t0, rec["t_start"]), max(t1, rec["t_end"])
        for name, s in rec.get("seconds", {}).items():
            tot[name] = tot.get(name, 0.0) + float(s)
        for name in ("survivors", "decoded"):
            if name in rec:
                tot[name] = tot.get(name, 0) + rec[name]
    if t1 > t0:
        tot["moderator_window"] = t1 - t0
    return tot


def moderate(input_uri: str, gallery_uri: str, output_uri: str, dt: str, model_dir: str | None = None,
             cfg: JobConfig | None = None, ray_address: str | None = None, review: bool = True,
             run_id: str | None = None) -> dict[str, Any]:
    """Run one day. Returns the ``_run.json`` content of the committed partition."""
    import ray

    from models.card import read_card
    from pipeline.gallery import GalleryIndex
    from pipeline.stages import Moderator, RunContext

    cfg = cfg or JobConfig()
    F.partition_key(dt)
    t_start = time.time()
    init_ray(ray_address)
    card = read_card(model_dir)
    # Fail fast in the driver (not in every actor) on a missing gallery or a model mismatch.
    gal = GalleryIndex.load(gallery_uri, model_id=card.version_id)
    gallery_version = gal.version
    del gal
    decode_cfg = replace(cfg.decode, low_res=card.config.low_res, high_res=card.config.high_res)

    out = open_store(output_uri, create=True)
    run_id = run_id or new_run_id(dt)
    F.sweep_staging(out, keep=run_id, dt=dt)
    stage = F.staging_key(run_id)
    out.write_text(f"{stage}/started", str(time.time()))
    timings_uri = out.full_uri(f"{stage}/timings")

    ds, n_inputs = build_input(input_uri, cfg)
    actors, ncpu, ngpu, threads = _resources(cfg)
    overrides = cfg.threshold_overrides()
    t_read = time.time()
    if n_inputs:
        ds = ds.map_batches(_decode_batch, fn_kwargs={"cfg": decode_cfg, "timings_uri": timings_uri},
                            batch_size=cfg.batch_size, num_cpus=cfg.decode_num_cpus)
        ds = ds.map_batches(
            Moderator,
            fn_constructor_kwargs={"gallery_uri": gallery_uri, "model_dir": model_dir,
                                   "ctx": RunContext(dt, run_id, timings_uri), "threads": threads,
                                   "threshold_overrides": overrides or None, "single_stage": cfg.single_stage},
            batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ncpu, num_gpus=ngpu, batch_format="numpy")
        ds.write_parquet(out.path(f"{stage}/data"), filesystem=out.fs,
                         filename_provider=None)
    t_pipeline = time.time() - t_read
    flood = guard_staged(out, run_id, cfg.max_matches_per_reference)  # may rewrite staged rows: before verify
    counts = F.verify_staged(out, run_id, n_inputs)
    timings = _sum_timings(out.child(f"{stage}/timings")) if out.exists(f"{stage}/timings") else {}
    wall = time.time() - t_start
    run_info = {
        "run_id": run_id, "dt": dt, "input": redact(input_uri), "gallery": redact(gallery_uri),
        "output": redact(output_uri), "model_version": card.version_id, "gallery_version": gallery_version,
        "inputs": n_inputs, "counts": counts, "survivors": int(timings.pop("survivors", 0)),
        "decoded": int(timings.pop("decoded", 0)),
        "steady_state_images_per_second": (round(n_inputs / timings["moderator_window"], 2)
                                           if timings.get("moderator_window") else None),
        "stage_seconds_summed_over_workers": {k: round(v, 3) for k, v in timings.items()},
        "pipeline_seconds": round(t_pipeline, 3), "wall_seconds": round(wall, 3),
        "images_per_second": round(n_inputs / t_pipeline, 2) if t_pipeline > 0 else None,
        "resources": {"actors": actors, "actor_num_cpus": ncpu, "actor_num_gpus": ngpu, "torch_threads": threads},
        "config": json.loads(redact(json.dumps(asdict(cfg), default=str))),  # a Pushgateway URL may hold a password
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "flood_guard": flood.to_dict(),
    }
    counts.pop("files", None)
    F.commit_partition(out, dt, run_id, run_info)
    try:  # after the commit: "last success" must never be reported for an uncommitted run
        run_info["metrics"] = publish_metrics(run_info, cfg.metrics_textfile, cfg.metrics_pushgateway)
    except (OSError, MetricsPushError) as e:
        run_info["metrics_error"] = redact(f"{type(e).__name__}: {e}")
    if review:
        try:
            from pipeline.review import write_review

            run_info["review"] = write_review(out, dt, run_id, input_uri, gallery_uri, max_rows=cfg.review_max_rows)
        except Exception as e:  # noqa: BLE001 - the review page is a convenience, the flags are committed
            run_info["review_error"] = redact(f"{type(e).__name__}: {e}")
    return run_info


def summary(info: dict[str, Any]) -> str:
    c = info["counts"]
    lines = [
        f"modscan: dt={info['dt']} run={info['run_id']} model={info['model_version']} gallery={info['gallery_version']}",
        f"  {info['inputs']} uploads -> {c['rows']} rows in {info['wall_seconds']:.1f}s "
        f"({info['images_per_second']} images/s in the pipeline); {info['survivors']} went to the 512-d rerank",
        f"  status: {json.dumps(c['by_status'])}  action: {json.dumps(c['by_action'])}",
    ]
    if c["by_error_code"]:
        lines.append(f"  errors: {json.dumps(c['by_error_code'])}")
    if c.get("by_bank"):
        lines.append(f"  banks: {json.dumps(c['by_bank'])}")
    lines += flood_summary_lines(info.get("flood_guard"))
    if info.get("metrics_error"):
        lines.append(f"  metrics NOT written: {info['metrics_error']}")
    if info.get("review"):
        lines.append(f"  review page: {info['review']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command-line entry points
# --------------------------------------------------------------------------------------------
def _cfg(a: argparse.Namespace) -> JobConfig:
    return JobConfig.from_toml(a.config, batch_size=a.batch_size, actors=a.actors)


def cli_moderate(a: argparse.Namespace) -> int:
    info = moderate(a.input, a.gallery, a.output, a.date, a.model, _cfg(a), a.ray_address)
    print(summary(info))
    return 0


def yesterday() -> str:
    return (_dt.datetime.now(_dt.timezone.utc).date() - _dt.timedelta(days=1)).isoformat()


def cli_nightly(a: argparse.Namespace) -> int:
    dt = a.date or yesterday()
    info = moderate(a.input_template.format(date=dt), a.gallery, a.output, dt, a.model, _cfg(a), a.ray_address)
    print(summary(info))
    return 0


def backfill(input_template: str, gallery: str, output: str, date_from: str, date_to: str,
             model_dir: str | None = None, cfg: JobConfig | None = None, force: bool = False,
             ray_address: str | None = None) -> dict[str, str]:
    """One partition per day; committed days are skipped unless ``force`` (resumable after a kill)."""
    d0, d1 = _dt.date.fromisoformat(date_from), _dt.date.fromisoformat(date_to)
    if d1 < d0:
        raise ValueError(f"--to {date_to} is before --from {date_from}")
    out = open_store(output, create=True)
    result: dict[str, str] = {}
    d = d0
    while d <= d1:
        dt = d.isoformat()
        if F.is_committed(out, dt) and not force:
            result[dt] = "skipped (committed)"
        else:
            info = moderate(input_template.format(date=dt), gallery, output, dt, model_dir, cfg, ray_address)
            print(summary(info), flush=True)
            result[dt] = "done"
        d += _dt.timedelta(days=1)
    return result


def cli_backfill(a: argparse.Namespace) -> int:
    res = backfill(a.input_template, a.gallery, a.output, a.date_from, a.date_to, a.model, _cfg(a), a.force,
                   a.ray_address)
    for dt, s in res.items():
        print(f"{dt}: {s}")
    return 0
