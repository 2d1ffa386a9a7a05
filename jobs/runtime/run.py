"""One moderation run: uploads of one day -> decode -> cascade -> one committed flags partition.

``moderate`` is what ``modscan moderate``, ``nightly``, ``backfill``, ``demo`` and the benchmarks
call. It runs in two named steps: :func:`prepare_run` checks everything that needs no cluster
(date, config, input, model, gallery, output) and pins the gallery version; :func:`execute_run`
starts Ray, runs the pipeline (``jobs/runtime/ray_stages.py``), commits the partition and writes
``_run.json`` (its content is what both return).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow.fs as pafs

from jobs.runtime.job_config import JobConfig
from jobs.runtime.ray_stages import actor_resources, build_input, decode_and_apply, init_ray, raise_worker_error, shard_servers, stream_batches
from pipeline.errors import ModscanError, UsageError, plain_message
from pipeline.ingest.decode import DecodeConfig
from pipeline.ingest.plan import InputPlan, check_input
from pipeline.ingest.storage import Store, open_store, redact
from pipeline.moderation import flags as F
from pipeline.moderation.floodguard import FloodReport, guard_files
from pipeline.moderation.floodguard import summary_lines as flood_summary_lines
from pipeline.moderation.partitions import check_mixed_day
from pipeline.moderation.resume import (
    ChunkProgress,
    ChunkRecord,
    Chunks,
    Fingerprint,
    Resume,
    chunked,
    open_stage,
    plan_digest,
    settings_digest,
)
from pipeline.moderation.signatures import searched_keys, signatures_root, staging_data_uri, verify_signatures
from pipeline.moderation.signatures import select_files as select_signature_files
from pipeline.moderation.staging import attempt_key, mark_started
from pipeline.ops.prometheus import MetricsPushError
from pipeline.ops.prometheus import publish as publish_metrics
from pipeline.schemas import SIGNATURE_SCHEMA

if TYPE_CHECKING:
    from pipeline.moderation.moderator import Moderator

log = logging.getLogger(__name__)


def new_run_id(dt: str) -> str:
    """A fresh run id for partition ``dt``: ``YYYYMMDDTHHMMSS-<8 hex>`` for a day,
    ``YYYYMMDDhHHTHHMMSS-<8 hex>`` for an hour (UTC start time, random suffix)."""
    return f"{F.compact(dt)}T{_dt.datetime.now(_dt.UTC).strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}"


def sum_timings(st: Store) -> dict[str, float]:
    """Sum the per-batch timing records; ``moderator_window`` spans the first to the last
    Moderator batch (steady-state throughput, without cluster and actor start-up)."""
    tot: dict[str, float] = {}
    t0, t1 = float("inf"), 0.0
    for k in st.list():
        try:
            rec = json.loads(st.read_text(k))
        except Exception:  # a half-written record of a killed actor: the summary goes on without it
            log.warning("timing record %s unreadable; left out of the run's timings and survivor count", k,
                        exc_info=True)
            continue
        if "t_start" in rec:
            t0, t1 = min(t0, rec["t_start"]), max(t1, rec["t_end"])
        for name, s in rec.get("seconds", {}).items():
            tot[name] = tot.get(name, 0.0) + float(s)
        for name in ("survivors", "decoded"):
            if name in rec:
                tot[name] = tot.get(name, 0) + rec[name]
        if k.startswith("decode-"):  # a decode task's record: the uploads it read and decoded
            tot["decode_rows"] = tot.get("decode_rows", 0) + rec.get("rows", 0)
    if t1 > t0:
        tot["moderator_window"] = t1 - t0
    return tot


@dataclass
class RunPlan:
    """Everything :func:`prepare_run` checked and decided; :func:`execute_run` carries it out."""

    dt: str
    run_id: str
    input: InputPlan
    gallery_uri: str
    gallery_version: str      # pinned: actors and the review page load exactly this version
    model_dir: str | None
    model_version: str
    cfg: JobConfig
    decode: DecodeConfig
    out: Store
    output_uri: str
    t_start: float
    resume: Resume            # the stage this run works in, and the chunks it may skip
    chunks: Chunks            # the input plan's readable keys in chunks of [job] chunk_size
    signatures: Store | None = None   # the signatures root (None: [job] write_signatures = false)

    @property
    def folder(self) -> str:
        """This run's attempt folder in its stage (the same key under the signatures root)."""
        return attempt_key(self.resume.stage, self.run_id)


