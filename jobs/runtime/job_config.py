"""The job's configuration: :class:`JobConfig` and the ``[job]`` table of a TOML file.

Every value is checked when a config is built (:class:`~pipeline.errors.UsageError`, exit 2), so a
bad value fails before anything runs; a file's problems are all reported at their lines
(:class:`JobConfigError`). ``moderate``, ``nightly``, ``backfill``, ``lookup`` and the benchmarks
read their settings from here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigFileError, UsageError, plain_message, toml_error_line, toml_key_lines
from pipeline.ingest.decode import DecodeConfig
from pipeline.ingest.storage import KeyPolicy
from pipeline.moderation.resume import DEFAULT_CHUNK_SIZE
from pipeline.moderation.waves import WaveParams

if TYPE_CHECKING:
    from pipeline.gallery.query import QueryOverrides


@dataclass(frozen=True)
class JobConfig:
    """Resources and sizes of the job. Defaults suit a 2-core machine; see configs/moderate.toml.

    ``actors = 0`` means: one actor per GPU on a GPU cluster, else one actor per 2 CPUs (min 1).
    ``actor_num_cpus`` is fractional on small machines: an actor pool that claims every CPU starves
    the read/decode tasks and the job stalls without an error.

    Values are checked when the config is built (:class:`~pipeline.errors.UsageError`, exit 2), so
    a bad value fails before Ray starts; :meth:`from_toml` reports each one at its line.
    ``torch_threads`` is each actor's ``torch.set_num_threads``; 0 picks min(4, cluster CPUs //
    actors), at least 1, for CPU actors and 2 for GPU actors.
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
    sure_threshold: float | None = None
    rerank_k: int | None = None
    review_max_rows: int = 200
    precision: str = "auto"          # model trunk: auto (bf16 on CUDA / native-bf16 CPUs, else fp32) | bf16 | fp32
    coarse_nprobe: int | None = None     # ivf coarse index: lists searched (None: the gallery manifest's)
    coarse_ef_search: int | None = None  # hnsw coarse index: search breadth (None: the gallery manifest's)
    max_matches_per_reference: int = 1000  # flood guard: more matches in one run -> action review (0: off)
    metrics_textfile: str | None = None    # node-exporter textfile (*.prom) written after each commit
    metrics_pushgateway: str | None = None  # Pushgateway base URL; metrics PUT after each commit
    write_signatures: bool = True    # keep each searched upload's signature for `modscan retro`
    retro_days: int = 0              # nightly: retro pass over the last N days when the gallery changed (0: off)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # keys per chunk: a rerun after a killed driver skips the finished chunks
    waves: bool = False              # moderate: cluster the partition's own uploads after the commit (docs/waves.md)
    wave_min_size: int = 5           # a cluster of at least this many uploads is a wave
    wave_k: int = 16                 # waves: neighbours searched per upload
    wave_coarse_threshold: float = 0.40   # waves: query-to-query 128-d cosine of a candidate pair
    wave_fine_threshold: float = 0.15     # waves: normalised fine score from which a pair is verified
    wave_sure_threshold: float | None = None  # waves: fine score needing no verification (None: sized for the partition)
    wave_min_inliers: int = 25       # waves: RANSAC inliers that confirm a pair in the verification zone
    gallery_cache: str = "node"      # node: one verified, memory-mapped copy per node (docs/clusters.md); off: one per actor
    gallery_cache_dir: str | None = None  # the node cache (None: $MODSCAN_GALLERY_CACHE, else <tmp>/modscan-gallery-cache)
    gallery_shard_servers: int = 0   # N >= 1: N actors hold the version's shards, the Moderators no vectors (docs/clusters.md)

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
        need(is_int(self.retro_days) and self.retro_days >= 0, f"retro_days must be an integer >= 0, got {self.retro_days!r}")
        need(is_int(self.chunk_size) and self.chunk_size >= 1, f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        need(isinstance(self.waves, bool), f"waves must be true or false, got {self.waves!r}")
        self.wave_params()  # the wave rule checks its own [job] wave_* keys
        for name in ("image_extensions_only", "allow_empty_input", "verify_gallery", "write_signatures"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("coarse_threshold", "fine_threshold", "sure_threshold"):
            v = getattr(self, name)
            need(v is None or (is_num(v) and -1.0 <= v <= 1.0), f"{name} must be a cosine in [-1, 1], got {v!r}")
        need(self.rerank_k is None or (is_int(self.rerank_k) and self.rerank_k >= 1),
             f"rerank_k must be an integer >= 1, got {self.rerank_k!r}")
        need(is_int(self.max_matches_per_reference) and self.max_matches_per_reference >= 0,
             f"max_matches_per_reference must be an integer >= 0, got {self.max_matches_per_reference!r}")
        for name in ("metrics_textfile", "metrics_pushgateway"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, str) and v != ""), f"{name} must be a non-empty string, got {v!r}")
        need(self.gallery_cache in ("node", "off"), f"gallery_cache must be node or off, got {self.gallery_cache!r}")
        need(self.gallery_cache_dir is None or (isinstance(self.gallery_cache_dir, str) and self.gallery_cache_dir != ""),
             f"gallery_cache_dir must be a non-empty string, got {self.gallery_cache_dir!r}")
        need(is_int(self.gallery_shard_servers) and self.gallery_shard_servers >= 0,
             f"gallery_shard_servers must be an integer >= 0, got {self.gallery_shard_servers!r}")
        need(not self.gallery_shard_servers or self.gallery_cache == "node",
             "gallery_shard_servers needs gallery_cache = \"node\" (the servers map their shards from the node cache)")
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

    @classmethod
    def from_toml(cls, path: str | None, **overrides: Any) -> JobConfig:
        """The ``[job]`` table of a TOML file (every key optional), with ``overrides`` (command-line
        flags; None: not given) on top. Every problem of the file is reported at its line, as
        ``FILE:LINE: message`` (:class:`JobConfigError`, exit 2), before anything runs."""
        d = read_job_table(path) if path else {}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def wave_params(self) -> WaveParams:
        """The waves pass's rule from ``[job] wave_*`` (docs/waves.md)."""
        return WaveParams(k=self.wave_k, coarse_threshold=self.wave_coarse_threshold,
                          fine_threshold=self.wave_fine_threshold, sure_threshold=self.wave_sure_threshold,
                          min_inliers=self.wave_min_inliers, wave_min_size=self.wave_min_size)

    def threshold_overrides(self) -> dict[str, float]:
        """The thresholds this config sets over the gallery manifest's (job and ``lookup`` alike)."""
        return {k: v for k, v in {"coarse": self.coarse_threshold, "fine": self.fine_threshold,
                                  "sure": self.sure_threshold, "rerank_k": self.rerank_k}.items() if v is not None}

    def node_cache(self) -> str | None:
        """What the Moderator's ``gallery_cache`` takes: None (each actor loads its own copy),
        ``"node"`` (the node's default cache folder, resolved on each node) or a folder."""
        if self.gallery_cache == "off":
            return None
        return self.gallery_cache_dir or "node"

    def query_overrides(self) -> QueryOverrides:
        """What this config sets over a gallery version's own query settings (thresholds,
        ``coarse_nprobe``, ``coarse_ef_search``): the one construction the job's Moderator and
        ``modscan lookup`` share, so that lookup's decision is the job's."""
        from pipeline.gallery.query import QueryOverrides

        return QueryOverrides.from_thresholds(self.threshold_overrides(), self.coarse_nprobe, self.coarse_ef_search)


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


