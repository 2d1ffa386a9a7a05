"""One retro run: re-decide past days after a gallery change, touching only the survivors.

:func:`prepare_retro` checks everything before Ray starts (dates, model, gallery versions, each
day's committed flags and signatures, the model the signatures were made with) and computes the
gallery diff (:func:`pipeline.moderation.retro.diff_versions`). :func:`execute_retro`:

1. coarse pass, Ray Data over the committed signature files of the days: the stored features
   against a small exact index of the ADDED references' coarse vectors, plus every upload whose
   past flag names a removed/changed reference (:class:`~pipeline.moderation.retro.RetroMatcher`);
2. the survivors are re-read by ``image_uri``, decoded and decided by the real
   :class:`~pipeline.moderation.moderator.Moderator` against the full CURRENT gallery: the same
   stages as a fresh run (``jobs/runtime/ray_stages.py``), so the decision is a fresh run's;
3. per day with a changed decision: the partition is claimed with the run lock, checked to be
   the one the pass read, re-staged as a whole new set of files (unchanged files copied, files
   with changed rows rewritten), flood-guarded, verified and committed by the flags protocol.
   A day without a change is not committed again: a rerun finds days at CURRENT and skips them.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from jobs.runtime.job_config import JobConfig
from jobs.runtime.run import check_output, new_run_id
from pipeline.errors import ModscanError, UsageError
from pipeline.ingest.decode import DecodeConfig
from pipeline.ingest.storage import Store, open_store, redact
from pipeline.moderation import flags as F
from pipeline.moderation import retro as R
from pipeline.moderation.floodguard import guard_staged
from pipeline.moderation.signatures import committed_files, model_versions, signatures_root

RETRO_DIR = "_retro"


@dataclass
class RetroPlan:
    """What :func:`prepare_retro` checked and decided."""

    retro_id: str
    gallery_uri: str
    diff: R.GalleryDiff
    days: list[str]                      # days to re-check (committed at ``since``)
    skipped: dict[str, str]              # day -> why it is not re-checked
    base_runs: dict[str, str]            # day -> run id of the committed partition read
    out: Store
    output_uri: str
    sig: Store
    model_dir: str | None
    model_version: str
    coarse_threshold: float
    cfg: JobConfig
    decode: DecodeConfig
    t_start: float = field(default_factory=time.time)


def _check_day(out: Store, sig: Store, dt: str, since: str, current: str, model: str) -> str | None:
    """None when ``dt`` is to be re-checked; else why not. Raises when it cannot be done right."""
    if not F.is_committed(out, dt):
        return "no committed flags partition"
    info = F.read_run(out, dt) or {}
    at = info.get("gallery_version")
    if at == current:
        return f"already decided against {current}"
    if at != since:
        raise ModscanError(f"dt={dt} was decided against gallery {at}, not --since {since}: run "
                           f"`modscan retro --since {at}` for it (a diff from another version would miss changes)")
    if not F.is_committed(sig, dt):
        raise ModscanError(f"dt={dt} has no committed signatures under {redact(sig.uri)} ([job] write_signatures "
                           f"was off): re-moderate it with `modscan backfill --from {dt} --to {dt} --force`")
    other = model_versions(sig, dt) - {model}
    if other:
        raise ModscanError(f"dt={dt}: signatures were made with model {sorted(other)[0]} but the gallery's model is "
                           f"{model}: a model change needs a full backfill: modscan backfill --from {dt} --to {dt} "
                           f"--force")
    return None


def prepare_retro(gallery_uri: str, since: str, date_from: str, date_to: str, output_uri: str,
                  signatures_uri: str | None = None, model_dir: str | None = None,
                  cfg: JobConfig | None = None, days: list[str] | None = None) -> RetroPlan:
    """Every check before Ray starts (see the module doc); raises a one-line ModscanError.
    ``days``: these days instead of ``date_from`` .. ``date_to`` (the nightly's groups)."""
    from models.card import read_card
    from pipeline import gallery as G

    cfg = cfg or JobConfig()
    days = [F.valid_date(d) for d in days] if days is not None else F.day_range(date_from, date_to)
    gstore = open_store(gallery_uri)
    current = G.read_manifest(gstore)
    try:
        G.read_manifest(gstore, since)
    except G.GalleryNotFound:
        raise UsageError(f"--since {since}: no such version in gallery {redact(gallery_uri)}") from None
    card = read_card(model_dir)
    current.check_model(card.version_id)
    out = check_output(output_uri)
    sig = open_store(signatures_root(output_uri, signatures_uri))
    todo, skipped, base = [], {}, {}
    for dt in [p for d in days for p in (F.committed_partitions(out, d) or [d])]:  # a day's hours are re-checked too
        why = _check_day(out, sig, dt, since, current.version, current.model.model_id)
        if why:
            skipped[dt] = why
        else:
            todo.append(dt)
            base[dt] = out.read_text(f"{F.partition_key(dt)}/{F.SUCCESS}").strip()
    diff = R.diff_versions(gstore, since, current.version)
    thr = cfg.coarse_threshold if cfg.coarse_threshold is not None else current.model.coarse_threshold
    retro_id = f"retro-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    return RetroPlan(retro_id, gallery_uri, diff, todo, skipped, base, out, output_uri, sig, model_dir,
                     card.version_id, float(thr), cfg, DecodeConfig.for_model(card.config, base=cfg.decode))


