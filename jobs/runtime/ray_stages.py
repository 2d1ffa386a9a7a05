"""Ray set-up and the Ray Data wiring shared by ``modscan moderate`` and ``gallery build|add``.

Both run the same graph: rows of bytes (read from a prefix, or fetched by URI with
:class:`~pipeline.ingest.fetch.Fetcher`) -> :func:`decode_batch` tasks -> a pool of stage actors
(:class:`~pipeline.moderation.moderator.Moderator` for the job, the gallery's feature stage for
``gallery``). The stages are plain classes from ``pipeline/``; this module only distributes them:

* :func:`init_ray` and :func:`actor_resources` (how many actors, with what CPUs/GPUs and threads);
* :func:`build_input` (the job's input plan as a dataset) and :func:`fetch_by_uri`;
* :func:`decode_and_apply`: decode tasks, then the stage actors; :func:`stream_batches`: a
  dataset's output consumed as it arrives (a chunked run's reports);
* :func:`worker_error`: the :class:`~pipeline.errors.ModscanError` a task or actor raised, read from
  the exception Ray raises on the driver (``RayTaskError.cause``), never from its traceback text;
  :func:`raise_worker_error` raises it (the one unwrapping every Ray Data caller does).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from jobs.runtime.job_config import JobConfig
from pipeline.errors import ModscanError
from pipeline.ingest.decode import DecodeConfig
from pipeline.ingest.plan import InputPlan, relative_key_rows
from pipeline.ingest.storage import KeyPolicy, open_store, redact
from pipeline.moderation.resume import CHUNK_COLUMN, Chunks
from pipeline.signals.hashes import SignalDecoder

log = logging.getLogger(__name__)


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (else ``RAY_ADDRESS``, else start a local Ray) and set the Ray Data
    options every run of this project uses."""
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
    # What a stage raises reaches the driver as the RayTaskError's ``cause`` (by default Ray Data
    # wraps it in a UserCodeException that arrives without it): see worker_error.
    ctx.raise_original_map_exception = True


@dataclass(frozen=True)
class ActorResources:
    """The stage actor pool of a run: its size and what each actor claims."""

    actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int

    def to_dict(self) -> dict[str, Any]:
        """As recorded in ``_run.json`` (``resources``)."""
        return {"actors": self.actors, "actor_num_cpus": self.num_cpus, "actor_num_gpus": self.num_gpus,
                "torch_threads": self.torch_threads}