def _read_toml(path: str) -> tuple[str, dict[str, Any]]:
    """-> (text, parsed document) of a config file; a missing or unreadable file is a UsageError."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot be read: {plain_message(e, 300)}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobConfigError(path, [(toml_error_line(e, 1), f"TOML syntax: {e}")]) from None


def _job_key_errors(job: dict[str, Any], line: Callable[..., int]) -> list[tuple[int, str]]:
    """(line, message) for every key of ``[job]`` that is removed, unknown or has a bad value."""
    errors: list[tuple[int, str]] = []
    known = sorted(f.name for f in fields(JobConfig) if f.name != "decode")
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
    return errors


def _decode_key_errors(decode: dict[str, Any], line: Callable[..., int]) -> list[tuple[int, str]]:
    """(line, message) for every key of ``[job.decode]`` that is a model size, unknown or has a bad value."""
    errors: list[tuple[int, str]] = []
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
    return errors


def read_job_table(path: str) -> dict[str, Any]:
    """The checked ``[job]`` table of a config file (``decode`` as a :class:`DecodeConfig`).

    Raises :class:`~pipeline.errors.UsageError` for a missing file and :class:`JobConfigError`
    listing every problem with its line: TOML syntax, unknown tables and keys, wrong types and
    ranges (each value is checked by the same code as :class:`JobConfig` and :class:`DecodeConfig`),
    and ``low_res``/``high_res`` in ``[job.decode]``, which come from the model card."""
    text, doc = _read_toml(path)
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
    errors += _job_key_errors(job, line)
    decode = job.get("decode", {})
    if not isinstance(decode, dict):
        errors.append((line("job.decode", "job"), f"[job] decode must be a [job.decode] table, got {decode!r}"))
        decode = {}
    errors += _decode_key_errors(decode, line)
    if errors:
        raise JobConfigError(path, errors)
    out = {k: v for k, v in job.items() if k != "decode"}
    if "decode" in job:
        out["decode"] = DecodeConfig(**decode)
    return out
