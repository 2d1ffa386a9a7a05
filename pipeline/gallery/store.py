"""Gallery versions in object storage: what a version records, writing and publishing one, reading
and verifying one, and the streaming loader the query side (:mod:`pipeline.gallery.query`) uses.

Layout under a gallery root (local folder or ``s3://bucket/prefix``)::

    CURRENT                              # "v000003": the published version (one small object)
    versions/v000003/manifest.json       # model id, dims, thresholds, banks, shard files + sha256
    versions/v000003/shard-000.faiss     # coarse 128-d index with explicit int64 ids
    versions/v000003/shard-000.rerank.safetensors   # ids + 512-d rerank vectors (float16 default)
    versions/v000003/entries.parquet     # id, bank, category, action, source_uri, sha256, added_at

A version is immutable. Writers put every file of a new version under its own prefix, the
manifest last, then replace ``CURRENT`` (an atomic rename locally, an atomic PUT on S3): a reader
that follows ``CURRENT`` never sees half a gallery. One writer at a time is assumed (run gallery
updates from one scheduled job).

Broadcast to workers: each Ray actor loads the version from storage once, in ``__init__``
(``GalleryIndex.load``). Per-actor load is chosen over the Ray object store because actors on
other nodes read straight from S3 in parallel (no driver bottleneck, no object-store spilling of a
multi-GB gallery), every actor verifies the checksums itself, and the faiss index must be
materialised per process anyway (faiss copies vectors into its own memory on ``add``).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.card import ModelCard
from pipeline.errors import ModscanError
from pipeline.gallery import audit as A
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeIndex, CoarseIndexSpec, ScoreNorm, Shard
from pipeline.ingest.storage import Store, open_store
from pipeline.schemas import ENTRY_SCHEMA

FORMAT_VERSION = 1


class GalleryIntegrityError(ModscanError, RuntimeError):
    """A gallery file does not match the checksum in its manifest."""


class GalleryModelMismatch(ModscanError, RuntimeError):
    """The gallery was built with another model than the one querying it."""


class GalleryNotFound(ModscanError, FileNotFoundError):
    pass


def _sha256(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


# --------------------------------------------------------------------------------------------
# Versions: read, write, publish
# --------------------------------------------------------------------------------------------
def current_version(store: Store) -> str | None:
    return store.read_text("CURRENT").strip() if store.exists("CURRENT") else None


def list_versions(store: Store) -> list[str]:
    return [posixpath.basename(d) for d in store.list_dirs("versions")]


def _next_version(store: Store) -> str:
    nums = [int(v[1:]) for v in list_versions(store) if v.startswith("v") and v[1:].isdigit()]
    return f"v{(max(nums) + 1 if nums else 1):06d}"


@dataclass
class GalleryContent:
    """What a version holds before it is written: vectors by id, memberships, bank rules."""

    ids: np.ndarray                   # (n,) int64 unique
    coarse: np.ndarray                # (n, coarse_dim) float32
    rerank: np.ndarray                # (n, rerank_dim) float32 (decoded)
    entries: pd.DataFrame             # ENTRY_SCHEMA rows; every id has >= 1 row
    banks: dict[str, Bank]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    # id -> {"id", "until" (ISO UTC or None: indefinitely), "by", "at", "note", "run_id"}: references
    # switched off by review decisions; they stay in the gallery and never match while in force
    disabled: dict[int, dict[str, Any]] = field(default_factory=dict)

    def check(self) -> None:
        if len(set(self.entries["id"])) != len(self.ids) or set(self.entries["id"]) != set(self.ids.tolist()):
            raise ValueError("entries and vectors disagree on the set of ids")
        unknown = set(self.entries["bank"]) - set(self.banks)
        if unknown:
            raise ValueError(f"entries refer to undeclared banks {sorted(unknown)}")


@dataclass(frozen=True)
class VersionModel:
    """What a version records about the model whose vectors it holds, and the thresholds it is
    queried at: the model id (checked at load), the vector dims, and the cascade thresholds.

    :meth:`from_card` is for a new gallery (``gallery build``: the card's calibrated thresholds
    apply); :meth:`from_manifest` for a version derived from another (add, remove, review apply):
    an update never resets what a gallery was calibrated or overridden to, nor adds settings it
    never had, whatever card the operator's command loaded."""

    model_id: str
    coarse_dim: int
    rerank_dim: int
    coarse_threshold: float
    fine_threshold: float
    rerank_k: int = 500
    norm: ScoreNorm = field(default_factory=ScoreNorm)

    @classmethod
    def from_thresholds(cls, model_id: str, coarse_dim: int, rerank_dim: int,
                        thresholds: Mapping[str, Any]) -> VersionModel:
        """From a card's or manifest's ``thresholds`` dict (``rerank_k`` 500 and no ``norm`` when absent)."""
        return cls(model_id, int(coarse_dim), int(rerank_dim), float(thresholds["coarse"]), float(thresholds["fine"]),
                   int(thresholds.get("rerank_k", 500)), ScoreNorm.from_dict(thresholds.get("norm")))

    @classmethod
    def from_card(cls, card: ModelCard) -> VersionModel:
        return cls.from_thresholds(card.version_id, card.config.coarse_dim, card.config.rerank_dim, card.thresholds)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> VersionModel:
        return cls.from_thresholds(manifest["model_id"], manifest["dims"]["coarse"], manifest["dims"]["rerank"],
                                   manifest["thresholds"])

    def thresholds(self) -> dict[str, Any]:
        """The manifest's ``thresholds`` entry."""
        return {"coarse": self.coarse_threshold, "fine": self.fine_threshold, "rerank_k": self.rerank_k,
                "norm": self.norm.to_dict()}


