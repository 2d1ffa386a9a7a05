"""The moderation job: uploads of one day -> decode -> cascade -> one committed flags partition.

Wiring only: the stages live in ``pipeline/`` and are plain classes. ``moderate`` is what
``modscan moderate``, ``nightly``, ``backfill``, ``demo`` and the benchmarks call. It runs in two
named steps: :func:`prepare_run` checks everything that needs no cluster (date, config, input,
model, gallery, output) and pins the gallery version; :func:`execute_run` starts Ray, runs the
pipeline and commits the partition.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import posixpath
import re
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pyarrow.fs as pafs

from pipeline.errors import ConfigFileError, InputError, MissingInput, ModscanError, UsageError, plain_message, toml_error_line
from pipeline.ingest.decode import DecodeConfig, Decoder
from pipeline.ingest.storage import ForbiddenKey, KeyPolicy, Store, open_store, redact, split_uri
from pipeline.moderation import flags as F
from pipeline.moderation.floodguard import guard_staged
from pipeline.moderation.floodguard import summary_lines as flood_summary_lines
from pipeline.ops.prometheus import MetricsPushError
from pipeline.ops.prometheus import publish as publish_metrics

if TYPE_CHECKING:
    from pipeline.moderation.moderator import Moderator

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv")
from models.preprocess import IMAGE_SUFFIXES  # noqa: E402  (the one list)

# The only listed objects that get no row: commit markers of this and other batch jobs, and
# folder placeholders / OS metadata that are never uploads. Anything else (``_DSC0001.JPG``,
# ``.hidden.jpg``) is an upload and gets a row; skipped names are counted in ``_run.json``.
MARKER_NAMES = ("_SUCCESS", "_run.json", ".DS_Store", ".keep", ".gitkeep")
KEY_COLUMNS = ("key", "image_key", "uri")


@dataclass(frozen=True)
class JobConfig:
    """Resources and sizes of the job. Defaults suit a 2-core machine; see configs/moderate.toml.

    ``actors = 0`` means: one actor per GPU on a GPU cluster, else one actor per 2 CPUs (min 1).
    ``actor_num_cpus`` is fractional on small machines: an actor pool that claims every CPU starves
    the read/decode tasks and the job stalls without an error.

    Values are checked when the config is built (:class:`~pipeline.errors.UsageError`, exit 2), so
    a bad value fails before Ray starts; :meth:`from_toml` reports each one at its line.
    ``torch_threads`` is each actor's ``torch.set_num_threads``; 0 picks min(4, cluster CPUs //
    actors), at least 1, for CPU actors and 2 for GPU actors. ``test_fail_keys`` is for tests only
    (fault injection: the Moderator raises on a batch holding one of these keys); it cannot be set
    from a TOML file.
    """

    batch_size: int = 64
    actors: int = 0
    actor_num_cpus: float = 0.5
    decode_num_cpus: float = 0.5
    torch_threads: int = 0           # per actor; 0: CPU actors min(4, cluster CPUs // actors), GPU actors 2
    image_extensions_only: bool = False  # prefix input: skip keys without an image extension
    allow_empty_input: bool = False  # an input with nothing to moderate fails the run unless true
    allowed_input_prefixes: tuple[str, ...] = ()  # manifests: where absolute paths / URIs may point
    verify_gallery: bool = True      # driver streams every gallery file through sha256 before Ray starts
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    coarse_threshold: float | None = None   # None: the gallery manifest's (= the model card's)
    fine_threshold: float | None = None
    rerank_k: int | None = None
    review_max_rows: int = 200
    precision: str = "auto"          # model trunk: auto (bf16 on CUDA / native-bf16 CPUs, else fp32) | bf16 | fp32
    coarse_nprobe: int | None = None     # ivf coarse index: lists searched (None: the gallery manifest's)
    coarse_ef_search: int | None = None  # hnsw coarse index: search breadth (None: the gallery manifest's)
    max_matches_per_reference: int = 1000  # flood guard: more matches in one run -> action review (0: off)
    metrics_textfile: str | None = None    # node-exporter textfile (*.prom) written after each commit
    metrics_pushgateway: str | None = None  # Pushgateway base URL; metrics PUT after each commit
    test_fail_keys: tuple[str, ...] = ()  # TEST ONLY: the Moderator raises on batches with these keys

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(f"[job] {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        need(is_int(self.actors) and self.actors >= 0, f"actors must be an integer >= 0, got {self.actors!r}")
        for name in ("actor_num_cpus", "decode_num_cpus"):
            v = getattr(self, name)
            need(is_num(v) and v > 0, f"{name} must be a number > 0, got {v!r}")
        need(self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("coarse_nprobe", "coarse_ef_search"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 1), f"{name} must be an integer >= 1, got {v!r}")
        need(is_int(self.torch_threads) and self.torch_threads >= 0,
             f"torch_threads must be an integer >= 0, got {self.torch_threads!r}")
        need(is_int(self.review_max_rows) and self.review_max_rows >= 0,
             f"review_max_rows must be an integer >= 0, got {self.review_max_rows!r}")
        for name in ("image_extensions_only", "allow_empty_input", "verify_gallery"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("coarse_threshold", "fine_threshold"):
            v = getattr(self, name)
            need(v is None or (is_num(v) and -1.0 <= v <= 1.0), f"{name} must be a cosine in [-1, 1], got {v!r}")
        need(self.rerank_k is None or (is_int(self.rerank_k) and self.rerank_k >= 1),
             f"rerank_k must be an integer >= 1, got {self.rerank_k!r}")
        need(is_int(self.max_matches_per_reference) and self.max_matches_per_reference >= 0,
             f"max_matches_per_reference must be an integer >= 0, got {self.max_matches_per_reference!r}")
        for name in ("metrics_textfile", "metrics_pushgateway"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, str) and v != ""), f"{name} must be a non-empty string, got {v!r}")
        need(isinstance(self.decode, DecodeConfig), f"decode must be a [job.decode] table, got {self.decode!r}")
        prefixes = self.allowed_input_prefixes
        need(isinstance(prefixes, (list, tuple)) and all(isinstance(x, str) for x in prefixes),
             f"allowed_input_prefixes must be a list of strings, got {prefixes!r}")
        for x in prefixes:
            try:
                KeyPolicy.canonical(x)
            except ValueError as e:
                raise UsageError(f"[job] {e}") from None
        object.__setattr__(self, "allowed_input_prefixes", tuple(prefixes))
        object.__setattr__(self, "test_fail_keys", tuple(self.test_fail_keys))

    @classmethod
    def from_toml(cls, path: str | None, **overrides: Any) -> JobConfig:
        """The ``[job]`` table of a TOML file (every key optional), with ``overrides`` (command-line
        flags; None: not given) on top. Every problem of the file is reported at its line, as
        ``FILE:LINE: message`` (:class:`JobConfigError`, exit 2), before anything runs."""
        d = read_job_table(path) if path else {}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def threshold_overrides(self) -> dict[str, float]:
        """The thresholds this config sets over the gallery manifest's (job and ``lookup`` alike)."""
        return {k: v for k, v in {"coarse": self.coarse_threshold, "fine": self.fine_threshold,
                                  "rerank_k": self.rerank_k}.items() if v is not None}


