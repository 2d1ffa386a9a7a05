"""Chunked runs that resume: deterministic chunks of a run's input, a record per finished chunk,
and what a rerun of the partition may skip.

A night at scale fails now and then near its end (a node reclaimed with the driver, an S3 outage
longer than the retries, a deploy). Ray retries tasks and actors inside one run; this module keeps
the work of a run whose driver is gone:

* :class:`Chunks`: the readable keys of the input plan, sorted, cut into ranges of ``chunk_size``
  keys (``[job] chunk_size``). The same plan always gives the same chunks, and the chunk of a key
  is found by bisection over the chunks' first keys, so no table of keys travels to the workers.
* :func:`chunked` wraps the job's stage: every chunk's rows of a batch go through it on their own
  and are written as one Parquet file into the run's attempt folder of the stage
  (:mod:`pipeline.moderation.staging`), named after the chunk and a hash of its keys (a Ray retry
  rewrites the same file); the stage returns one small row per file.
* :class:`ChunkProgress`: the driver adds those rows up and, when every key of a chunk has its
  row, writes the chunk's record (``chunks/cNNNNNN.json``: the run and the files), atomically and
  only while the run still owns the partition.
* :class:`Fingerprint` and :func:`open_stage`: a rerun of the partition with the same input plan,
  chunk size, model, pinned gallery version and decision settings joins the stage and skips its
  recorded chunks; if any of them differs it starts over in a new stage and says why in one line.
  ``--restart`` starts over in any case.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.ingest.storage import Store, open_store
from pipeline.moderation.partitions import CommitError
from pipeline.moderation.staging import (
    CHUNKS,
    PLAN,
    VOID,
    attempt_key,
    mark_started,
    stage_key,
    stage_name,
    staged_folders,
)
from pipeline.schemas import FILE_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 50_000   # keys per chunk: minutes of a cluster's work, the most a failure costs again
CHUNK_COLUMN = "chunk"


def digest(values: Iterable[str]) -> str:
    """sha256 of a sequence of strings (each terminated, so that no two sequences collide)."""
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


@dataclass(frozen=True)
class Chunks:
    """The chunks of a run's readable keys: sorted key ranges of ``size`` keys (the last one shorter)."""

    size: int
    firsts: tuple[str, ...]   # the first (smallest) key of each chunk
    counts: tuple[int, ...]   # keys per chunk

    @classmethod
    def of_keys(cls, keys: Iterable[str], size: int) -> Chunks:
        ordered = sorted(keys)
        starts = range(0, len(ordered), size)
        return cls(size, tuple(ordered[i] for i in starts), tuple(min(size, len(ordered) - i) for i in starts))

    def __len__(self) -> int:
        return len(self.firsts)

    def of(self, key: str) -> int:
        """The chunk of ``key`` (one of the keys the chunks were made from)."""
        return bisect.bisect_right(self.firsts, key) - 1

    def column(self, keys: Iterable[Any]) -> np.ndarray:
        """The chunk of each key, as the ``chunk`` column of a batch."""
        return np.asarray([self.of(str(k)) for k in keys], dtype=np.int64)


@dataclass(frozen=True)
class Fingerprint:
    """What the rows of a chunk depend on: a rerun resumes only when every field is the same."""

    partition: str
    input_plan: str        # sha256 of the plan: kind, every key and what is read for it, the forbidden keys
    keys: int
    chunk_size: int
    model_version: str
    gallery_version: str
    settings: str          # sha256 of the job settings that shape a row (thresholds, decode bounds, precision, ...)

    @property
    def digest(self) -> str:
        return digest(json.dumps(asdict(self), sort_keys=True).splitlines())

    def differences(self, old: Fingerprint) -> str:
        """Why a run with this fingerprint cannot resume ``old``'s stage, in one line."""
        what = []
        if self.model_version != old.model_version:
            what.append(f"the model changed ({self.model_version}, was {old.model_version})")
        if self.gallery_version != old.gallery_version:
            what.append(f"the pinned gallery version changed ({self.gallery_version}, was {old.gallery_version})")
        if self.input_plan != old.input_plan:
            what.append(f"the input plan changed ({self.keys} keys, was {old.keys})")
        if self.chunk_size != old.chunk_size:
            what.append(f"chunk_size changed ({self.chunk_size}, was {old.chunk_size})")
        if self.settings != old.settings:
            what.append("the job settings that shape decisions changed")
        return "; ".join(what) or "its stage was made by another version of modscan"