def write_version(store: Store, content: GalleryContent, model: VersionModel, n_shards: int,
                  rerank_dtype: str = "float16", parent: str | None = None,
                  coarse_spec: str | dict | CoarseIndexSpec | None = None, publish: bool = True) -> str:
    """Write a complete new version (shards, entries, manifest) and publish it via ``CURRENT``.
    ``model`` is what the manifest records of the model and thresholds (see :class:`VersionModel`)."""
    content.check()
    coarse_spec = CoarseIndexSpec.parse(coarse_spec)
    version = _next_version(store)
    vstore = store.child(f"versions/{version}")
    cascade = CascadeIndex.build(content.ids, content.coarse, content.rerank, n_shards, rerank_dtype,
                                 coarse_spec=coarse_spec, use_gpu=False)
    shard_meta = []
    for i, sh in enumerate(cascade.shards):
        ib, rb = sh.index_bytes(), sh.rerank_bytes()
        iname, rname = f"shard-{i:03d}.faiss", f"shard-{i:03d}.rerank.safetensors"
        vstore.write_bytes(iname, ib)
        vstore.write_bytes(rname, rb)
        shard_meta.append({"index": iname, "index_sha256": _sha256(ib), "rerank": rname,
                           "rerank_sha256": _sha256(rb), "count": sh.ntotal})
    ent = content.entries.sort_values(["id", "bank"]).reset_index(drop=True)
    table = pa.Table.from_pandas(ent, schema=ENTRY_SCHEMA, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    eb = buf.getvalue()
    vstore.write_bytes("entries.parquet", eb)
    counts = ent.groupby("bank")["id"].nunique().to_dict()
    live_ids = set(content.ids.tolist())  # a removed image takes its disabled mark with it
    manifest = {
        "format": FORMAT_VERSION,
        "version": version,
        "parent": parent,
        "created_at": _now().isoformat(),
        "model_id": model.model_id,
        "dims": {"coarse": model.coarse_dim, "rerank": model.rerank_dim},
        "thresholds": model.thresholds(),
        "rerank_dtype": rerank_dtype,
        "coarse_index": coarse_spec.to_dict(),
        "shards": shard_meta,
        "entries": {"file": "entries.parquet", "sha256": _sha256(eb), "rows": len(ent)},
        "banks": {n: {**b.to_dict(), "count": int(counts.get(n, 0))} for n, b in sorted(content.banks.items())},
        "counts": {"images": int(len(content.ids)), "memberships": int(len(ent))},
        "rejected": content.rejected,
        "disabled_references": [content.disabled[i] for i in sorted(content.disabled) if i in live_ids],
    }
    vstore.write_text("manifest.json", json.dumps(manifest, indent=2) + "\n")
    if publish:
        publish_version(store, version)
    return version


def publish_version(store: Store, version: str) -> None:
    """Point ``CURRENT`` at a written version (atomic rename locally, one PUT on S3)."""
    store.write_text("CURRENT", version + "\n")


def write_audited(store: Store, content: GalleryContent, model: VersionModel, n_shards: int, rerank_dtype: str,
                  parent: str | None, coarse_spec: str, action: str, who: str | None = None,
                  note: str | None = None, run_id: str | None = None, details: dict[str, Any] | None = None,
                  changes: list[dict[str, Any]] | tuple[dict[str, Any], ...] = ()) -> str:
    """Write a version, append its audit record, then publish it: the record goes first so that
    every version ``CURRENT`` ever names has one (see :mod:`pipeline.gallery.audit`)."""
    version = write_version(store, content, model, n_shards, rerank_dtype, parent, coarse_spec, publish=False)
    A.append(store, action, version, parent, who=who, note=note, run_id=run_id, details=details, changes=changes)
    publish_version(store, version)
    return version


def read_manifest(store: Store, version: str | None = None) -> dict[str, Any]:
    v = version or current_version(store)
    if v is None:
        raise GalleryNotFound(f"no gallery at {store.uri} (no CURRENT pointer)")
    key = f"versions/{v}/manifest.json"
    if not store.exists(key):
        raise GalleryNotFound(f"gallery version {v} has no manifest at {store.full_uri(key)}")
    return json.loads(store.read_text(key))


def _verified(vstore: Store, name: str, sha: str) -> bytes:
    data = vstore.read_bytes(name)
    actual = _sha256(data)
    if actual != sha:
        raise GalleryIntegrityError(
            f"checksum mismatch for {vstore.full_uri(name)}: manifest says {sha[:16]}..., file has "
            f"{actual[:16]}... (corrupted or tampered gallery file; refusing to load)")
    return data


def _load_verified(store: Store, m: dict[str, Any]) -> tuple[list[Shard], pd.DataFrame]:
    """Shards and entries of manifest ``m``, every file checked against its sha256."""
    vstore = store.child(f"versions/{m['version']}")
    shards = [Shard.from_bytes(_verified(vstore, s["index"], s["index_sha256"]),
                               _verified(vstore, s["rerank"], s["rerank_sha256"])) for s in m["shards"]]
    entries = pq.read_table(io.BytesIO(_verified(vstore, m["entries"]["file"], m["entries"]["sha256"]))).to_pandas()
    return shards, entries


# --------------------------------------------------------------------------------------------
# Pinning, verification and the streaming loader
# --------------------------------------------------------------------------------------------
_CHUNK = 8 << 20
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "I8": np.int8, "I64": np.int64}