def _changed_flags(plan: RetroPlan) -> list[str]:
    """``dt/key`` of every committed flag row that names a removed or changed reference."""
    if not plan.diff.changed_ids:
        return []
    found = []
    for dt in plan.days:
        part = F.partition_key(dt)
        for k in plan.out.list(part, recursive=False):
            if k.endswith(".parquet"):
                t = pq.read_table(plan.out.path(k), columns=["image_key", "reference_id"], filesystem=plan.out.fs)
                found += [f"{dt}/{key}" for key in R.flagged_by(t, plan.diff.changed_ids)]
    return found


def _partition_of(path: str) -> str:
    """The partition of a committed file's path: its ``dt=`` folder, and ``hour=`` below it if any."""
    parts = str(path).split("/")
    dt = next(p[3:] for p in parts if p.startswith("dt="))
    hour = next((p[len(F.HOUR_DIR):] for p in parts if p.startswith(F.HOUR_DIR)), None)
    return dt if hour is None else f"{dt}T{hour}"


def _with_dt(batch: dict[str, Any]) -> dict[str, Any]:
    """Signature rows read with ``include_paths``: the partition (day or hour) from the path."""
    import numpy as np

    dts = [_partition_of(path) for path in batch["path"]]
    return {"dt": np.asarray(dts, object), "image_key": batch["image_key"], "image_uri": batch["image_uri"],
            "coarse_feature": batch["coarse_feature"]}