def _check_gallery(gallery_uri: str, model_version: str, verify: bool, cache: str | None = None) -> str:
    """Resolve ``CURRENT`` once, from the manifest only, and check it before Ray starts: the
    model it was built with and (``verify``) every file's checksum, streamed. With a node cache
    (``cache``, :meth:`JobConfig.node_cache`), verifying is filling this node's cache, which
    streams every file through sha256 once; the actors on this node then attach to it. -> pinned version."""
    from pipeline import gallery as G

    try:
        store = open_store(gallery_uri)
        m = G.resolve_version(store, model_id=model_version)
        if verify and cache is not None:
            from pipeline.gallery.nodecache import NodeCache

            try:
                NodeCache(None if cache == "node" else cache).attach(store, m.version)
            except G.GalleryIntegrityError as e:
                raise G.GalleryIntegrityError(f"gallery {redact(gallery_uri)} version {m.version}: its files fail "
                                              f"verification ({plain_message(e, 300)}); refusing to run") from None
        elif verify:
            res = G.verify(store, m.version)
            if res["problems"]:
                detail = "; ".join(f"{p['file']}: {p['problem']}" for p in res["problems"][:5])
                raise G.GalleryIntegrityError(
                    f"gallery {redact(gallery_uri)} version {m.version}: {len(res['problems'])} of {res['files']} "
                    f"files fail verification ({detail}); refusing to run")
    except (ValueError, OSError) as e:
        if isinstance(e, ModscanError):
            raise
        raise ModscanError(f"gallery {redact(gallery_uri)} cannot be read: {plain_message(e, 300)}") from None
    return m.version


def check_output(output_uri: str) -> Store:
    """The output root, created if absent; refused when it is a file or its bucket does not exist."""
    try:
        if output_uri.startswith("s3://"):
            out = open_store(output_uri)
            bucket = out.root.split("/", 1)[0]
            if out.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ModscanError(f"output bucket s3://{bucket} does not exist")
            if out.fs.get_file_info(out.root).type == pafs.FileType.File:
                raise ModscanError(f"--output {redact(output_uri)} is an object, not a prefix")
            return out
        path = output_uri[len("file://"):] if output_uri.startswith("file://") else output_uri
        if os.path.exists(path) and not os.path.isdir(path):
            raise ModscanError(f"--output {output_uri} is a file, not a folder")
        return open_store(output_uri, create=True)
    except ValueError as e:
        raise UsageError(f"--output {output_uri!r}: {e}") from None
    except OSError as e:
        raise ModscanError(f"--output {redact(output_uri)} cannot be used: {plain_message(e, 300)}") from None


def _decision_settings(cfg: JobConfig, decode: DecodeConfig) -> dict[str, Any]:
    """The job settings a flag row depends on (beyond the input, model and gallery version): a
    rerun with other values starts over rather than mix rows decided two ways."""
    return {"query": asdict(cfg.query_overrides()), "decode": asdict(decode), "precision": cfg.precision,
            "write_signatures": cfg.write_signatures}


def _open_resume(out: Store, dt: str, run_id: str, plan_in: InputPlan, chunks: Chunks, settings: dict[str, Any],
                 versions: tuple[str, str], restart: bool) -> Resume:
    """Sweep killed runs' staging of other partitions, make this run the owner of ``dt``, then join
    the stage a killed run of ``dt`` left with the same fingerprint (or open a new one). Claimed
    first, so that a run of ``dt`` with staging that does not own ``dt`` has been superseded for
    good (what the cleanup after a commit relies on)."""
    F.sweep_staging(out, keep=run_id)  # killed runs of other partitions, older than an hour
    F.claim_partition(out, dt, run_id)
    fp = Fingerprint(dt, plan_digest(plan_in.kind, plan_in.keys, plan_in.read_uris, plan_in.forbidden),
                     len(plan_in.keys), chunks.size, versions[0], versions[1], settings_digest(settings))
    return open_stage(out, fp, run_id, restart)