class JobConfigError(ConfigFileError):
    """All problems of a job config file, each as ``file:line: message`` (like bank files), in line order."""

    what = "job config"

    def __init__(self, path: str, errors: list[tuple[int, str]]) -> None:
        super().__init__(path, sorted(errors))


# Keys a [job] table no longer takes, with what replaced them.
_REMOVED_JOB_KEYS = {
    "single_stage": "the single-stage baseline is benchmark-only (`modscan bench pipeline` runs it)",
}
_MODEL_SIZES = ("low_res", "high_res")


def toml_key_lines(text: str) -> dict[str, int]:
    """First line (1-based) of each table header and key of a TOML text, by dotted path (``"job"``,
    ``"job.decode"``, ``"job.decode.min_side"``), for error messages. Knows ``[table]`` and
    ``[[array]]`` headers and bare, quoted and dotted keys; lines inside multi-line values that
    look like ``key = ...`` may be taken for keys (only a line number can be off, never a value)."""
    def path(raw: str) -> str:
        return ".".join(p.strip().strip("\"'") for p in raw.split("."))

    where: dict[str, int] = {}
    table = ""
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        head = re.match(r"^\[\[?([^\[\]]+)\]\]?", s)
        key = re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", s)
        if head:
            table = path(head.group(1))
            where.setdefault(table, i)
        elif key:
            parts = (table.split(".") if table else []) + path(key.group(1)).split(".")
            for n in range(1, len(parts) + 1):
                where.setdefault(".".join(parts[:n]), i)
    return where


