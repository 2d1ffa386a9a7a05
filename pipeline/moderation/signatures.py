"""Signatures: what a run keeps of each upload so that a later gallery change can be matched
against past days without re-reading every image (``modscan retro``).

One row per searched upload (decoded and not low content; :data:`~pipeline.schemas.SIGNATURE_SCHEMA`):
its key, the full URI its bytes were read from, its sha256, the 128-d low-res query feature
(little-endian float16 in a ``fixed_size_binary(256)``), the PDQ hash when hash signals land,
the model version and the run id. Low-content and error rows get none: they never match any
gallery, so no gallery change can alter their decision.

Layout: ``SIG/dt=D/part-R-NNNNN.parquet`` + ``_run.json`` + ``_SUCCESS`` under the signatures
root (default ``OUTPUT/_signatures/``: ``_``-prefixed, so hive discovery of the flags root never
sees it). The Moderator actor writes one side file per batch into the run's signature staging
(``SIG/_staging/<stage>/R/data/`` for a chunked run, one file per chunk's share of a batch),
named after a hash of the batch's keys, so a Ray retry of a batch overwrites its file instead of
adding a second one. The driver then selects the files of the chunks it publishes
(:func:`select_files`), verifies them and commits them with the flags' own protocol
(:func:`pipeline.moderation.flags.commit_partition` with this schema), before the flags.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.storage import Store, open_store
from pipeline.moderation import flags as F
from pipeline.schemas import SIGNATURE_SCHEMA, Status

SIGNATURES_DIR = "_signatures"
FEATURE_DIM = 128
FEATURE_BYTES = FEATURE_DIM * 2


def signatures_root(output_uri: str, signatures_uri: str | None = None) -> str:
    """Where a run's signatures go: ``signatures_uri``, else ``OUTPUT/_signatures``."""
    return signatures_uri or output_uri.rstrip("/") + "/" + SIGNATURES_DIR


def encode_features(x: np.ndarray) -> list[bytes]:
    """``(n, 128)`` float features -> one little-endian float16 value of 256 bytes each."""
    a = np.ascontiguousarray(np.asarray(x, np.float32).astype("<f2"))
    if a.ndim != 2 or a.shape[1] != FEATURE_DIM:
        raise ValueError(f"signature features must be (n, {FEATURE_DIM}), got {a.shape}")
    return [r.tobytes() for r in a]