def prepare_run(input_uri: str, gallery_uri: str, output_uri: str, dt: str, model_dir: str | None = None,
                cfg: JobConfig | None = None, run_id: str | None = None,
                signatures_uri: str | None = None, restart: bool = False, allow_mixed_day: bool = False) -> RunPlan:
    """Every check that needs no cluster: partition (a day, or an hour ``YYYY-MM-DDTHH``), config,
    input (listed or manifest read: every row decided), model, gallery (version pinned), output
    (created; a day and its hours are not mixed unless ``allow_mixed_day``; this run made owner of
    the partition, the stage of a killed run joined unless ``restart``). Raises
    :class:`~pipeline.errors.ModscanError`."""
    t_start = time.time()
    dt = F.valid_partition(dt, "date")
    cfg = cfg or JobConfig()
    plan_in = check_input(input_uri, allowed_prefixes=cfg.allowed_input_prefixes,
                          image_extensions_only=cfg.image_extensions_only, allow_empty=cfg.allow_empty_input)
    from models.card import read_card  # imports torch: after the cheap checks

    try:
        card = read_card(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModscanError(f"model {model_dir or '(shipped)'} cannot be read: {plain_message(e, 300)}") from None
    version = _check_gallery(gallery_uri, card.version_id, cfg.verify_gallery, cfg.node_cache())
    out = check_output(output_uri)
    check_mixed_day(out, dt, allow_mixed_day)
    sig = check_output(signatures_root(output_uri, signatures_uri)) if cfg.write_signatures else None
    run_id = run_id or new_run_id(dt)
    decode_cfg = DecodeConfig.for_model(card.config, base=cfg.decode)
    chunks = Chunks.of_keys(plan_in.keys, cfg.chunk_size)
    resume = _open_resume(out, dt, run_id, plan_in, chunks, _decision_settings(cfg, decode_cfg),
                          (card.version_id, version), restart)
    if sig is not None:
        F.sweep_staging(sig, keep=run_id)
        F.claim_partition(sig, dt, run_id)
        mark_started(sig, attempt_key(resume.stage, run_id))
    return RunPlan(dt, run_id, plan_in, gallery_uri, version, model_dir, card.version_id, cfg, decode_cfg, out,
                   output_uri, t_start, resume, chunks, sig)


def _run_chunks(plan: RunPlan, progress: ChunkProgress, ray_address: str | None,
                moderator: type[Moderator]) -> dict[str, Any]:
    """Ray part: read -> decode -> ``moderator`` actors, for the keys of the chunks still to run;
    each chunk is recorded as soon as every key of it has its staged row. -> resources."""
    from pipeline.moderation.moderator import RunContext

    cfg, out, todo = plan.cfg, plan.out, set(progress.counts)
    init_ray(ray_address)
    res = actor_resources(cfg)
    timings_uri = out.full_uri(f"{plan.folder}/timings")
    ctx = RunContext(plan.dt, plan.run_id, timings_uri, signatures_uri=(
        staging_data_uri(plan.signatures, plan.run_id, plan.folder) if plan.signatures else None))
    actor_kwargs = {"gallery_uri": plan.gallery_uri, "model_dir": plan.model_dir, "ctx": ctx,
                    "overrides": cfg.query_overrides(), "gallery_version": plan.gallery_version,
                    "precision": cfg.precision, "chunk_data_uri": out.full_uri(f"{plan.folder}/data"),
                    "gallery_cache": cfg.node_cache()}
    todo_input = plan.input.readable(lambda k: plan.chunks.of(k) in todo)

    def consume(batch: dict[str, Any]) -> None:
        for c, f, n in zip(batch["chunk"], batch["file"], batch["rows"]):
            progress.add(int(c), str(f), int(n))

    with shard_servers(cfg, plan.gallery_uri, plan.gallery_version) as servers:  # [job] gallery_shard_servers
        stream_batches(decode_and_apply(build_input(todo_input, cfg, len(todo)), chunked(moderator),
                                        {**actor_kwargs, "gallery_servers": servers}, cfg, res, plan.decode,
                                        timings_uri, chunks=plan.chunks), consume)
    if progress.unfinished():
        raise F.CommitError(f"run {plan.run_id}: chunks {progress.unfinished()[:5]} did not get a row for every key")
    return res.to_dict()


def _run_pipeline(plan: RunPlan, ray_address: str | None,
                  moderator: type[Moderator]) -> tuple[float, dict[str, Any], dict[int, ChunkRecord], list[str]]:
    """The chunks still to run (:func:`_run_chunks`), then the forbidden keys' rows, written by the
    driver. -> (seconds, resources, the record of every chunk, every staged file this run
    publishes: the chunks' in chunk order, those rows last)."""
    out, t_read = plan.out, time.time()
    todo = {c: n for c, n in enumerate(plan.chunks.counts) if c not in plan.resume.done}
    progress = ChunkProgress(out, plan.resume.stage, plan.run_id, todo,
                             lambda: F.check_owner(out, plan.dt, plan.run_id))  # a superseded run records nothing
    resources = _run_chunks(plan, progress, ray_address, moderator) if todo else {}
    records = {**plan.resume.done, **progress.done}
    files = [f for c in sorted(records) for f in records[c].files]
    if plan.input.forbidden:
        from pipeline.schemas import ErrorCode, error_rows

        keys = [k for k, _ in plan.input.forbidden]
        files.append(F.write_staged(out, plan.run_id, "forbidden-keys.parquet", error_rows(
            keys, [ErrorCode.FORBIDDEN_KEY.value] * len(keys), [reason for _, reason in plan.input.forbidden],
            model_version=plan.model_version, gallery_version=plan.gallery_version, run_id=plan.run_id),
            folder=plan.folder))
    return time.time() - t_read, resources, records, files


def _fail(plan: RunPlan, e: Exception) -> NoReturn:
    """Clean up after a failed run and raise what the operator should read: that a newer run of
    the partition took it over, the ModscanError an actor or task raised, or ``e``. A run that
    still owns its partition keeps its stage: the rerun resumes from its recorded chunks."""
    try:
        taken = F.taken_error(plan.out, plan.dt, plan.run_id)
    except Exception:  # the run's own failure is what gets raised; this one must still leave a trace
        log.warning("run %s: could not check who owns dt=%s after the failure", plan.run_id, plan.dt, exc_info=True)
        taken = None
    if taken is not None:  # superseded: what it staged and recorded is the new owner's to use or remove
        for st in (plan.out, plan.signatures):
            if st is not None:
                F.remove_own_attempt(st, plan.resume.stage, plan.run_id, plan.folder, records=plan.out)
        if not isinstance(e, F.PartitionTakenError):
            raise taken from e
    raise_worker_error(e)


def _resume_info(plan: RunPlan, timings: dict[str, float]) -> dict[str, Any]:
    """``_run.json``'s ``resume``: the chunks, those finished before this run, and what this run decoded."""
    r = plan.resume
    return {"chunks_total": len(plan.chunks), "chunks_done_before": len(r.done),
            "chunks_run": len(plan.chunks) - len(r.done), "images_decoded": int(timings.pop("decode_rows", 0)),
            "chunk_size": plan.chunks.size, "stage": r.stage, "started_over": r.started_over, "restart": r.restart,
            "resumed_runs": sorted({rec.run_id for rec in r.done.values()})}


def _run_info(plan: RunPlan, moderator: type[Moderator], t_pipeline: float, resources: dict[str, Any],
              counts: dict[str, Any], flood: FloodReport) -> dict[str, Any]:
    """The ``_run.json`` content of a verified run: what was read, counted and timed, and how."""
    out, cfg, n = plan.out, plan.cfg, plan.input.rows
    timings = sum_timings(out.child(f"{plan.folder}/timings")) if out.exists(f"{plan.folder}/timings") else {}
    resume = _resume_info(plan, timings)
    day, hour = F.split_partition(plan.dt)
    run_info = {
        "run_id": plan.run_id, "dt": day, "hour": hour, "partition": F.partition_key(plan.dt),
        "input": redact(plan.input.uri), "gallery": redact(plan.gallery_uri),
        "output": redact(plan.output_uri), "model_version": plan.model_version,
        "gallery_version": plan.gallery_version, "inputs": n, "skipped": plan.input.skipped_counts(),
        "skipped_examples": {r: names[:5] for r, names in sorted(plan.input.skipped.items()) if names},
        "counts": counts, "survivors": int(timings.pop("survivors", 0)), "decoded": int(timings.pop("decoded", 0)),
        "steady_state_images_per_second": (round(resume["images_decoded"] / timings["moderator_window"], 2)
                                           if timings.get("moderator_window") else None),
        "stage_seconds_summed_over_workers": {k: round(v, 3) for k, v in timings.items()},
        "pipeline_seconds": round(t_pipeline, 3), "wall_seconds": round(time.time() - plan.t_start, 3),
        "images_per_second": round(resume["images_decoded"] / t_pipeline, 2) if t_pipeline > 0 else None,
        "resources": resources, "moderator": f"{moderator.__module__}.{moderator.__qualname__}",
        # a Pushgateway URL may hold a password
        "config": json.loads(redact(json.dumps(asdict(cfg), default=str))),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "flood_guard": flood.to_dict(), "resume": resume,
    }
    counts.pop("files", None)
    return run_info


def _signature_info(run_info: dict[str, Any]) -> dict[str, Any]:
    """The ``_run.json`` of a signature partition: the run's identity and the signatures' counts."""
    keep = ("run_id", "dt", "hour", "partition", "input", "gallery", "output", "model_version", "gallery_version",
            "inputs", "finished_at")
    return {**{k: run_info[k] for k in keep}, **run_info["signatures"]}


def _verify(plan: RunPlan, records: dict[int, ChunkRecord],
            files: list[str]) -> tuple[FloodReport, list[str], dict[str, Any], list[str], dict | None]:
    """Flood guard, then the checks before anything is published: exactly one row per input key
    over the files of every chunk, and (with signatures) one signature per searched upload over
    the signature files of those chunks. -> (flood report, flag files, counts, signature files, their counts)."""
    out, run_id = plan.out, plan.run_id
    F.check_owner(out, plan.dt, run_id)  # a newer run took over: say so before anything else
    # held rows are rewritten into copies: the staged chunks stay as the Moderator wrote them for a rerun
    flood, files = guard_files(out, files, plan.cfg.max_matches_per_reference, rewrite_into=f"{plan.folder}/held")
    all_keys = set(plan.input.keys) | {k for k, _ in plan.input.forbidden}
    counts = F.verify_staged(out, run_id, plan.input.rows, all_keys, plan.gallery_version, files=files)
    if plan.signatures is None:
        return flood, files, counts, [], None
    folders = {r.run_id: attempt_key(plan.resume.stage, r.run_id) for r in records.values()}
    sig_files = select_signature_files(plan.signatures, folders, {c: r.run_id for c, r in records.items()},
                                       plan.chunks.of)
    sig_counts = verify_signatures(plan.signatures, run_id, searched_keys(out, run_id, files), files=sig_files)
    return flood, files, counts, sig_files, sig_counts


def execute_run(plan: RunPlan, ray_address: str | None = None, review: bool = True,
                moderator: type[Moderator] | None = None) -> dict[str, Any]:
    """Run the chunks still to run, verify and commit. Returns the ``_run.json`` content.

    ``moderator``: the actor class (default :class:`~pipeline.moderation.moderator.Moderator`); the
    benchmarks pass a subclass for their baselines, tests one that fails; it is recorded in
    ``_run.json`` as ``moderator``."""
    from pipeline.moderation.moderator import Moderator

    moderator = moderator or Moderator
    cfg, out, run_id, dt, stage = plan.cfg, plan.out, plan.run_id, plan.dt, plan.resume.stage
    try:
        t_pipeline, resources, records, files = _run_pipeline(plan, ray_address, moderator)
        flood, files, counts, sig_files, sig_counts = _verify(plan, records, files)
    except Exception as e:
        _fail(plan, e)
    run_info = _run_info(plan, moderator, t_pipeline, resources, counts, flood)
    try:
        if plan.signatures is not None:  # first: a committed flags partition always has its signatures
            run_info["signatures"] = {"uri": redact(plan.signatures.uri), **(sig_counts or {})}
            F.commit_partition(plan.signatures, dt, run_id, _signature_info(run_info), schema=SIGNATURE_SCHEMA,
                               folder=plan.folder, files=sig_files, clean_up=False)
        F.commit_partition(out, dt, run_id, run_info, folder=plan.folder, files=files, stage=stage)
    except Exception as e:
        _fail(plan, e)
    if plan.signatures is not None:  # kept until the flags were committed: a rerun resumes with them
        F.clean_up_after_commit(plan.signatures, dt, run_id, stage, plan.folder)
    try:  # after the commit: "last success" must never be reported for an uncommitted run
        run_info["metrics"] = publish_metrics(run_info, cfg.metrics_textfile, cfg.metrics_pushgateway)
    except (OSError, MetricsPushError) as e:
        run_info["metrics_error"] = redact(f"{type(e).__name__}: {e}")
    if review:
        try:
            from pipeline.ops.review_page import write_review

            run_info["review"] = write_review(out, dt, run_id, plan.input.uri, plan.gallery_uri,
                                              max_rows=cfg.review_max_rows, gallery_version=plan.gallery_version)
        except Exception as e:
            run_info["review_error"] = redact(plain_message(e))
    return run_info


def moderate(input_uri: str, gallery_uri: str, output_uri: str, dt: str, model_dir: str | None = None,
             cfg: JobConfig | None = None, ray_address: str | None = None, review: bool = True,
             run_id: str | None = None, moderator: type[Moderator] | None = None,
             signatures_uri: str | None = None, restart: bool = False, allow_mixed_day: bool = False) -> dict[str, Any]:
    """Run one partition, a day or an hour ``YYYY-MM-DDTHH``: :func:`prepare_run` then
    :func:`execute_run` (``moderator``: the actor class, default
    :class:`~pipeline.moderation.moderator.Moderator`; ``signatures_uri``: default
    ``OUTPUT/_signatures``; ``restart``: never resume a killed run's chunks; ``allow_mixed_day``:
    write a day next to its hours, or an hour next to its day). Returns the ``_run.json`` content."""
    plan = prepare_run(input_uri, gallery_uri, output_uri, dt, model_dir, cfg, run_id, signatures_uri, restart,
                       allow_mixed_day)
    return execute_run(plan, ray_address, review, moderator)


def summary(info: dict[str, Any]) -> str:
    """The lines ``modscan moderate`` prints for a finished run (its ``_run.json`` content)."""
    c = info["counts"]
    lines = [
        f"modscan: {info.get('partition') or 'dt=' + info['dt']} run={info['run_id']} model={info['model_version']} "
        f"gallery={info['gallery_version']}",
        f"  {info['inputs']} uploads -> {c['rows']} rows in {info['wall_seconds']:.1f}s "
        f"({info['images_per_second']} images/s in the pipeline); {info['survivors']} went to the 512-d rerank",
        f"  status: {json.dumps(c['by_status'])}  action: {json.dumps(c['by_action'])}",
    ]
    r = info.get("resume") or {}
    if r.get("chunks_done_before"):
        lines.append(f"  resumed: {r['chunks_done_before']} of {r['chunks_total']} chunks were done by "
                     f"{', '.join(r['resumed_runs'])}; this run ran {r['chunks_run']} and decoded {r['images_decoded']} uploads")
    if r.get("started_over"):
        lines.append(f"  started over, not resumed: {r['started_over']}")
    if c["by_error_code"]:
        lines.append(f"  errors: {json.dumps(c['by_error_code'])}")
    if info.get("skipped"):
        examples = "; ".join(f"{r}: {', '.join(v)}" for r, v in info.get("skipped_examples", {}).items())
        lines.append(f"  listed but given no row: {json.dumps(info['skipped'])} (e.g. {examples})")
    if c.get("by_bank"):
        lines.append(f"  banks: {json.dumps(c['by_bank'])}")
    lines += flood_summary_lines(info.get("flood_guard"))
    if info.get("metrics_error"):
        lines.append(f"  metrics NOT written: {info['metrics_error']}")
    if info.get("review"):
        lines.append(f"  review page: {info['review']}")
    if info.get("review_error"):
        lines.append(f"  review page failed (flags are committed): {info['review_error']}")
    return "\n".join(lines)