def coarse_pass(plan: RetroPlan) -> list[dict[str, Any]]:
    """Ray Data over the days' signature files -> the survivors (``dt, image_key, image_uri, best_*``)."""
    import ray

    files = [p for dt in plan.days for p in committed_files(plan.sig, dt)]
    flagged = _changed_flags(plan)
    if not files or (not plan.diff.added_ids and not flagged):
        return []
    ids, vecs = R.coarse_vectors(open_store(plan.gallery_uri), plan.diff.current, plan.diff.added_ids)
    ds = ray.data.read_parquet(files, filesystem=plan.sig.fs, include_paths=True,
                               columns=["image_key", "image_uri", "coarse_feature"])
    ds = ds.map_batches(_with_dt, batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(R.RetroMatcher, fn_constructor_kwargs={"ids": ids, "vectors": vecs,
                                                               "threshold": plan.coarse_threshold, "flagged": flagged},
                        batch_format="numpy", batch_size=4096, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
                        num_cpus=0.5)
    return ds.filter(lambda r: bool(r["hit"])).take_all()


def redecide(plan: RetroPlan, survivors: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Re-read, decode and decide the survivors with the real Moderator against CURRENT.
    -> day -> image_key -> flag row."""
    from jobs.runtime.ray_stages import actor_resources, decode_and_apply, fetch_by_uri
    from pipeline.moderation.moderator import Moderator, RunContext

    if not survivors:
        return {}
    cfg = plan.cfg
    res = actor_resources(cfg)
    kwargs = {"gallery_uri": plan.gallery_uri, "model_dir": plan.model_dir, "ctx": RunContext("retro", plan.retro_id),
              "overrides": cfg.query_overrides(), "gallery_version": plan.diff.current, "precision": cfg.precision,
              "gallery_cache": cfg.node_cache()}
    ds = fetch_by_uri([f"{s['dt']}/{s['image_key']}" for s in survivors], [str(s["image_uri"]) for s in survivors], cfg)
    rows = decode_and_apply(ds, Moderator, kwargs, cfg, res, plan.decode).take_all()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        dt, _, key = str(r["image_key"]).partition("/")
        out.setdefault(dt, {})[key] = {**r, "image_key": key}
    return out


def _stage_day(plan: RetroPlan, dt: str, run_id: str, rows: dict[str, dict[str, Any]]) -> tuple[set[str], R.MergeCounts]:
    """Copy-on-write: every committed file of ``dt`` into ``run_id``'s staging, rewritten where it
    holds a re-decided row, copied as it is otherwise. -> (every key, merge counts)."""
    out, part = plan.out, F.partition_key(dt)
    keys: set[str] = set()
    total = R.MergeCounts()
    files = [k for k in out.list(part, recursive=False) if k.endswith(".parquet")]  # a day's own, never its hours'
    for i, k in enumerate(files):
        t = pq.read_table(out.path(k), filesystem=out.fs)
        file_keys = t.column("image_key").to_pylist()
        keys |= set(file_keys)
        name = f"retro-{i:05d}.parquet"
        if rows.keys() & set(file_keys):
            merged, counts = R.merge_rows(t, rows, run_id)
            total.add(counts)
            F.write_staged(out, run_id, name, merged)
        else:
            out.fs.create_dir(out.path(f"{F.staging_key(run_id)}/data"), recursive=True)
            out.fs.copy_file(out.path(k), out.path(f"{F.staging_key(run_id)}/data/{name}"))
    return keys, total


def _fail_day(out: Store, dt: str, run_id: str, e: Exception) -> None:
    F.abandon(out, run_id)
    taken = F.taken_error(out, dt, run_id)
    if taken is not None and not isinstance(e, F.PartitionTakenError):
        raise taken from e
    raise e


def commit_day(plan: RetroPlan, dt: str, rows: dict[str, dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Claim ``dt``, check it is still the partition the pass read, re-stage, verify, commit."""
    out = plan.out
    run_id = new_run_id(dt)
    F.sweep_staging(out, keep=run_id)
    F.claim_partition(out, dt, run_id)  # before its staging exists (see jobs.runtime.run's claim)
    out.write_text(f"{F.staging_key(run_id)}/started", str(time.time()))
    try:
        F.wait_for_commits(out, dt, run_id)
        now = out.read_text(f"{F.partition_key(dt)}/{F.SUCCESS}").strip() if F.is_committed(out, dt) else None
        if now != plan.base_runs[dt]:
            raise F.CommitError(f"dt={dt} was re-committed by run {now} during the retro run (it read "
                                f"{plan.base_runs[dt]}): nothing published for it; rerun the retro command")
        keys, counts = _stage_day(plan, dt, run_id, rows)
        flood = guard_staged(out, run_id, plan.cfg.max_matches_per_reference)
        verified = F.verify_staged(out, run_id, len(keys), keys)
        F.check_owner(out, dt, run_id)
    except Exception as e:
        _fail_day(out, dt, run_id, e)
    info = {**summary, "run_id": run_id, "dt": F.split_partition(dt)[0], "hour": F.split_partition(dt)[1],
            "partition": F.partition_key(dt), "replaces_run": plan.base_runs[dt], "inputs": len(keys),
            "counts": verified, "retro_counts": vars(counts), "flood_guard": flood.to_dict(),
            "finished_at": _dt.datetime.now(_dt.UTC).isoformat()}
    verified.pop("files", None)
    if counts.changed == 0:  # nothing to publish: the partition stays as it is
        F.abandon(out, run_id)
        return {**info, "committed": False}
    try:
        F.commit_partition(out, dt, run_id, info)
    except Exception as e:
        _fail_day(out, dt, run_id, e)
    return {**info, "committed": True}


def _summary(plan: RetroPlan) -> dict[str, Any]:
    return {"kind": "retro", "retro_id": plan.retro_id, "gallery": redact(plan.gallery_uri),
            "output": redact(plan.output_uri), "signatures": redact(plan.sig.uri), "model_version": plan.model_version,
            "gallery_version": plan.diff.current, "gallery_versions_compared": {"since": plan.diff.since,
                                                                                 "current": plan.diff.current},
            "days": plan.days, "days_skipped": plan.skipped, "references_added": plan.diff.added,
            "references_removed_or_changed": plan.diff.changed, "coarse_threshold": plan.coarse_threshold}


def execute_retro(plan: RetroPlan, ray_address: str | None = None) -> dict[str, Any]:
    """The coarse pass, the re-decision of the survivors and the per-day commits (module doc)."""
    from jobs.runtime.ray_stages import init_ray, raise_worker_error

    summary = _summary(plan)
    plan.out.write_text(f"{RETRO_DIR}/{plan.retro_id}.started.json", json.dumps(summary, indent=2) + "\n")
    survivors: list[dict[str, Any]] = []
    decided: dict[str, dict[str, dict[str, Any]]] = {}
    if plan.days and not plan.diff.empty:
        init_ray(ray_address)
        try:
            survivors = coarse_pass(plan)
            decided = redecide(plan, survivors)
        except Exception as e:
            raise_worker_error(e)
    per_day = {dt: sum(1 for s in survivors if s["dt"] == dt) for dt in plan.days}
    results: dict[str, dict[str, Any]] = {}
    for dt in plan.days:
        results[dt] = commit_day(plan, dt, decided.get(dt, {}), {**summary, "survivors": per_day[dt]}) \
            if decided.get(dt) else {"committed": False, "survivors": per_day[dt],
                                     "retro_counts": vars(R.MergeCounts())}
    totals = R.MergeCounts()
    for r in results.values():
        totals.add(R.MergeCounts(**r["retro_counts"]))
    report = {**summary, "survivors": len(survivors), "decoded": len(survivors), "totals": vars(totals),
              "per_day": {dt: {"committed": r["committed"], "survivors": r["survivors"], **r["retro_counts"]}
                          for dt, r in results.items()},
              "wall_seconds": round(time.time() - plan.t_start, 3)}
    plan.out.write_text(f"{RETRO_DIR}/{plan.retro_id}.json", json.dumps(report, indent=2, default=str) + "\n")
    plan.out.delete_file(f"{RETRO_DIR}/{plan.retro_id}.started.json")
    return report


def retro(gallery_uri: str, since: str, date_from: str, date_to: str, output_uri: str,
          signatures_uri: str | None = None, model_dir: str | None = None, cfg: JobConfig | None = None,
          ray_address: str | None = None, days: list[str] | None = None) -> dict[str, Any]:
    """:func:`prepare_retro` then :func:`execute_retro`; returns the retro run's report."""
    plan = prepare_retro(gallery_uri, since, date_from, date_to, output_uri, signatures_uri, model_dir, cfg, days)
    return execute_retro(plan, ray_address)


def nightly_retro(gallery_uri: str, output_uri: str, dt: str, gallery_version: str, cfg: JobConfig,
                  model_dir: str | None = None, signatures_uri: str | None = None,
                  ray_address: str | None = None) -> list[dict[str, Any]]:
    """After the nightly run of ``dt`` (decided against ``gallery_version``): when the previous
    day's committed run used another version, retro-match the last ``cfg.retro_days`` days before
    ``dt``, one retro run per gallery version those days were decided against. -> the reports."""
    out = open_store(output_uri)
    prev_day = (_dt.date.fromisoformat(dt) - _dt.timedelta(days=1)).isoformat()
    prev = F.read_run(out, prev_day) if F.is_committed(out, prev_day) else None
    if not cfg.retro_days or prev is None or prev.get("gallery_version") in (None, gallery_version):
        return []
    groups: dict[str, list[str]] = {}
    for i in range(cfg.retro_days, 0, -1):
        d = (_dt.date.fromisoformat(dt) - _dt.timedelta(days=i)).isoformat()
        at = (F.read_run(out, d) or {}).get("gallery_version") if F.is_committed(out, d) else None
        if at is not None and at != gallery_version:
            groups.setdefault(at, []).append(d)
    return [retro(gallery_uri, since, days[0], days[-1], output_uri, signatures_uri, model_dir, cfg, ray_address,
                  days=days) for since, days in sorted(groups.items())]


def summary_lines(rep: dict[str, Any]) -> str:
    """What ``modscan retro`` prints."""
    t = rep["totals"]
    lines = [f"modscan retro {rep['retro_id']}: gallery {rep['gallery_versions_compared']['since']} -> "
             f"{rep['gallery_versions_compared']['current']}, {len(rep['references_added'])} references added, "
             f"{len(rep['references_removed_or_changed'])} removed/changed",
             f"  {len(rep['days'])} day(s) re-checked, {rep['survivors']} survivors re-read; {t['changed']} decisions "
             f"changed ({t['newly_flagged']} newly flagged, {t['cleared']} cleared, {t['repointed']} re-pointed)"]
    for dt, r in rep["per_day"].items():
        lines.append(f"  {dt}: {'committed' if r['committed'] else 'unchanged'} ({r['survivors']} survivors, "
                     f"{r['changed']} changed)")
    for dt, why in rep["days_skipped"].items():
        lines.append(f"  {dt}: skipped ({why})")
    return "\n".join(lines)
