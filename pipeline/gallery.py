"""Gallery versions in object storage, and the query-side :class:`GalleryIndex`.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.card import ModelCard
from pipeline import audit as A
from pipeline.banks import Bank
from pipeline.errors import ModscanError
from pipeline.index import CascadeIndex, CascadeParams, CoarseIndexSpec, ScoreNorm, Shard, background_term
from pipeline.schemas import ENTRY_SCHEMA, Action, Status
from pipeline.storage import Store, open_store

FORMAT_VERSION = 1
from models.preprocess import IMAGE_SUFFIXES  # noqa: E402  (the one list)


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
    return _dt.datetime.now(_dt.timezone.utc)


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


def write_version(store: Store, content: GalleryContent, card: ModelCard, n_shards: int,
                  rerank_dtype: str = "float16", parent: str | None = None,
                  coarse_spec: str | dict | CoarseIndexSpec | None = None, publish: bool = True) -> str:
    """Write a complete new version (shards, entries, manifest) and publish it via ``CURRENT``."""
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
        "model_id": card.version_id,
        "dims": {"coarse": card.config.coarse_dim, "rerank": card.config.rerank_dim},
        "thresholds": {"coarse": float(card.thresholds["coarse"]), "fine": float(card.thresholds["fine"]),
                       "rerank_k": int(card.thresholds.get("rerank_k", 500)),
                       "norm": ScoreNorm.from_dict(card.thresholds.get("norm")).to_dict()},
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


def write_audited(store: Store, content: GalleryContent, card: ModelCard, n_shards: int, rerank_dtype: str,
                  parent: str | None, coarse_spec: str, action: str, who: str | None = None,
                  note: str | None = None, run_id: str | None = None, details: dict[str, Any] | None = None,
                  changes: list[dict[str, Any]] | tuple[dict[str, Any], ...] = ()) -> str:
    """Write a version, append its audit record, then publish it: the record goes first so that
    every version ``CURRENT`` ever names has one (see :mod:`pipeline.audit`)."""
    version = write_version(store, content, card, n_shards, rerank_dtype, parent, coarse_spec, publish=False)
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
        _check_model(m, model_id)
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


def load_streaming(store: Store, m: dict[str, Any], use_gpu: bool | None = None, nprobe: int | None = None,
                   ef_search: int | None = None) -> tuple[CascadeIndex, pd.DataFrame]:
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
    return cascade, entries


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


def read_content(store: Store, version: str | None = None) -> tuple[dict[str, Any], GalleryContent]:
    """Load a version's vectors and entries (verified), e.g. to derive the next version."""
    m = read_manifest(store, version)
    shards, entries = _load_verified(store, m)
    ids, coarse, rerank = [], [], []
    from pipeline.index import decode_rerank

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
    return m, content


# --------------------------------------------------------------------------------------------
# Building and updating
# --------------------------------------------------------------------------------------------
# extract(uris) -> one dict per uri: {"uri", "sha256", "ok", "error_code", "error_message",
#                                     "coarse": (128,) or None, "rerank": (512,) or None}
Extractor = Callable[[list[str]], list[dict[str, Any]]]


def list_source(source: str) -> list[str]:
    """Image URIs under a bank source (folder or S3 prefix), sorted."""
    st = open_store(source)
    return [st.full_uri(k) for k in st.list() if k.lower().endswith(IMAGE_SUFFIXES)]