def plan_digest(kind: str, keys: list[str], read_uris: list[str], forbidden: list[tuple[str, str]]) -> str:
    """sha256 of an input plan: its kind, every key with what is read for it, and the forbidden keys."""
    return digest([kind, *(f"{k}\x01{u}" for k, u in zip(keys, read_uris)), "\x02forbidden",
                   *(k for k, _ in forbidden)])


def settings_digest(settings: dict[str, Any]) -> str:
    return digest([json.dumps(settings, sort_keys=True, default=str)])


@dataclass(frozen=True)
class ChunkRecord:
    """A finished chunk: which run staged its rows, and the files (keys under the output root) that hold them."""

    chunk: int
    run_id: str
    rows: int
    files: tuple[str, ...]
    finished_at: str = ""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "files": list(self.files)}, indent=1) + "\n"


def record_key(stage: str, chunk: int) -> str:
    return f"{stage_key(stage)}/{CHUNKS}/c{chunk:06d}.json"


def read_records(out: Store, stage: str) -> dict[int, ChunkRecord]:
    """The chunk records of ``stage`` whose files are all there (one listing of the stage: a record
    whose files a failed commit or a cleanup removed is a chunk to run again)."""
    present = {f"{stage_key(stage)}/{k}" for k in out.child(stage_key(stage)).list()}
    records = {}
    for k in sorted(present):
        if posixpath.dirname(k) != f"{stage_key(stage)}/{CHUNKS}" or not k.endswith(".json"):
            continue
        try:
            d = json.loads(out.read_text(k))
            rec = ChunkRecord(int(d["chunk"]), str(d["run_id"]), int(d["rows"]), tuple(d["files"]), d.get("finished_at", ""))
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            log.warning("chunk record %s unreadable: its chunk runs again", k)
            continue
        if all(f in present for f in rec.files):
            records[rec.chunk] = rec
        else:
            log.warning("chunk record %s names files that are gone: its chunk runs again", k)
    return records


@dataclass
class Resume:
    """Where a chunked run stages and what it may skip (:func:`open_stage`)."""

    stage: str
    fingerprint: Fingerprint
    done: dict[int, ChunkRecord] = field(default_factory=dict)   # finished before this run
    started_over: str | None = None   # why the run did not resume a stage of its partition; None: it did, or none existed
    restart: bool = False