def resolve_version(uri_or_store: str | Store, model_id: str | None = None) -> dict[str, Any]:
    """The manifest of the version ``CURRENT`` names now, and nothing else (no shard is read): what
    a job driver pins once, so that its actors and its review page load exactly that version."""
    store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
    m = read_manifest(store)
    if model_id is not None:
        check_model(m, model_id)
    return m


def _version_files(m: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, sha256) of every data file of a version."""
    files = [(f, sh[k]) for sh in m["shards"] for f, k in ((sh["index"], "index_sha256"), (sh["rerank"], "rerank_sha256"))]
    return files + [(m["entries"]["file"], m["entries"]["sha256"])]


def _mismatch(vstore: Store, name: str, sha: str, actual: str) -> GalleryIntegrityError:
    return GalleryIntegrityError(
        f"checksum mismatch for {vstore.full_uri(name)}: manifest says {sha[:16]}..., file has "
        f"{actual[:16]}... (corrupted or tampered gallery file; refusing to load)")


def stream_sha256(vstore: Store, name: str) -> str:
    """sha256 of a file read in chunks (memory stays at one chunk whatever the file size)."""
    import hashlib

    h = hashlib.sha256()
    with vstore.fs.open_input_stream(vstore.path(name)) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(uri_or_store: str | Store, version: str | None = None) -> dict[str, Any]:
    """Check every file of a version (default: ``CURRENT``) against its manifest checksum,
    streaming. Returns ``{"version", "files", "problems": [{"file", "problem"}]}``."""
    store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
    m = read_manifest(store, version)
    vstore = store.child(f"versions/{m['version']}")
    problems = []
    files = _version_files(m)
    for name, sha in files:
        try:
            actual = stream_sha256(vstore, name)
        except FileNotFoundError:
            problems.append({"file": name, "problem": "missing"})
            continue
        if actual != sha:
            problems.append({"file": name, "problem": f"sha256 {actual[:16]}... != manifest {sha[:16]}..."})
    return {"version": m["version"], "files": len(files), "problems": problems}


class _HashingReader:
    """A sequential reader that hashes every byte it hands out (and the rest, at ``finish``)."""

    def __init__(self, f: Any) -> None:
        import hashlib

        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b

    def finish(self) -> str:
        while self.read(_CHUNK):
            pass
        return self.h.hexdigest()


def _read_index_streaming(vstore: Store, name: str, sha: str) -> Any:
    """A faiss index read straight from storage (1 MiB blocks), hashed on the way."""
    import faiss

    with vstore.fs.open_input_stream(vstore.path(name)) as f:
        r = _HashingReader(f)
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(r.read, 1 << 20))
        except Exception:
            actual = r.finish()
            if actual != sha:
                raise _mismatch(vstore, name, sha, actual) from None
            raise
        actual = r.finish()
    if actual != sha:
        raise _mismatch(vstore, name, sha, actual)
    return index


def _st_header(f: Any) -> tuple[bytes, dict[str, Any]]:
    """Raw header bytes (length prefix included) and parsed header of a safetensors file."""
    import struct

    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n < (64 << 20):
        raise ValueError("not a safetensors file")
    raw = f.read(n)
    return head + raw, json.loads(raw)


def _rerank_ids(vstore: Store, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Pass 1: the ids of a rerank file (header and the ids range only; random access)."""
    with vstore.fs.open_input_file(vstore.path(name)) as f:
        raw, header = _st_header(f)
        a, b = header["ids"]["data_offsets"]
        ids = np.frombuffer(f.read_at(b - a, len(raw) + a), np.int64).copy()
    return ids, header