def _add_images(content: GalleryContent, bank: Bank, uris: list[str], extract: Extractor) -> dict[str, int]:
    """Extract ``uris`` and add them to ``bank`` in ``content``; dedupes by sha256."""
    stats = {"added": 0, "already_present": 0, "new_membership": 0, "rejected": 0}
    if not uris:
        return stats
    by_sha = {}
    if len(content.entries):
        by_sha = dict(zip(content.entries["sha256"], content.entries["id"]))
    members = set(zip(content.entries["id"], content.entries["bank"])) if len(content.entries) else set()
    next_id = int(content.ids.max()) + 1 if len(content.ids) else 0
    new_ids, new_c, new_r, new_rows = [], [], [], []
    now = _now()
    for r in extract(uris):
        if not r["ok"]:
            content.rejected.append({"bank": bank.name, "uri": r["uri"], "error_code": r["error_code"],
                                     "error_message": r["error_message"]})
            stats["rejected"] += 1
            continue
        sha = r["sha256"]
        if sha in by_sha:
            gid = int(by_sha[sha])
            if (gid, bank.name) in members:
                stats["already_present"] += 1
                continue
            stats["new_membership"] += 1
        else:
            gid = next_id
            next_id += 1
            by_sha[sha] = gid
            new_ids.append(gid)
            new_c.append(r["coarse"])
            new_r.append(r["rerank"])
            stats["added"] += 1
        members.add((gid, bank.name))
        new_rows.append({"id": gid, "bank": bank.name, "category": bank.category, "action": bank.action,
                         "source_uri": r["uri"], "sha256": sha, "added_at": now})
    if new_ids:
        content.ids = np.concatenate([content.ids, np.asarray(new_ids, np.int64)])
        content.coarse = np.concatenate([content.coarse, np.vstack(new_c).astype(np.float32)])
        content.rerank = np.concatenate([content.rerank, np.vstack(new_r).astype(np.float32)])
    if new_rows:
        add = pd.DataFrame(new_rows)
        content.entries = pd.concat([content.entries, add], ignore_index=True) if len(content.entries) else add
    return stats


def _empty_content(coarse_dim: int, rerank_dim: int) -> GalleryContent:
    return GalleryContent(np.zeros(0, np.int64), np.zeros((0, coarse_dim), np.float32),
                          np.zeros((0, rerank_dim), np.float32),
                          pd.DataFrame({f.name: pd.Series(dtype=object) for f in ENTRY_SCHEMA}), {})


def build(store: Store, banks: list[Bank], card: ModelCard, extract: Extractor, n_shards: int = 4,
          rerank_dtype: str = "float16", coarse_spec: str = "Flat", *, who: str | None = None,
          note: str | None = None) -> tuple[str, dict[str, Any]]:
    """Extract every enabled bank and publish a new version. Returns (version, per-bank stats)."""
    content = _empty_content(card.config.coarse_dim, card.config.rerank_dim)
    stats: dict[str, Any] = {}
    for b in banks:
        content.banks[b.name] = b
        stats[b.name] = _add_images(content, b, list_source(b.source), extract) if b.enabled else {"skipped": "disabled"}
    parent = current_version(store)
    version = write_audited(store, content, card, n_shards, rerank_dtype, parent, coarse_spec, "build",
                            who, note, details={"banks": stats})
    return version, stats


def add(store: Store, bank_name: str, uris: list[str], card: ModelCard, extract: Extractor,
        new_bank: Bank | None = None, *, who: str | None = None, note: str | None = None
        ) -> tuple[str, dict[str, int]]:
    """New version = current + ``uris`` in ``bank_name``; existing vectors are reused, not re-extracted."""
    m, content = read_content(store)
    _check_model(m, card.version_id)
    if bank_name not in content.banks:
        if new_bank is None:
            raise KeyError(f"bank {bank_name!r} is not in gallery {m['version']}; pass --banks to declare it")
        content.banks[bank_name] = new_bank
    stats = _add_images(content, content.banks[bank_name], uris, extract)
    card = card_for_update(card, m)
    version = write_audited(store, content, card, len(m["shards"]), m["rerank_dtype"], m["version"],
                            m.get("coarse_index", "Flat"), "add", who, note, details={"bank": bank_name, **stats})
    return version, stats