def decode_features(values: Any) -> np.ndarray:
    """A ``coarse_feature`` column (pyarrow or a list of bytes) -> ``(n, 128)`` float32."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    if not len(values):
        return np.zeros((0, FEATURE_DIM), np.float32)
    return np.frombuffer(b"".join(bytes(v) for v in values), dtype="<f2").reshape(-1, FEATURE_DIM).astype(np.float32)


def batch_file_name(keys: list[str]) -> str:
    """Deterministic side-file name of one batch: the same keys always give the same name."""
    h = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24]
    return f"sig-{h}.parquet"


class SignatureWriter:
    """Writes the signature side file of a Moderator batch into a run's signature staging
    (``staging_uri`` = ``SIG/_staging/R/data``)."""

    def __init__(self, staging_uri: str, run_id: str, model_version: str) -> None:
        self.store = open_store(staging_uri)  # local writes create their folders
        self.run_id, self.model_version = run_id, model_version

    def write(self, batch: dict[str, Any], rows: np.ndarray, coarse: np.ndarray) -> str | None:
        """One file for the decoded rows ``rows`` of ``batch`` and their coarse features. -> its name."""
        if not len(rows):
            return None
        keys = [str(batch["image_key"][i]) for i in rows]
        uris = batch.get("image_uri")
        n = len(keys)
        table = pa.Table.from_pydict({
            "image_key": keys,
            "image_uri": [str(uris[i]) for i in rows] if uris is not None else [None] * n,
            "image_sha256": [batch["image_sha256"][i] for i in rows],
            "coarse_feature": pa.array(encode_features(coarse), pa.binary(FEATURE_BYTES)),
            "pdq_hash": [batch["pdq_hash"][i] for i in rows] if "pdq_hash" in batch else [None] * n,
            "model_version": [self.model_version] * n, "run_id": [self.run_id] * n,
        }, schema=SIGNATURE_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = batch_file_name(keys)
        self.store.write_bytes(name, buf.getvalue())
        return name


def staging_data_uri(sig: Store, run_id: str, folder: str | None = None) -> str:
    """Where the Moderator writes a run's signature files: ``folder`` (a chunked run's attempt,
    ``SIG/_staging/<stage>/R``) or ``SIG/_staging/R``, then ``data``."""
    return sig.full_uri(f"{folder or F.staging_key(run_id)}/data")


def select_files(sig: Store, folders: dict[str, str], run_of_chunk: dict[int, str], chunk_of: Any) -> list[str]:
    """The signature files a chunked run publishes: of every attempt folder (``folders``: run id ->
    folder key), the files whose uploads all belong to chunks recorded as finished by that run
    (``run_of_chunk``; ``chunk_of``: key -> chunk). The stage writes one file per chunk's share of a
    batch, so a file is wholly in or out; files of a killed run's unfinished chunks, or of a
    superseded run, are left out. -> keys under ``sig``."""
    chosen = []
    for run, folder in sorted(folders.items()):
        data = sig.child(f"{folder}/data")
        for name in data.list():
            if not name.endswith(".parquet"):
                continue
            keys = pq.read_table(data.path(name), columns=["image_key"], filesystem=sig.fs).column("image_key").to_pylist()
            if keys and all(run_of_chunk.get(chunk_of(k)) == run for k in keys):
                chosen.append(f"{folder}/data/{name}")
    return chosen


def verify_signatures(sig: Store, run_id: str, expected: set[str], files: list[str] | None = None) -> dict[str, Any]:
    """Counts of a run's staged signatures (``files``: keys under ``sig``; default: every file of
    ``run_id`` staged in one pass); :class:`~pipeline.moderation.flags.CommitError` unless there is
    exactly one row per key of ``expected`` (the flag rows with status matched or clean)."""
    files, t = F.read_staged(sig, run_id, ["image_key", "model_version"], files)
    keys = t.column("image_key").to_pylist()
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise F.CommitError(f"run {run_id}: {len(dup)} uploads have more than one signature (e.g. {dup[:3]})")
    if set(keys) != expected:
        lost, extra = expected - set(keys), set(keys) - expected
        raise F.CommitError(f"run {run_id}: signatures differ from the searched uploads ({len(lost)} without one, "
                            f"e.g. {sorted(lost)[:3]}; {len(extra)} unexpected, e.g. {sorted(extra)[:3]})")
    size = sum(sig.fs.get_file_info(sig.path(k)).size for k in files)
    return {"rows": len(keys), "files": len(files), "bytes": int(size),
            "bytes_per_upload": round(size / len(keys), 1) if keys else None}


def searched_keys(out: Store, run_id: str, files: list[str] | None = None) -> set[str]:
    """Keys of a run's staged flag rows (``files``, see :func:`~pipeline.moderation.flags.read_staged`)
    that went through the coarse search (status matched or clean)."""
    _, t = F.read_staged(out, run_id, ["image_key", "status"], files)
    searched = {Status.MATCHED.value, Status.CLEAN.value}
    return {k for k, s in zip(t.column("image_key").to_pylist(), t.column("status").to_pylist()) if s in searched}


def committed_files(sig: Store, dt: str) -> list[str]:
    """Full paths (in ``sig.fs``) of the Parquet files of the committed signature partition ``dt``;
    empty when the day has none committed."""
    if not F.is_committed(sig, dt):
        return []
    part = F.partition_key(dt)
    return [sig.path(posixpath.join(part, posixpath.relpath(k, part))) for k in sig.list(part, recursive=False)
            if k.endswith(".parquet")]


def model_versions(sig: Store, dt: str) -> set[str]:
    """The model versions of a committed signature partition (its ``_run.json``, else its rows)."""
    info = F.read_run(sig, dt)
    if info and info.get("model_version"):
        return {info["model_version"]}
    vs: set[str] = set()
    for p in committed_files(sig, dt):
        vs |= set(pq.read_table(p, columns=["model_version"], filesystem=sig.fs).column("model_version").to_pylist())
    return vs