def _fill_rerank(vstore: Store, name: str, sha: str, header: dict[str, Any], ids: np.ndarray,
                 rows: np.ndarray, out: np.ndarray) -> None:
    """Pass 2: stream the rerank file once, hashing it, copying each vector row ``i`` straight
    into ``out[rows[i]]`` (its place in the id-sorted matrix). Transient memory: one chunk."""
    with vstore.fs.open_input_stream(vstore.path(name)) as f:
        r = _HashingReader(f)
        raw, header2 = _st_header(r)
        if header2 != header:
            raise _mismatch(vstore, name, sha, r.finish())
        pos = 0
        for tname in sorted(("ids", "vectors"), key=lambda t: header[t]["data_offsets"][0]):
            a, b = header[tname]["data_offsets"]
            while pos < a:
                pos += len(r.read(min(_CHUNK, a - pos)))
            if tname == "ids":
                again = np.frombuffer(r.read(b - a), np.int64)
                if not np.array_equal(again, ids):
                    raise _mismatch(vstore, name, sha, r.finish())
            else:
                d = int(header["vectors"]["shape"][1])
                row_bytes = d * out.itemsize
                if header["vectors"]["shape"][0] != len(ids) or b - a != len(ids) * row_bytes or d != out.shape[1]:
                    raise _mismatch(vstore, name, sha, r.finish())
                step = max(1, _CHUNK // row_bytes)
                for r0 in range(0, len(ids), step):
                    n = min(step, len(ids) - r0)
                    chunk = np.frombuffer(r.read(n * row_bytes), out.dtype)
                    if len(chunk) != n * d:
                        raise _mismatch(vstore, name, sha, r.finish())
                    out[rows[r0:r0 + n]] = chunk.reshape(n, d)
            pos = b
        actual = r.finish()
    if actual != sha:
        raise _mismatch(vstore, name, sha, actual)


class LoadedVersion(NamedTuple):
    """A version ready to query: its cascade and its entries (one row per id and bank)."""

    cascade: CascadeIndex
    entries: pd.DataFrame


def load_streaming(store: Store, m: dict[str, Any], use_gpu: bool | None = None, nprobe: int | None = None,
                   ef_search: int | None = None) -> LoadedVersion:
    """The cascade and entries of manifest ``m``, every file verified, with a peak memory close to
    what stays resident (``modscan bench memory``): entries first (their transient copies are
    then the only data in memory), rerank vectors streamed straight into the one id-sorted matrix
    the cascade keeps, faiss indexes read in 1 MiB blocks. Reading whole files and concatenating
    shards held the file bytes, the per-shard and the merged matrices at once (~2.5x resident)."""
    vstore = store.child(f"versions/{m['version']}")
    entries_bytes = _verified(vstore, m["entries"]["file"], m["entries"]["sha256"])
    table = pq.read_table(io.BytesIO(entries_bytes))
    del entries_bytes
    entries = table.to_pandas()
    del table
    layouts = []
    for s in m["shards"]:
        try:
            layouts.append(_rerank_ids(vstore, s["rerank"]))
        except (ValueError, KeyError) as e:  # unreadable header: report it as what it is
            raise _mismatch(vstore, s["rerank"], s["rerank_sha256"], stream_sha256(vstore, s["rerank"])) from e
    all_ids = np.concatenate([ids for ids, _ in layouts]) if layouts else np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    row_of = np.empty(len(all_ids), np.int64)
    row_of[order] = np.arange(len(all_ids))
    dtypes = {_ST_DTYPES[h["vectors"]["dtype"]] for _, h in layouts} or {np.float16}
    if len(dtypes) != 1:
        raise GalleryIntegrityError(f"gallery {m['version']}: shards store rerank vectors in different dtypes")
    rerank = np.empty((len(all_ids), m["dims"]["rerank"]), dtypes.pop())
    shards, off = [], 0
    for s, (ids, header) in zip(m["shards"], layouts):
        _fill_rerank(vstore, s["rerank"], s["rerank_sha256"], header, ids, row_of[off:off + len(ids)], rerank)
        index = _read_index_streaming(vstore, s["index"], s["index_sha256"])
        # zero-width rerank placeholders: the cascade gets the id-sorted matrix below instead of
        # concatenating and re-sorting per-shard copies
        shards.append(Shard(index, ids, np.empty((len(ids), 0), rerank.dtype)))
        off += len(ids)
    spec = CoarseIndexSpec.parse(m.get("coarse_index"))
    cascade = CascadeIndex(shards, m["dims"]["coarse"], m["dims"]["rerank"], use_gpu=use_gpu,
                           nprobe=nprobe or spec.nprobe, ef_search=ef_search or spec.ef_search)
    cascade._rerank = rerank  # the id-sorted order CascadeIndex keeps (checked below)
    if not np.array_equal(cascade._sorted_ids, all_ids[order]):
        raise RuntimeError("CascadeIndex no longer keeps its rerank matrix in id order; update load_streaming")
    return LoadedVersion(cascade, entries)


def _coarse_vectors(sh: Shard) -> np.ndarray:
    """Coarse vectors of a shard in the order of ``sh.ids`` (stored vectors are reused on update)."""
    import faiss

    idx = sh.index
    if isinstance(idx, faiss.IndexIDMap2):
        vecs = idx.index.reconstruct_n(0, idx.ntotal)
        id_map = faiss.vector_to_array(idx.id_map).astype(np.int64)
        pos = {int(g): i for i, g in enumerate(id_map)}
        return vecs[[pos[int(g)] for g in sh.ids]]
    ivf = faiss.extract_index_ivf(idx)  # IVF: reconstruct by id needs a direct map; ids are sparse
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return np.vstack([idx.reconstruct(int(g)) for g in sh.ids])


class StoredVersion(NamedTuple):
    """A version read back for deriving the next one: its manifest and its decoded content."""

    manifest: dict[str, Any]
    content: GalleryContent


def read_content(store: Store, version: str | None = None) -> StoredVersion:
    """Load a version's vectors and entries (verified), e.g. to derive the next version."""
    m = read_manifest(store, version)
    shards, entries = _load_verified(store, m)
    ids, coarse, rerank = [], [], []
    from pipeline.gallery.index import decode_rerank

    for sh in shards:
        if sh.ntotal == 0:
            continue
        ids.append(sh.ids)
        coarse.append(_coarse_vectors(sh))
        rerank.append(decode_rerank(sh.rerank))
    banks = {n: Bank.from_dict(b) for n, b in m["banks"].items()}
    cd, rd = m["dims"]["coarse"], m["dims"]["rerank"]
    content = GalleryContent(
        ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        coarse=np.concatenate(coarse) if coarse else np.zeros((0, cd), np.float32),
        rerank=np.concatenate(rerank) if rerank else np.zeros((0, rd), np.float32),
        entries=entries, banks=banks, rejected=list(m.get("rejected", [])),
        disabled={int(d["id"]): d for d in m.get("disabled_references", [])})
    return StoredVersion(m, content)


# --------------------------------------------------------------------------------------------
# Rules read off a manifest: references disabled now, the model a version belongs to
# --------------------------------------------------------------------------------------------
def disabled_in_force(manifest: dict[str, Any], at: _dt.datetime | None = None) -> dict[int, dict[str, Any]]:
    """References of a version that are disabled at ``at`` (default: now): id -> record. A record
    with ``until = None`` is disabled until a person enables it again; otherwise until that instant."""
    at = at or _now()
    out = {}
    for d in manifest.get("disabled_references", []):
        until = d.get("until")
        if until is None or _dt.datetime.fromisoformat(until) > at:
            out[int(d["id"])] = d
    return out


def check_model(manifest: dict[str, Any], model_id: str) -> None:
    """Refuse features of model ``model_id`` against a version built with another model."""
    if manifest["model_id"] != model_id:
        raise GalleryModelMismatch(
            f"gallery {manifest['version']} was built with model {manifest['model_id']!r} but the query model is "
            f"{model_id!r}: features of different models are not comparable; rebuild the gallery "
            f"(`modscan gallery build`) or use the matching model")