def card_for_update(card: ModelCard, manifest: dict[str, Any]) -> ModelCard:
    """A copy of ``card`` carrying the gallery's own model id and thresholds, for a version derived
    from ``manifest`` (add, remove, review apply): an update never resets what a gallery was
    calibrated or overridden to, nor adds settings it never had (``gallery build`` is where the
    card's thresholds apply)."""
    from dataclasses import replace

    return replace(card, version_id=manifest["model_id"], thresholds=dict(manifest["thresholds"]))


def remove(store: Store, card: ModelCard, bank: str | None = None, ids: Iterable[int] = (),
           shas: Iterable[str] = (), *, who: str | None = None, note: str | None = None
           ) -> tuple[str, dict[str, int]]:
    """New version without the given memberships. An image left in no bank loses its vectors."""
    m, content = read_content(store)
    _check_model(m, card.version_id)
    e = content.entries
    ids, shas = set(int(i) for i in ids), set(shas)
    sel = pd.Series(True, index=e.index)
    if ids or shas:
        sel &= e["id"].isin(ids) | e["sha256"].isin(shas)
    elif bank is None:
        raise ValueError("remove needs --bank, --ids or --sha256")
    if bank is not None:
        if bank not in content.banks:
            raise KeyError(f"bank {bank!r} is not in gallery {m['version']}")
        sel &= e["bank"] == bank
    removed = int(sel.sum())
    content.entries = e[~sel].reset_index(drop=True)
    keep = np.isin(content.ids, content.entries["id"].to_numpy(np.int64))
    dropped = int((~keep).sum())
    content.ids, content.coarse, content.rerank = content.ids[keep], content.coarse[keep], content.rerank[keep]
    if bank is not None and not ids and not shas:
        content.banks.pop(bank)
    stats = {"memberships_removed": removed, "images_dropped": dropped}
    card = card_for_update(card, m)
    version = write_audited(store, content, card, len(m["shards"]), m["rerank_dtype"], m["version"],
                            m.get("coarse_index", "Flat"), "remove", who, note,
                            details={"bank": bank, "ids": sorted(ids), "sha256": sorted(shas), **stats})
    return version, stats


def info(store: Store) -> dict[str, Any]:
    """Versions, counts per bank, model id and size of the current version."""
    m = read_manifest(store)
    vstore = store.child(f"versions/{m['version']}")
    size = sum(store.fs.get_file_info(vstore.path(k)).size for k in vstore.list())
    return {"root": store.uri, "current": m["version"], "versions": list_versions(store), "model_id": m["model_id"],
            "created_at": m["created_at"], "counts": m["counts"],
            "banks": {n: {k: b[k] for k in ("category", "action", "count", "enabled", "fine_threshold")}
                      for n, b in m["banks"].items()},
            "shards": len(m["shards"]), "rerank_dtype": m["rerank_dtype"], "thresholds": m["thresholds"],
            "bytes": int(size), "rejected": len(m.get("rejected", [])),
            **_review_state(store, m)}


def _review_state(store: Store, m: dict[str, Any], recent: int = 20) -> dict[str, Any]:
    """Disabled references of ``m`` (in force or expired) and the tail of the audit log."""
    in_force = disabled_in_force(m)
    disabled = [{**d, "in_force": d["id"] in in_force} for d in m.get("disabled_references", [])]
    records = A.read_log(store)
    return {"disabled_references": disabled,
            "audit": {"records": len(records), "chain_problems": A.verify_log(store),
                      "recent": A.flat_entries(records)[-recent:]}}


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


def _check_model(manifest: dict[str, Any], model_id: str) -> None:
    if manifest["model_id"] != model_id:
        raise GalleryModelMismatch(
            f"gallery {manifest['version']} was built with model {manifest['model_id']!r} but the query model is "
            f"{model_id!r}: features of different models are not comparable; rebuild the gallery "
            f"(`modscan gallery build`) or use the matching model")


# --------------------------------------------------------------------------------------------
# Query side
# --------------------------------------------------------------------------------------------
@dataclass
class Match:
    """The decision for one query image."""

    status: str
    action: str
    bank: str | None = None
    category: str | None = None
    reference_id: int | None = None
    coarse_score: float | None = None
    fine_score: float | None = None      # normalised fine score: what the thresholds apply to
    fine_score_raw: float | None = None  # plain 512-d cosine of the same pair