def _read_plan(out: Store, stage: str) -> Fingerprint | None:
    try:
        return Fingerprint(**json.loads(out.read_text(f"{stage_key(stage)}/{PLAN}"))["fingerprint"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def open_stage(out: Store, fp: Fingerprint, run_id: str, restart: bool = False) -> Resume:
    """Join the live stage of ``fp.partition`` made with the same fingerprint, or start a new one:
    -> where ``run_id`` stages and the chunks it may skip. Called once the run owns the partition
    (so that a run of the partition that staged before has been superseded)."""
    stages = [f for f in staged_folders(out) if f.is_stage and f.part == fp.partition
              and not out.exists(f"{f.key}/{VOID}")]
    plans = {f.name: _read_plan(out, f.name) for f in stages}
    same = [s for s, p in plans.items() if p is not None and p.digest == fp.digest]
    reason = None
    if same and not restart:
        records = {s: read_records(out, s) for s in same}
        stage = max(same, key=lambda s: (len(records[s]), s))
        mark_started(out, attempt_key(stage, run_id))
        return Resume(stage, fp, records[stage])
    if restart and stages:
        reason = "--restart"
    elif stages:
        old = next((p for p in plans.values() if p is not None), None)
        reason = fp.differences(old) if old is not None else "the stage it found has no readable plan"
    stage = stage_name(fp.partition, fp.digest, run_id)
    out.write_text(f"{stage_key(stage)}/{PLAN}", json.dumps({"fingerprint": asdict(fp), "created_by": run_id},
                                                             indent=1) + "\n")
    mark_started(out, attempt_key(stage, run_id))
    if reason:
        log.warning("%s: not resuming the %d chunk stage(s) found: %s", fp.partition, len(stages), reason)
    return Resume(stage, fp, {}, reason, restart)


def chunk_file_name(chunk: int, keys: list[str]) -> str:
    """The name of the file of one chunk's rows of a batch: the same keys always give the same name."""
    return f"c{chunk:06d}-{digest(keys)[:16]}.parquet"


def chunked(stage: type[Any]) -> type:
    """``stage`` (a class whose ``__call__`` returns flag rows, :data:`FILE_SCHEMA`) for a chunked
    run: its batches carry a ``chunk`` column; each chunk's rows go through the stage on their own
    (so that whatever the stage writes per call, e.g. a signature file, belongs to one chunk) and
    are written into ``chunk_data_uri`` (the attempt's ``data`` folder). -> one row per file
    written: ``chunk``, ``file``, ``rows``."""

    def __init__(self: Any, *args: Any, chunk_data_uri: str, **kwargs: Any) -> None:
        stage.__init__(self, *args, **kwargs)
        self.chunk_store = open_store(chunk_data_uri)  # local writes create their folders

    def __call__(self: Any, batch: dict[str, Any]) -> dict[str, Any]:
        chunks = np.asarray(batch[CHUNK_COLUMN])
        out: dict[str, list[Any]] = {"chunk": [], "file": [], "rows": []}
        for c in np.unique(chunks):
            rows = np.nonzero(chunks == c)[0]
            sub = {k: v[rows] for k, v in batch.items() if k != CHUNK_COLUMN}
            table = stage.__call__(self, sub)
            name = chunk_file_name(int(c), [str(k) for k in sub["image_key"]])
            buf = io.BytesIO()
            pq.write_table(table.cast(FILE_SCHEMA), buf)
            self.chunk_store.write_bytes(name, buf.getvalue())
            out["chunk"].append(int(c))
            out["file"].append(name)
            out["rows"].append(len(table))
        return {"chunk": np.asarray(out["chunk"], np.int64), "file": np.asarray(out["file"], object),
                "rows": np.asarray(out["rows"], np.int64)}

    return type(stage.__name__, (stage,), {"__init__": __init__, "__call__": __call__, "__doc__": stage.__doc__,
                                          "__module__": stage.__module__, "__qualname__": stage.__qualname__})


class ChunkProgress:
    """The driver's view of a chunked run: it adds up the files the stage reports and records each
    chunk once every key of it has its row. ``before_record`` runs before each record is written
    (the run's ownership check: a superseded run records nothing)."""

    def __init__(self, out: Store, stage: str, run_id: str, counts: dict[int, int],
                 before_record: Callable[[], None]) -> None:
        self.out, self.stage, self.run_id = out, stage, run_id
        self.counts = counts                       # chunk -> keys, for the chunks this run runs
        self.files: dict[int, dict[str, int]] = {c: {} for c in counts}
        self.done: dict[int, ChunkRecord] = {}
        self.before_record = before_record

    def add(self, chunk: int, file: str, rows: int) -> ChunkRecord | None:
        """One file the stage wrote; -> the chunk's record when this file finished it."""
        if chunk not in self.files:
            raise CommitError(f"run {self.run_id}: the stage wrote rows of chunk {chunk}, not one of this run's")
        self.files[chunk][file] = rows  # a retried batch rewrites the same file
        n = sum(self.files[chunk].values())
        if n > self.counts[chunk]:
            raise CommitError(f"run {self.run_id}: chunk {chunk} got {n} rows for {self.counts[chunk]} keys")
        if n < self.counts[chunk] or chunk in self.done:
            return None
        self.before_record()
        data = f"{attempt_key(self.stage, self.run_id)}/data"
        rec = ChunkRecord(chunk, self.run_id, n, tuple(f"{data}/{f}" for f in sorted(self.files[chunk])),
                          _dt.datetime.now(_dt.UTC).isoformat())
        self.out.write_text(record_key(self.stage, chunk), rec.to_json())  # atomic: temp + rename, or one PUT
        self.done[chunk] = rec
        return rec

    def unfinished(self) -> list[int]:
        return sorted(set(self.counts) - set(self.done))