def actor_resources(cfg: JobConfig) -> ActorResources:
    """The actor pool for ``cfg`` on the connected cluster: one actor per GPU (2 torch threads
    each) on a GPU cluster, else one per 2 CPUs with min(4, CPUs // actors) threads; ``cfg``'s
    ``actors`` and ``torch_threads`` win when set (see :class:`~jobs.runtime.job_config.JobConfig`)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    if gpus:
        return ActorResources(cfg.actors or gpus, cfg.actor_num_cpus, 1.0, cfg.torch_threads or 2)
    actors = cfg.actors or max(1, int(cpus // 2))
    threads = cfg.torch_threads or max(1, min(4, int(cpus // actors)))
    return ActorResources(actors, cfg.actor_num_cpus, 0.0, threads)


def decode_batch(batch: dict[str, Any], cfg: DecodeConfig, timings_uri: str | None,
                 chunks: Chunks | None = None) -> dict[str, Any]:
    """The decode task: fetched rows -> :class:`~pipeline.signals.hashes.SignalDecoder` output
    (the decoder's columns plus the upload's ``md5``, ``pdq_hash``, ``pdq_quality``, and with
    ``chunks`` each row's ``chunk``), with a per-batch timing record under ``timings_uri`` (best
    effort; None: no record). Stateless, so it runs as plain tasks."""
    t = time.perf_counter()
    out = SignalDecoder(cfg)(batch)
    if "image_uri" in batch:  # where the bytes were read from: kept for the signatures
        out["image_uri"] = np.asarray(batch["image_uri"], dtype=object)
    if chunks is not None:  # a chunked run: which chunk each row's flag row is staged with
        out[CHUNK_COLUMN] = chunks.column(out["image_key"])
    if timings_uri:
        try:
            open_store(timings_uri).write_text(
                f"decode-{uuid.uuid4().hex}.json",
                json.dumps({"rows": len(out["ok"]), "seconds": {"decode_resize": time.perf_counter() - t}}))
        except Exception:  # the rows are what matters; a lost record only thins the timing summary
            log.warning("could not write a decode timing record under %s", redact(timings_uri), exc_info=True)
    return out


def _num_blocks(n: int, cfg: JobConfig) -> int:
    """About one input block per batch (at most 200): a small day still spreads over every actor
    of the pool, and a lost node loses few blocks."""
    return max(1, min(200, -(-n // cfg.batch_size)))


def fetch_by_uri(keys: list[str], uris: list[str], cfg: JobConfig, *, policy: KeyPolicy | None = None,
                 num_blocks: int | None = None, batch_size: int = 64, max_fetchers: int = 4) -> Any:
    """Dataset of fetched rows ``image_key, bytes, read_error``: ``uris[i]`` read for ``keys[i]`` by
    a pool of 1 to ``max_fetchers`` :class:`~pipeline.ingest.fetch.Fetcher` actors (``policy``:
    a manifest's, checked again at read time). ``num_blocks`` defaults to one block per batch of
    ``cfg.batch_size``, at most 200."""
    import ray

    from pipeline.ingest.fetch import Fetcher

    items = [{"image_key": k, "uri": u} for k, u in zip(keys, uris)]
    ds = ray.data.from_items(items, override_num_blocks=num_blocks or _num_blocks(len(items), cfg))
    return ds.map_batches(Fetcher, fn_constructor_kwargs={"policy": policy}, batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_fetchers), num_cpus=cfg.decode_num_cpus)


def build_input(plan: InputPlan, cfg: JobConfig, min_blocks: int = 1) -> Any:
    """Ray dataset with ``image_key, bytes, read_error`` for the readable keys of ``plan``, in at
    least ``min_blocks`` blocks (a chunked run asks for one per chunk: the stage's report of a
    block reaches the driver when the block is done, so a chunk is recorded soon after its last
    block, not at the end of the run)."""
    import ray

    n = len(plan.read_uris)
    blocks = max(_num_blocks(n, cfg), min(min_blocks, n))
    if plan.kind == "manifest":
        return fetch_by_uri(plan.keys, plan.read_uris, cfg, policy=plan.policy, num_blocks=blocks)
    assert plan.store is not None
    ds = ray.data.read_binary_files(plan.read_uris, filesystem=plan.store.fs, include_paths=True,
                                    override_num_blocks=blocks)
    # batch_size=None: block by block, so that the blocks reach the stage as they were read
    return ds.map_batches(_with_uris(relative_key_rows(plan.store.root), plan.store.uri), batch_size=None, num_cpus=0.1)


def _with_uris(relkey: Any, root_uri: str) -> Any:
    """``relkey``'s rows plus ``image_uri``: the full URI of each key under ``root_uri``."""
    def fn(batch: dict[str, Any]) -> dict[str, Any]:
        out = relkey(batch)
        out["image_uri"] = np.asarray([root_uri.rstrip("/") + "/" + str(k) for k in out["image_key"]], dtype=object)
        return out
    return fn


def decode_and_apply(ds: Any, stage: type, stage_kwargs: dict[str, Any], cfg: JobConfig, res: ActorResources,
                     decode: DecodeConfig, timings_uri: str | None = None, chunks: Chunks | None = None) -> Any:
    """Fetched rows -> :func:`decode_batch` tasks -> a pool of ``res.actors`` ``stage`` actors.

    Every batch is ``cfg.batch_size`` rows; decode tasks claim ``cfg.decode_num_cpus`` each. The
    actors are built with ``stage_kwargs`` plus ``threads=res.torch_threads`` and get numpy
    batches (with ``chunks``, a ``chunk`` column: the stage is a
    :func:`~pipeline.moderation.resume.chunked` one). A :class:`~pipeline.errors.ModscanError` a
    stage raises, in ``__init__`` too, reaches the driver in a form :func:`worker_error` reads."""
    import ray

    ds = ds.map_batches(decode_batch, fn_kwargs={"cfg": decode, "timings_uri": timings_uri, "chunks": chunks},
                        batch_size=cfg.batch_size, num_cpus=cfg.decode_num_cpus)
    return ds.map_batches(_reporting_errors(stage), fn_constructor_kwargs={**stage_kwargs, "threads": res.torch_threads},
                          batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=res.actors),
                          num_cpus=res.num_cpus, num_gpus=res.num_gpus, batch_format="numpy")


# CPUs each shard server claims: fractional, like the stage actors, so that on a small machine the
# servers never starve the read/decode tasks (their work is a faiss search and a gather per batch)
SHARD_SERVER_NUM_CPUS = 0.25


@dataclass(frozen=True)
class RayShardServers:
    """:class:`~pipeline.gallery.sharded.ShardServers` over Ray actor handles of
    :class:`~pipeline.gallery.sharded.GalleryShardServer` (picklable: the Moderators get it in
    their constructor kwargs). An array passed to several servers in one :meth:`call` is put in
    the object store once."""

    handles: tuple[Any, ...]

    def __len__(self) -> int:
        return len(self.handles)

    def call(self, method: str, calls: Any) -> list[Any]:
        import ray

        put: dict[int, Any] = {}

        def ref(x: Any) -> Any:
            if not isinstance(x, np.ndarray) or x.nbytes < 1 << 16:
                return x
            if id(x) not in put:
                put[id(x)] = ray.put(x)
            return put[id(x)]

        return list(ray.get([getattr(self.handles[j], method).remote(*map(ref, args)) for j, args in calls]))