class _Hit(NamedTuple):
    """One (query, gallery entry, bank) pair that reached its bank's fine threshold."""

    fine: float
    gid: int
    bank: str
    category: str
    action: str
    coarse: float


class Candidates(NamedTuple):
    """The cascade's output for a batch of queries, ``(B, rerank_k)`` each.

    ``F`` is the normalised fine score (``-inf`` where not reranked); ``offset`` ``(B,)`` is what
    normalisation subtracted from each query's raw cosines (``F + offset`` = raw).
    """

    D: np.ndarray
    I: np.ndarray
    F: np.ndarray
    survivors: np.ndarray
    offset: np.ndarray


class GalleryIndex:
    """A loaded, verified gallery version: cascade search plus the bank rules."""

    def __init__(self, manifest: dict[str, Any], cascade: CascadeIndex, entries: pd.DataFrame,
                 params: CascadeParams, background: np.ndarray | None = None) -> None:
        self.manifest, self.cascade, self.params = manifest, cascade, params
        # (N, rerank_dim) background features of the query model, for score normalisation
        self.background = background if params.norm.beta else None
        self.banks = {n: Bank.from_dict(b) for n, b in manifest["banks"].items()}
        self.entries = entries
        # References disabled by review decisions, as of load time: a job keeps one view for its
        # whole run, like it keeps one gallery version.
        self.disabled: dict[int, dict[str, Any]] = disabled_in_force(manifest)
        self._members: dict[int, list[tuple[str, str, str, float]]] = {}
        for gid, bank in zip(entries["id"].tolist(), entries["bank"].tolist()):
            b = self.banks[bank]
            if not b.enabled or int(gid) in self.disabled:
                continue
            self._members.setdefault(int(gid), []).append((bank, b.category, b.action, self.bank_threshold(bank)))

    def bank_threshold(self, bank: str) -> float:
        """The fine threshold in force for ``bank``: its own, else the gallery's (or override)."""
        b = self.banks[bank]
        return float(b.fine_threshold if b.fine_threshold is not None else self.params.fine_threshold)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @classmethod
    def load(cls, uri_or_store: str | Store, model_id: str | None = None, version: str | None = None,
             use_gpu: bool | None = None, overrides: dict[str, float] | None = None,
             background: np.ndarray | None = None, nprobe: int | None = None,
             ef_search: int | None = None) -> GalleryIndex:
        """Load and verify a version (default: ``CURRENT``); refuse a model-id mismatch.

        ``background`` is the query model's background bank (512-d); the manifest's ``norm``
        settings say how it normalises fine scores. A gallery whose ``norm.beta > 0`` loads without
        one (to inspect it) but refuses to score: its thresholds were calibrated on normalised scores.
        """
        store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
        m = read_manifest(store, version)
        if model_id is not None:
            _check_model(m, model_id)
        cascade, entries = load_streaming(store, m, use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search)
        t = {**m["thresholds"], **(overrides or {})}
        norm = ScoreNorm.from_dict({**m["thresholds"].get("norm", {}), **(overrides or {}).get("norm", {})})
        params = CascadeParams(float(t["coarse"]), float(t["fine"]), int(t.get("rerank_k", 500)), norm)
        return cls(m, cascade, entries, params, background)

    def coarse(self, xq128: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 for every upload: ``D, I`` ``(B, rerank_k)`` above the coarse threshold."""
        return self.cascade.coarse(xq128, self.params.rerank_k, self.params.coarse_threshold)

    def rerank(self, xq512: np.ndarray, I: np.ndarray) -> np.ndarray:
        """Stage 2 for survivors only: fine scores of their candidates."""
        return self.cascade.rerank(xq512, I)

    def decide(self, D: np.ndarray, I: np.ndarray, F: np.ndarray | None,
               offset: np.ndarray | None = None) -> list[Match]:
        """Bank rules per query: an allow-list match at least as good as the best blocking match
        wins (no flag); otherwise the best blocking match above its bank's fine threshold decides
        (ties: filter over downrank). ``F`` is None when no query was reranked."""
        out = []
        off = np.zeros(len(I), np.float32) if offset is None else np.asarray(offset, np.float32)

        def raw(q: int, fine: float | None) -> float | None:
            return None if fine is None or not np.isfinite(fine) else float(fine + off[q])

        for q in range(len(I)):
            valid = I[q] >= 0
            best_coarse = float(D[q][valid].max()) if valid.any() else None
            if F is None or not valid.any():
                out.append(Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse))
                continue
            best_block: _Hit | None = None
            best_allow: _Hit | None = None
            for j in np.nonzero(valid)[0]:
                gid, fine, crs = int(I[q, j]), float(F[q, j]), float(D[q, j])
                for bank, category, action, thr in self._members.get(gid, ()):
                    if fine < thr:
                        continue
                    hit = _Hit(fine, gid, bank, category, action, crs)
                    if action == Action.ALLOW.value:
                        if best_allow is None or fine > best_allow.fine:
                            best_allow = hit
                    elif best_block is None or (fine, action == Action.FILTER.value) > (
                            best_block.fine, best_block.action == Action.FILTER.value):
                        best_block = hit
            best_fine = float(F[q][valid].max())
            if best_block is not None and (best_allow is None or best_allow.fine < best_block.fine):
                b = best_block
                out.append(Match(Status.MATCHED.value, b.action, b.bank, b.category, b.gid, b.coarse, b.fine, raw(q, b.fine)))
            elif best_block is not None and best_allow is not None:
                a = best_allow
                out.append(Match(Status.CLEAN.value, Action.NONE.value, a.bank, a.category, a.gid, a.coarse, a.fine,
                                 raw(q, a.fine)))
            else:
                out.append(Match(Status.CLEAN.value, Action.NONE.value, coarse_score=best_coarse,
                                 fine_score=best_fine, fine_score_raw=raw(q, best_fine)))
        return out

    def normalise(self, xq512: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw fine scores ``(B, k)`` of queries ``(B, rerank_dim)`` -> (normalised, offset ``(B,)``)."""
        norm = self.params.norm
        if norm.beta and self.background is None:
            raise GalleryIntegrityError(
                f"gallery {self.version} normalises fine scores (beta={norm.beta}) but was loaded without a "
                f"background bank: load it with the query model's bank (FeatureExtractor.background)")
        offset = norm.beta * background_term(xq512, self.background, norm.k) if norm.beta else np.zeros(len(F), np.float32)
        return (F - offset[:, None]).astype(np.float32), offset.astype(np.float32)

    def candidates(self, xq128: np.ndarray, rerank_fn: Callable[[np.ndarray], np.ndarray]) -> Candidates:
        """The cascade for a batch: coarse for all; ``rerank_fn(rows)`` -> 512-d queries, called only
        for the rows with a coarse candidate, whose fine scores are then normalised."""
        D, I = self.coarse(xq128)
        survivors = I[:, 0] >= 0
        F = np.full(I.shape, -np.inf, np.float32)
        offset = np.zeros(len(I), np.float32)
        if survivors.any():
            rows = np.nonzero(survivors)[0]
            xq512 = rerank_fn(rows)
            F[rows], offset[rows] = self.normalise(xq512, self.rerank(xq512, I[rows]))
        return Candidates(D, I, F, survivors, offset)

    def search(self, xq128: np.ndarray, rerank_fn: Callable[[np.ndarray], np.ndarray]) -> tuple[list[Match], np.ndarray]:
        """Cascade + bank rules: one :class:`Match` per query, and the survivor mask."""
        c = self.candidates(xq128, rerank_fn)
        return self.decide(c.D, c.I, c.F, c.offset), c.survivors