def read_job_table(path: str) -> dict[str, Any]:
    """The checked ``[job]`` table of a config file (``decode`` as a :class:`DecodeConfig`).

    Raises :class:`~pipeline.errors.UsageError` for a missing file and :class:`JobConfigError`
    listing every problem with its line: TOML syntax, unknown tables and keys, wrong types and
    ranges (each value is checked by the same code as :class:`JobConfig` and :class:`DecodeConfig`),
    and ``low_res``/``high_res`` in ``[job.decode]``, which come from the model card."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot be read: {plain_message(e, 300)}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobConfigError(path, [(toml_error_line(e, 1), f"TOML syntax: {e}")]) from None
    where = toml_key_lines(text)

    def line(*keys: str) -> int:
        for k in keys:
            if k in where:
                return where[k]
        return 1

    errors: list[tuple[int, str]] = []
    for k in sorted(set(doc) - {"job"}):
        errors.append((line(k), f"unknown top-level key {k!r} (expected a [job] table)"))
    job = doc.get("job", {})
    if not isinstance(job, dict):
        raise JobConfigError(path, errors + [(line("job"), "job must be a [job] table")])
    known = sorted(f.name for f in fields(JobConfig) if f.name not in ("test_fail_keys", "decode"))
    for k, v in job.items():
        at = line(f"job.{k}", "job")
        if k == "decode":
            continue
        if k in _REMOVED_JOB_KEYS:
            errors.append((at, f"[job] {k} was removed: {_REMOVED_JOB_KEYS[k]}"))
        elif k not in known:
            errors.append((at, f"[job] unknown key {k!r} (known: {', '.join(known + ['[job.decode]'])})"))
        else:
            try:
                JobConfig(**{k: v})  # the same checks as a JobConfig built in code, one key at a time
            except UsageError as e:
                errors.append((at, str(e)))
    decode = job.get("decode", {})
    if not isinstance(decode, dict):
        errors.append((line("job.decode", "job"), f"[job] decode must be a [job.decode] table, got {decode!r}"))
        decode = {}
    dknown = sorted(f.name for f in fields(DecodeConfig) if f.name not in _MODEL_SIZES)
    for k, v in decode.items():
        at = line(f"job.decode.{k}", "job.decode", "job")
        if k in _MODEL_SIZES:
            errors.append((at, f"[job.decode] {k} cannot be set: the decode sizes come from the model card "
                               f"(the sizes the model was trained at; `modscan card` shows them)"))
        elif k not in dknown:
            errors.append((at, f"[job.decode] unknown key {k!r} (known: {', '.join(dknown)})"))
        else:
            try:
                DecodeConfig(**{k: v})
            except ValueError as e:
                errors.append((at, f"[job.decode] {e}"))
    if errors:
        raise JobConfigError(path, errors)
    out = {k: v for k, v in job.items() if k != "decode"}
    if "decode" in job:
        out["decode"] = DecodeConfig(**decode)
    return out


# --------------------------------------------------------------------------------------------
# Ray plumbing
# --------------------------------------------------------------------------------------------
def init_ray(address: str | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
        if not addr:
            kwargs["include_dashboard"] = False
            # Workers inherit this environment (S3 endpoint, credentials, thread caps).
        ray.init(address=addr, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # Progress: in a terminal, plain tqdm bars on the driver's stderr (Ray's default distributed
    # tqdm drew nothing there); otherwise Ray Data logs a progress block every few seconds, which
    # is what a scheduler's or `ray job logs`' reader wants.
    ctx.enable_progress_bars = True
    ctx.use_ray_tqdm = False


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
        except Exception:  # the rows are what matters; a lost record only thins the timing summary
            log.warning("could not write a decode timing record under %s", redact(timings_uri), exc_info=True)
    return out


def _relkey_fn(root: str):
    def relkey(batch: dict[str, Any]) -> dict[str, Any]:
        keys = [posixpath.relpath(str(p), root) for p in batch["path"]]
        return {"image_key": np.asarray(keys, dtype=object), "bytes": batch["bytes"],
                "read_error": np.asarray([None] * len(keys), dtype=object)}
    return relkey


# --------------------------------------------------------------------------------------------
# Inputs: decided by the driver, before Ray starts
# --------------------------------------------------------------------------------------------
@dataclass
class InputPlan:
    """What a run reads: one flag row per entry of ``keys`` and of ``forbidden``, nothing else.

    ``read_uris[i]`` is what is read for ``keys[i]`` (prefix input: a path in ``store``; manifest:
    a URI or local path the :class:`~pipeline.ingest.storage.KeyPolicy` allowed). ``forbidden`` keys
    become ``forbidden_key`` rows written by the driver and are never read. ``skipped`` holds the
    listed names that get no row (:data:`MARKER_NAMES`, or non-image names with
    ``image_extensions_only``), by reason.
    """

    uri: str
    kind: str                                   # "prefix" | "manifest"
    keys: list[str]
    read_uris: list[str]
    forbidden: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    store: Store | None = None                  # prefix input: the listed store
    policy: KeyPolicy | None = None             # manifest input

    @property
    def rows(self) -> int:
        return len(self.keys) + len(self.forbidden)

    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in sorted(self.skipped.items()) if names}


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def read_manifest_keys(uri: str) -> list[str]:
    """Keys from a Parquet/CSV manifest: column ``key`` (or ``image_key``/``uri``), one per row.

    Keys are strings exactly as written (a CSV key ``007`` stays ``007``: no type inference). A
    blank, null or whitespace-padded key, a control character or a duplicate refuses the whole
    manifest with every bad line numbered (CSV: the header is line 1; Parquet: row numbers from
    1): a job that silently drops rows would report success for uploads it never looked at.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    st, name = split_uri(uri)
    try:
        if not st.exists(name):
            raise MissingInput(f"manifest {redact(uri)} does not exist")
        csv = name.lower().endswith(".csv")
        if csv:
            with st.fs.open_input_stream(st.path(name)) as f:
                table = pacsv.read_csv(
                    f, parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                    convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in KEY_COLUMNS},
                                                         strings_can_be_null=False, quoted_strings_can_be_null=False))
        else:
            with st.fs.open_input_file(st.path(name)) as f:
                table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise MissingInput(f"manifest {redact(uri)} does not exist") from None
        raise InputError(f"manifest {redact(uri)} cannot be read: {plain_message(e, 300)}") from None
    col = next((c for c in KEY_COLUMNS if c in table.column_names), None)
    if col is None:
        raise InputError(f"manifest {redact(uri)} needs a column 'key' (or 'image_key' / 'uri'); "
                         f"has {table.column_names}")
    arr = table.column(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_integer(arr.type):
        arr = arr.cast(pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise InputError(f"manifest {redact(uri)}: column {col!r} has type {arr.type}; keys must be strings")
    keys = arr.to_pylist()
    where = (lambda i: i + 2) if csv else (lambda i: i + 1)
    unit = "line" if csv else "row"
    bad: dict[str, list[str]] = {}
    first_seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        problem = None
        if k is None or not k.strip():
            problem = "blank key"
        elif k != k.strip():
            problem = "key with leading or trailing whitespace"
        elif any(ord(c) < 32 or ord(c) == 127 for c in k):
            problem = "key with a control character"
        elif k in first_seen:
            problem = f"duplicate of {unit} {where(first_seen[k])}"
        else:
            first_seen[k] = i
        if problem:
            bad.setdefault(problem, []).append(str(where(i)))
    if bad:
        n = sum(len(v) for v in bad.values())
        detail = "; ".join(f"{problem} at {unit}{'s' if len(v) > 1 else ''} {', '.join(v)}" for problem, v in bad.items())
        raise InputError(f"manifest {redact(uri)} refused, {n} bad key{'s' if n > 1 else ''}: {detail}")
    return keys


def _open_input_store(uri: str) -> Store:
    """The input folder or prefix; :class:`MissingInput` when it (or its bucket) does not exist."""
    try:
        st = open_store(uri)
    except ValueError as e:
        raise UsageError(f"--input {uri!r}: {e}") from None
    try:
        kind = st.fs.get_file_info(st.root).type
        if kind == pafs.FileType.NotFound:
            if uri.startswith("s3://"):
                bucket = st.root.split("/", 1)[0]
                if st.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise MissingInput(f"input bucket s3://{bucket} does not exist")
                raise MissingInput(f"input prefix {redact(uri)} does not exist (no object under it)")
            raise MissingInput(f"input folder {uri} does not exist")
    except OSError as e:
        raise InputError(f"input {redact(uri)} cannot be read: {plain_message(e, 300)}") from None
    if kind == pafs.FileType.File:
        raise InputError(f"input {redact(uri)} is a file, not a folder or prefix "
                         f"(a manifest must end in {' or '.join(MANIFEST_SUFFIXES)})")
    return st


def check_input(uri: str, cfg: JobConfig) -> InputPlan:
    """List the prefix or read the manifest, and decide every row before Ray starts.

    Fails with :class:`MissingInput` when the input does not exist and with :class:`InputError`
    when it holds nothing to moderate, unless ``cfg.allow_empty_input``: for a scheduler, "the
    uploads have not landed yet" must be a failure to retry, not a committed empty day.
    """
    if _is_manifest(uri):
        keys = read_manifest_keys(uri)
        try:
            policy = KeyPolicy.for_manifest(uri, cfg.allowed_input_prefixes)
        except ValueError as e:
            raise UsageError(str(e)) from None
        plan = InputPlan(uri, "manifest", [], [], policy=policy)
        for k in keys:
            try:
                plan.read_uris.append(policy.resolve(k))
                plan.keys.append(k)
            except ForbiddenKey as e:
                plan.forbidden.append((k, str(e)))
    else:
        st = _open_input_store(uri)
        plan = InputPlan(uri, "prefix", [], [], store=st)
        try:
            listed = list(st.list())
        except OSError as e:
            raise InputError(f"input {redact(uri)} cannot be listed: {plain_message(e, 300)}") from None
        for k in listed:
            if posixpath.basename(k) in MARKER_NAMES:
                plan.skipped.setdefault("marker", []).append(k)
            elif cfg.image_extensions_only and not k.lower().endswith(IMAGE_SUFFIXES):
                plan.skipped.setdefault("not_an_image_extension", []).append(k)
            else:
                plan.keys.append(k)
                plan.read_uris.append(st.path(k))
    if plan.rows == 0 and not cfg.allow_empty_input:
        skipped = plan.skipped_counts()
        raise InputError(f"input {redact(uri)} has nothing to moderate"
                         + (f" (skipped: {json.dumps(skipped)})" if skipped else "")
                         + "; pass --allow-empty (or allow_empty_input = true) if an empty day is expected")
    return plan


def _num_blocks(n: int, cfg: JobConfig) -> int:
    """About one input block per batch (at most 200): a small day still spreads over every actor
    of the pool, and a lost node loses few blocks."""
    return max(1, min(200, -(-n // cfg.batch_size)))


def build_input(plan: InputPlan, cfg: JobConfig) -> Any:
    """Ray dataset with ``image_key, bytes, read_error`` for the readable keys of ``plan``."""
    import ray

    if plan.kind == "manifest":
        from pipeline.ingest.fetch import Fetcher

        items = [{"image_key": k, "uri": u} for k, u in zip(plan.keys, plan.read_uris)]
        ds = ray.data.from_items(items, override_num_blocks=_num_blocks(len(items), cfg))
        return ds.map_batches(Fetcher, fn_constructor_kwargs={"policy": plan.policy}, batch_size=64,
                              compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4), num_cpus=cfg.decode_num_cpus)
    assert plan.store is not None
    ds = ray.data.read_binary_files(plan.read_uris, filesystem=plan.store.fs, include_paths=True,
                                    override_num_blocks=_num_blocks(len(plan.read_uris), cfg))
    return ds.map_batches(_relkey_fn(plan.store.root), batch_size=256, num_cpus=0.1)


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def new_run_id(dt: str) -> str:
    return f"{dt.replace('-', '')}T{_dt.datetime.now(_dt.UTC).strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _sum_timings(st: Store) -> dict[str, float]:
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


def _check_gallery(gallery_uri: str, model_version: str, verify: bool) -> str:
    """Resolve ``CURRENT`` once, from the manifest only, and check it before Ray starts: the
    model it was built with and (``verify``) every file's checksum, streamed. -> pinned version."""
    from pipeline import gallery as G

    try:
        store = open_store(gallery_uri)
        m = G.resolve_version(store, model_id=model_version)
        if verify:
            res = G.verify(store, m["version"])
            if res["problems"]:
                detail = "; ".join(f"{p['file']}: {p['problem']}" for p in res["problems"][:5])
                raise G.GalleryIntegrityError(
                    f"gallery {redact(gallery_uri)} version {m['version']}: {len(res['problems'])} of {res['files']} "
                    f"files fail verification ({detail}); refusing to run")
    except (ValueError, OSError) as e:
        if isinstance(e, ModscanError):
            raise
        raise ModscanError(f"gallery {redact(gallery_uri)} cannot be read: {plain_message(e, 300)}") from None
    return m["version"]


def _check_output(output_uri: str) -> Store:
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


def prepare_run(input_uri: str, gallery_uri: str, output_uri: str, dt: str, model_dir: str | None = None,
                cfg: JobConfig | None = None, run_id: str | None = None) -> RunPlan:
    """Every check that needs no cluster: date, config, input (listed or manifest read: every row
    decided), model, gallery (version pinned), output (created, this run made owner of the
    partition). Raises :class:`~pipeline.errors.ModscanError`."""
    t_start = time.time()
    F.valid_date(dt, "date")
    cfg = cfg or JobConfig()
    plan_in = check_input(input_uri, cfg)
    from models.card import read_card  # imports torch: after the cheap checks

    try:
        card = read_card(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModscanError(f"model {model_dir or '(shipped)'} cannot be read: {plain_message(e, 300)}") from None
    version = _check_gallery(gallery_uri, card.version_id, cfg.verify_gallery)
    out = _check_output(output_uri)
    run_id = run_id or new_run_id(dt)
    F.sweep_staging(out, keep=run_id)  # killed runs of other dates, older than an hour
    out.write_text(f"{F.staging_key(run_id)}/started", str(time.time()))
    F.claim_partition(out, dt, run_id)
    decode_cfg = DecodeConfig.for_model(card.config, base=cfg.decode)
    return RunPlan(dt, run_id, plan_in, gallery_uri, version, model_dir, card.version_id, cfg, decode_cfg, out,
                   output_uri, t_start)


_REMOTE_ERROR = re.compile(r"^(pipeline\.[\w.]+)\.(\w+): (.+)$", re.MULTILINE)


def _modscan_cause(e: BaseException) -> ModscanError | None:
    """The ModscanError inside an exception Ray raised for a task or actor, if any: found in the
    exception chain, or (an actor that died in ``__init__``: Ray keeps only the text) rebuilt
    from the last ``pipeline.<module>.<Error>: message`` line of the remote traceback."""
    import importlib

    outer, seen = e, 0
    while e is not None and seen < 10:
        if isinstance(e, ModscanError) and type(e).__module__.startswith("pipeline"):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else e.__cause__
        seen += 1
    for module, name, message in reversed(_REMOTE_ERROR.findall(str(outer))):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, ModscanError):
            return cls(message.strip())
    return None


def _run_pipeline(plan: RunPlan, ray_address: str | None,
                  moderator: type[Moderator]) -> tuple[float, dict[str, Any]]:
    """Ray part: read -> decode -> ``moderator`` actors -> staged Parquet. -> (seconds, resources)."""
    from pipeline.moderation.moderator import RunContext

    cfg, out, stage = plan.cfg, plan.out, F.staging_key(plan.run_id)
    timings_uri = out.full_uri(f"{stage}/timings")
    t_read = time.time()
    resources: dict[str, Any] = {}
    if plan.input.keys:  # nothing to read (an allowed empty day, only forbidden keys): no cluster
        import ray

        init_ray(ray_address)
        actors, ncpu, ngpu, threads = _resources(cfg)
        resources = {"actors": actors, "actor_num_cpus": ncpu, "actor_num_gpus": ngpu, "torch_threads": threads}
        ds = build_input(plan.input, cfg)
        ds = ds.map_batches(_decode_batch, fn_kwargs={"cfg": plan.decode, "timings_uri": timings_uri},
                            batch_size=cfg.batch_size, num_cpus=cfg.decode_num_cpus)
        ds = ds.map_batches(
            moderator,
            fn_constructor_kwargs={"gallery_uri": plan.gallery_uri, "model_dir": plan.model_dir,
                                   "ctx": RunContext(plan.dt, plan.run_id, timings_uri), "threads": threads,
                                   "threshold_overrides": cfg.threshold_overrides() or None,
                                   "gallery_version": plan.gallery_version,
                                   "fail_on_keys": cfg.test_fail_keys, "precision": cfg.precision,
                                   "nprobe": cfg.coarse_nprobe, "ef_search": cfg.coarse_ef_search},
            batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ncpu, num_gpus=ngpu, batch_format="numpy")
        ds.write_parquet(out.path(f"{stage}/data"), filesystem=out.fs, filename_provider=None)
    if plan.input.forbidden:
        from pipeline.schemas import ErrorCode, error_rows

        keys = [k for k, _ in plan.input.forbidden]
        F.write_staged(out, plan.run_id, "forbidden-keys.parquet", error_rows(
            keys, [ErrorCode.FORBIDDEN_KEY.value] * len(keys), [reason for _, reason in plan.input.forbidden],
            model_version=plan.model_version, gallery_version=plan.gallery_version, run_id=plan.run_id))
    return time.time() - t_read, resources


def _fail(plan: RunPlan, e: Exception) -> NoReturn:
    """Clean up after a failed run and raise what the operator should read: that a newer run of
    the date took the partition over, the ModscanError an actor or task raised, or ``e``."""
    F.abandon(plan.out, plan.run_id)
    try:
        taken = F.taken_error(plan.out, plan.dt, plan.run_id)
    except Exception:  # the run's own failure is what gets raised; this one must still leave a trace
        log.warning("run %s: could not check who owns dt=%s after the failure", plan.run_id, plan.dt, exc_info=True)
        taken = None
    if taken is not None and not isinstance(e, F.PartitionTakenError):
        raise taken from e
    cause = _modscan_cause(e)
    if cause is not None and cause is not e:
        raise cause from e
    raise e


def execute_run(plan: RunPlan, ray_address: str | None = None, review: bool = True,
                moderator: type[Moderator] | None = None) -> dict[str, Any]:
    """Run the pipeline for a prepared run, verify and commit. Returns the ``_run.json`` content.

    ``moderator``: the actor class (default :class:`~pipeline.moderation.moderator.Moderator`); the benchmarks
    pass a subclass for their baselines, recorded in ``_run.json`` as ``moderator``."""
    from pipeline.moderation.moderator import Moderator

    moderator = moderator or Moderator
    cfg, out, run_id, dt = plan.cfg, plan.out, plan.run_id, plan.dt
    stage = F.staging_key(run_id)
    try:
        t_pipeline, resources = _run_pipeline(plan, ray_address, moderator)
        all_keys = set(plan.input.keys) | {k for k, _ in plan.input.forbidden}
        F.check_owner(out, dt, run_id)  # a newer run of dt took over: say so before anything else
        flood = guard_staged(out, run_id, cfg.max_matches_per_reference)  # may rewrite staged rows: before verify
        counts = F.verify_staged(out, run_id, plan.input.rows, all_keys, plan.gallery_version)
    except Exception as e:
        _fail(plan, e)
    timings = _sum_timings(out.child(f"{stage}/timings")) if out.exists(f"{stage}/timings") else {}
    n = plan.input.rows
    run_info = {
        "run_id": run_id, "dt": dt, "input": redact(plan.input.uri), "gallery": redact(plan.gallery_uri),
        "output": redact(plan.output_uri), "model_version": plan.model_version,
        "gallery_version": plan.gallery_version, "inputs": n, "skipped": plan.input.skipped_counts(),
        "skipped_examples": {r: names[:5] for r, names in sorted(plan.input.skipped.items()) if names},
        "counts": counts, "survivors": int(timings.pop("survivors", 0)), "decoded": int(timings.pop("decoded", 0)),
        "steady_state_images_per_second": (round(n / timings["moderator_window"], 2)
                                           if timings.get("moderator_window") else None),
        "stage_seconds_summed_over_workers": {k: round(v, 3) for k, v in timings.items()},
        "pipeline_seconds": round(t_pipeline, 3), "wall_seconds": round(time.time() - plan.t_start, 3),
        "images_per_second": round(n / t_pipeline, 2) if t_pipeline > 0 else None,
        "resources": resources, "moderator": f"{moderator.__module__}.{moderator.__qualname__}",
        # a Pushgateway URL may hold a password
        "config": json.loads(redact(json.dumps({k: v for k, v in asdict(cfg).items() if k != "test_fail_keys"},
                                               default=str))),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "flood_guard": flood.to_dict(),
    }
    counts.pop("files", None)
    try:
        F.commit_partition(out, dt, run_id, run_info)
    except Exception as e:
        _fail(plan, e)
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
             run_id: str | None = None, moderator: type[Moderator] | None = None) -> dict[str, Any]:
    """Run one day: :func:`prepare_run` then :func:`execute_run` (``moderator``: the actor class,
    default :class:`~pipeline.moderation.moderator.Moderator`). Returns the ``_run.json`` content."""
    plan = prepare_run(input_uri, gallery_uri, output_uri, dt, model_dir, cfg, run_id)
    return execute_run(plan, ray_address, review, moderator)


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


# --------------------------------------------------------------------------------------------
# Command-line entry points
# --------------------------------------------------------------------------------------------
def _cfg(a: argparse.Namespace) -> JobConfig:
    return JobConfig.from_toml(a.config, batch_size=a.batch_size, actors=a.actors,
                               allow_empty_input=True if getattr(a, "allow_empty", False) else None)


def _from_template(template: str, dt: str) -> str:
    try:
        return template.format(date=dt)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--input-template {template!r}: only {{date}} can be filled in ({plain_message(e)})") from None


def cli_moderate(a: argparse.Namespace) -> int:
    dt = F.valid_date(a.date, "--date")
    info = moderate(a.input, a.gallery, a.output, dt, a.model, _cfg(a), a.ray_address)
    print(summary(info))
    return 0


def yesterday() -> str:
    return (_dt.datetime.now(_dt.UTC).date() - _dt.timedelta(days=1)).isoformat()


def cli_nightly(a: argparse.Namespace) -> int:
    dt = F.valid_date(a.date, "--date") if a.date is not None else yesterday()
    cfg = _cfg(a)
    info = moderate(_from_template(a.input_template, dt), a.gallery, a.output, dt, a.model, cfg, a.ray_address)
    print(summary(info))
    return 0


def backfill(input_template: str, gallery: str, output: str, date_from: str, date_to: str,
             model_dir: str | None = None, cfg: JobConfig | None = None, force: bool = False,
             ray_address: str | None = None) -> dict[str, str]:
    """One partition per day; committed days are skipped unless ``force`` (resumable after a kill).

    A day whose input is missing is never committed (``"missing: ..."``); a day that fails
    (``"failed: ..."``) does not stop the others. The caller reports both and exits non-zero.
    """
    d0 = _dt.date.fromisoformat(F.valid_date(date_from, "--from"))
    d1 = _dt.date.fromisoformat(F.valid_date(date_to, "--to"))
    if d1 < d0:
        raise UsageError(f"--to {date_to} is before --from {date_from}")
    _from_template(input_template, date_from)
    cfg = cfg or JobConfig()
    out = _check_output(output)
    result: dict[str, str] = {}
    d = d0
    while d <= d1:
        dt = d.isoformat()
        if F.is_committed(out, dt) and not force:
            result[dt] = "skipped (committed)"
        else:
            try:
                info = moderate(_from_template(input_template, dt), gallery, output, dt, model_dir, cfg, ray_address)
                print(summary(info), flush=True)
                result[dt] = "done"
            except MissingInput as e:
                result[dt] = f"missing: {plain_message(str(e))}"
            except Exception as e:
                log.debug("backfill day %s failed", dt, exc_info=True)
                result[dt] = f"failed: {plain_message(str(e) if isinstance(e, ModscanError) else e)}"
        d += _dt.timedelta(days=1)
    return result


def cli_backfill(a: argparse.Namespace) -> int:
    res = backfill(a.input_template, a.gallery, a.output, a.date_from, a.date_to, a.model, _cfg(a), a.force,
                   a.ray_address)
    for dt, s in res.items():
        print(f"{dt}: {s}")
    missing = [dt for dt, s in res.items() if s.startswith("missing")]
    failed = [dt for dt, s in res.items() if s.startswith("failed")]
    if missing or failed:
        raise ModscanError(f"backfill incomplete: {len(missing)} day(s) with missing input "
                           f"({', '.join(missing) or '-'}), {len(failed)} failed ({', '.join(failed) or '-'}); "
                           f"nothing was committed for them, rerun the same command once they are fixed")
    return 0