@contextmanager
def shard_servers(cfg: JobConfig, gallery_uri: str, version: str) -> Iterator[RayShardServers | None]:
    """The run's ``[job] gallery_shard_servers`` :class:`~pipeline.gallery.sharded.GalleryShardServer`
    actors (None when 0), each loaded (its shards mapped from its node's cache) before this yields,
    and killed when the block ends. Ray places them with the ``SPREAD`` strategy: over the nodes of
    a cluster, one after the other (docs/clusters.md). Ray restarts one that dies and retries the
    calls it had in flight; a restarted server re-attaches its node's cache."""
    if not cfg.gallery_shard_servers:
        yield None
        return
    import ray

    from pipeline.gallery.sharded import GalleryShardServer

    n = cfg.gallery_shard_servers
    actor: Any = ray.remote(_reporting_init_errors(GalleryShardServer, "info")).options(
        num_cpus=SHARD_SERVER_NUM_CPUS, scheduling_strategy="SPREAD", max_restarts=3, max_task_retries=3)
    servers = RayShardServers(tuple(actor.remote(gallery_uri, version, j, n, cache_dir=cfg.gallery_cache_dir,
                                                 nprobe=cfg.coarse_nprobe, ef_search=cfg.coarse_ef_search)
                                    for j in range(n)))
    try:
        servers.call("info", [(j, ()) for j in range(n)])  # loaded before the first batch: errors surface here
        yield servers
    finally:
        for h in servers.handles:
            ray.kill(h)


def stream_batches(ds: Any, consume: Callable[[dict[str, Any]], None]) -> None:
    """Run ``ds`` and hand each of its output blocks (numpy) to ``consume`` as it arrives.

    When the run fails (in Ray or in ``consume``), what the failed execution holds is released
    before the error travels up: Ray Data lets the actors of a failed execution go by reference
    counting, and the traceback's frames would otherwise keep them, with their CPUs, as long as
    the error is held (a backfill's next day, or a caller that keeps the error, would wait for
    those CPUs). Pass the dataset straight in, not through a variable the caller keeps."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in it:
            consume(batch)
    except BaseException as e:
        it.close()
        del it, ds
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise


class StageError(Exception):
    """Carries a :class:`~pipeline.errors.ModscanError` out of a stage actor, unchanged in
    ``error``: Ray Data appends its retry advice to the message of the exception a stage raises,
    and the user must read the error's own message."""

    def __init__(self, error: ModscanError) -> None:
        super().__init__(error)
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (StageError, (self.error,))


def _reporting_errors(stage: type[Any]) -> type:
    """``stage`` (same name, so Ray's process titles keep it) whose ModscanErrors leave as a
    :class:`StageError`. One raised in ``__init__`` is raised by the first call instead: Ray keeps
    only the text of an actor's failed ``__init__`` (its ActorDiedError has no cause), while a
    call's exception reaches the driver as the RayTaskError's ``cause``."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self.stage_init_error = None
        try:
            stage.__init__(self, *args, **kwargs)
        except ModscanError as e:
            self.stage_init_error = e

    def __call__(self: Any, batch: dict[str, Any]) -> Any:
        if self.stage_init_error is not None:
            raise StageError(self.stage_init_error)
        try:
            return stage.__call__(self, batch)
        except ModscanError as e:
            raise StageError(e) from None

    return type(stage.__name__, (stage,), {"__init__": __init__, "__call__": __call__, "__doc__": stage.__doc__,
                                          "__module__": stage.__module__, "__qualname__": stage.__qualname__})


def _reporting_init_errors(cls: type[Any], first_call: str) -> type:
    """``cls`` (same name, so Ray's process titles keep it) whose ``__init__``'s ModscanError is
    raised, as a :class:`StageError`, by its ``first_call`` method instead: Ray keeps only the text
    of an actor's failed ``__init__``, a call's exception reaches the caller whole."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self.init_error = None
        try:
            cls.__init__(self, *args, **kwargs)
        except ModscanError as e:
            self.init_error = e

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.init_error is not None:
            raise StageError(self.init_error)
        return getattr(cls, first_call)(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, first_call: call, "__doc__": cls.__doc__,
                                        "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def worker_error(e: BaseException) -> ModscanError | None:
    """The ModscanError behind an exception a Ray Data run raised on the driver, if any: ``e``
    itself, or what a task or actor raised (``RayTaskError.cause``, a :class:`StageError`'s
    ``error``), along the ``__cause__`` chain. None for anything else (an actor that died, a bug)."""
    from ray.exceptions import RayTaskError

    for _ in range(10):
        if isinstance(e, RayTaskError):
            e = e.cause
        elif isinstance(e, StageError):
            return e.error
        elif isinstance(e, ModscanError):
            return e
        elif e.__cause__ is not None:
            e = e.__cause__
        else:
            return None
    return None


def raise_worker_error(e: BaseException) -> NoReturn:
    """Raise what an operator should read after a Ray Data run failed with ``e``: the ModscanError
    a task or actor raised (:func:`worker_error`), chained to ``e``, or else ``e`` itself."""
    cause = worker_error(e)
    if cause is not None and cause is not e:
        raise cause from e
    raise e
