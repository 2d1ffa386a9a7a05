"""Gallery versions in object storage: writing and publishing one, reading one back (its
:class:`~pipeline.gallery.manifest.Manifest`, its content to derive the next version from).
What a manifest holds is :mod:`pipeline.gallery.manifest`; the streaming loader and verification
the query side uses are :mod:`pipeline.gallery.loader`.

Layout under a gallery root (local folder or ``s3://bucket/prefix``)::

    CURRENT                              # "v000003": the published version (one small object)
    versions/v000003/manifest.json       # model id, dims, thresholds, banks, shard files + sha256
    versions/v000003/shard-000.faiss     # coarse 128-d index with explicit int64 ids
    versions/v000003/shard-000.rerank.safetensors   # ids + 512-d rerank vectors (float16 default)
    versions/v000003/entries.parquet     # id, bank, category, action, source_uri, sha256, added_at,
                                         # the reference's pdq_hash, pdq_quality, md5
    versions/v000003/list-<bank>.parquet # a hash bank's list: hash, entry_id, metadata (pipeline.gallery.hashlists)
    versions/v000003/list-<bank>.pdq-index.safetensors  # a pdq list's PDQ index, built once, memory-mapped
    versions/v000003/keypoints.safetensors  # the references' ORB keypoints (pipeline.gallery.verify)

A version is immutable. Writers put every file of a new version under its own prefix, the
manifest last, then replace ``CURRENT`` (an atomic rename locally, an atomic PUT on S3): a reader
that follows ``CURRENT`` never sees half a gallery. One writer at a time is assumed (run gallery
updates from one scheduled job).

Broadcast to workers: each Ray actor loads the version from storage once, in ``__init__``
(:func:`~pipeline.gallery.query.open_gallery`). Per-actor load is chosen over the Ray object
store because actors on other nodes read straight from S3 in parallel (no driver bottleneck, no
object-store spilling of a multi-GB gallery), every actor verifies the checksums itself, and the
faiss index must be materialised per process anyway (faiss copies vectors into its own memory on
``add``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ModscanError
from pipeline.gallery import audit as A
from pipeline.gallery import hashlists as H
from pipeline.gallery.banks import Bank
from pipeline.gallery.calibration import sized
from pipeline.gallery.index import CascadeIndex, CoarseIndexSpec, Shard, decode_rerank
from pipeline.gallery.manifest import (
    BankRecord,
    Counts,
    DisabledReference,
    EntriesFile,
    HashListFile,
    KeypointsFile,
    Manifest,
    Rejected,
    ShardFiles,
    VersionModel,
)
from pipeline.gallery.verify import KeypointTable, VerifyParams
from pipeline.ingest.storage import Store, open_store
from pipeline.schemas import ENTRY_SCHEMA
from pipeline.signals.index import PdqIndex
from pipeline.signals.lists import HashEntry

KEYPOINTS_FILE = "keypoints.safetensors"


class GalleryIntegrityError(ModscanError, RuntimeError):
    """A gallery file does not match the checksum in its manifest."""


class GalleryNotFound(ModscanError, FileNotFoundError):
    pass


def sha256_hex(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def checksum_mismatch(vstore: Store, name: str, sha: str, actual: str) -> GalleryIntegrityError:
    return GalleryIntegrityError(
        f"checksum mismatch for {vstore.full_uri(name)}: manifest says {sha[:16]}..., file has "
        f"{actual[:16]}... (corrupted or tampered gallery file; refusing to load)")


def read_verified(vstore: Store, name: str, sha: str) -> bytes:
    """The bytes of a version file, after checking them against the manifest's sha256."""
    data = vstore.read_bytes(name)
    actual = sha256_hex(data)
    if actual != sha:
        raise checksum_mismatch(vstore, name, sha, actual)
    return data


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
    rejected: list[Rejected] = field(default_factory=list)
    # references switched off by review decisions, by id: they stay in the gallery and never
    # match while in force
    disabled: dict[int, DisabledReference] = field(default_factory=dict)
    # hash banks' lists, by bank name, in list order (pipeline.gallery.hashlists)
    lists: dict[str, list[HashEntry]] = field(default_factory=dict)
    # the references' packed keypoints by id (pipeline.gallery.verify.pack) and what found them;
    # None: a version without geometric verification
    keypoints: dict[int, bytes] | None = None
    verify_params: VerifyParams | None = None

    def check(self) -> None:
        if len(set(self.entries["id"])) != len(self.ids) or set(self.entries["id"]) != set(self.ids.tolist()):
            raise ValueError("entries and vectors disagree on the set of ids")
        unknown = set(self.entries["bank"]) - set(self.banks)
        if unknown:
            raise ValueError(f"entries refer to undeclared banks {sorted(unknown)}")
        bad = [n for n in self.lists if n not in self.banks or not self.banks[n].is_hash]
        if bad:
            raise ValueError(f"hash lists for banks that are not declared hash banks: {sorted(bad)}")
        if self.keypoints is not None and set(self.keypoints) != set(self.ids.tolist()):
            raise ValueError("keypoints and vectors disagree on the set of ids")


def _write_keypoints(vstore: Store, content: GalleryContent) -> KeypointsFile | None:
    if content.keypoints is None:
        return None
    table = KeypointTable.from_packed(content.keypoints)
    data = table.to_bytes()
    vstore.write_bytes(KEYPOINTS_FILE, data)
    return KeypointsFile(KEYPOINTS_FILE, sha256_hex(data), len(table), table.n_keypoints,
                         content.verify_params or VerifyParams())


def read_keypoints(store: Store, m: Manifest, checked: bool = False) -> KeypointTable | None:
    """The references' keypoints of manifest ``m`` (checked against its sha256), or None for a
    version without them: memory-mapped from a local gallery (18 KB a reference stays on disk and
    in the shared page cache), read into memory from S3. A file that is not a keypoint table is a
    :class:`GalleryIntegrityError`. ``checked``: the local file's checksum was verified already
    (a node cache's copy), so it is mapped without reading it through again."""
    if m.keypoints is None:
        return None
    vstore = store.child(f"versions/{m.version}")
    try:
        if store.is_local:  # checked in chunks, then memory-mapped: nothing of it stays in the process
            from pipeline.gallery.loader import stream_sha256

            actual = m.keypoints.sha256 if checked else stream_sha256(vstore, m.keypoints.file)
            if actual != m.keypoints.sha256:
                raise checksum_mismatch(vstore, m.keypoints.file, m.keypoints.sha256, actual)
            table = KeypointTable.mapped(vstore.path(m.keypoints.file))
        else:
            table = KeypointTable.from_bytes(read_verified(vstore, m.keypoints.file, m.keypoints.sha256))
    except ValueError as e:
        raise GalleryIntegrityError(f"{vstore.full_uri(m.keypoints.file)}: {e}") from None
    if len(table) != m.keypoints.entries:
        raise GalleryIntegrityError(f"{vstore.full_uri(m.keypoints.file)} holds {len(table)} references, the "
                                    f"manifest says {m.keypoints.entries}")
    return table


def _write_shards(vstore: Store, cascade: CascadeIndex) -> tuple[ShardFiles, ...]:
    out = []
    for i, sh in enumerate(cascade.shards):
        ib, rb = sh.index_bytes(), sh.rerank_bytes()
        iname, rname = f"shard-{i:03d}.faiss", f"shard-{i:03d}.rerank.safetensors"
        vstore.write_bytes(iname, ib)
        vstore.write_bytes(rname, rb)
        out.append(ShardFiles(iname, sha256_hex(ib), rname, sha256_hex(rb), sh.ntotal))
    return tuple(out)


def _write_entries(vstore: Store, entries: pd.DataFrame) -> EntriesFile:
    entries = entries.copy()
    for f in ENTRY_SCHEMA:  # versions read back from before a column existed: null there
        if f.name not in entries.columns:
            entries[f.name] = None
    for c in ("pdq_hash", "md5"):
        entries[c] = [x if isinstance(x, str) else None for x in entries[c]]
    entries["pdq_quality"] = pd.array([None if x is None or pd.isna(x) else int(x) for x in entries["pdq_quality"]],
                                      dtype="Int32")
    table = pa.Table.from_pandas(entries[ENTRY_SCHEMA.names], schema=ENTRY_SCHEMA, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    eb = buf.getvalue()
    vstore.write_bytes("entries.parquet", eb)
    return EntriesFile("entries.parquet", sha256_hex(eb), len(entries))


def _write_lists(vstore: Store, content: GalleryContent) -> tuple[HashListFile, ...]:
    out = []
    for name in sorted(content.lists):
        b, entries = content.banks[name], content.lists[name]
        data = H.list_bytes(entries)
        vstore.write_bytes(H.list_file_name(name), data)
        index, index_sha = None, None
        if b.kind == "pdq":  # built once here, mapped by every reader (pipeline.gallery.hashlists)
            ib = H.index_bytes(entries)
            index, index_sha = H.index_file_name(name), sha256_hex(ib)
            vstore.write_bytes(index, ib)
        out.append(HashListFile(name, b.kind, H.list_file_name(name), sha256_hex(data), len(entries), b.source,
                                int(getattr(entries, "duplicates", 0)), index, index_sha))
    return tuple(out)


def write_version(store: Store, content: GalleryContent, model: VersionModel, n_shards: int,
                  rerank_dtype: str = "float16", parent: str | None = None,
                  coarse_spec: str | dict | CoarseIndexSpec | None = None, publish: bool = True) -> str:
    """Write a complete new version (shards, entries, manifest) and publish it via ``CURRENT``.
    ``model`` is what the manifest records of the model and thresholds (see :class:`VersionModel`)."""
    content.check()
    model = sized(model, len(content.ids), verifies=content.keypoints is not None)  # thresholds for this size
    coarse_spec = CoarseIndexSpec.parse(coarse_spec)
    version = _next_version(store)
    vstore = store.child(f"versions/{version}")
    cascade = CascadeIndex.build(content.ids, content.coarse, content.rerank, n_shards, rerank_dtype,
                                 coarse_spec=coarse_spec, use_gpu=False)
    shards = _write_shards(vstore, cascade)
    ent = content.entries.sort_values(["id", "bank"]).reset_index(drop=True)
    entries = _write_entries(vstore, ent)
    counts = ent.groupby("bank")["id"].nunique().to_dict()
    lists = _write_lists(vstore, content)
    counts.update({h.bank: h.count for h in lists})
    live_ids = set(content.ids.tolist())  # a removed image takes its disabled mark with it
    manifest = Manifest(
        version=version, parent=parent, created_at=now_utc().isoformat(), model=model, rerank_dtype=rerank_dtype,
        coarse_index=coarse_spec, shards=shards, entries=entries,
        banks={n: BankRecord(b, int(counts.get(n, 0))) for n, b in sorted(content.banks.items())},
        counts=Counts(int(len(content.ids)), int(len(ent))), rejected=tuple(content.rejected),
        disabled_references=tuple(content.disabled[i] for i in sorted(content.disabled) if i in live_ids),
        hash_lists=lists, keypoints=_write_keypoints(vstore, content))
    vstore.write_text("manifest.json", manifest.to_json())
    if publish:
        publish_version(store, version)
    return version


def publish_version(store: Store, version: str) -> None:
    """Point ``CURRENT`` at a written version (atomic rename locally, one PUT on S3)."""
    store.write_text("CURRENT", version + "\n")


def write_audited(store: Store, content: GalleryContent, model: VersionModel, n_shards: int, rerank_dtype: str,
                  parent: str | None, coarse_spec: str | CoarseIndexSpec, action: str, who: str | None = None,
                  note: str | None = None, run_id: str | None = None, details: dict | None = None,
                  changes: list[dict] | tuple[dict, ...] = ()) -> str:
    """Write a version, append its audit record, then publish it: the record goes first so that
    every version ``CURRENT`` ever names has one (see :mod:`pipeline.gallery.audit`)."""
    version = write_version(store, content, model, n_shards, rerank_dtype, parent, coarse_spec, publish=False)
    A.append(store, action, version, parent, who=who, note=note, run_id=run_id, details=details, changes=changes)
    publish_version(store, version)
    return version


def write_derived(store: Store, parent: Manifest, content: GalleryContent, action: str, who: str | None = None,
                  note: str | None = None, run_id: str | None = None, details: dict | None = None,
                  changes: list[dict] | tuple[dict, ...] = ()) -> str:
    """:func:`write_audited` for a version derived from ``parent`` (add, remove, review apply): it
    keeps the parent's model and thresholds, shard count, vector dtype and coarse index."""
    return write_audited(store, content, parent.model, len(parent.shards), parent.rerank_dtype, parent.version,
                         parent.coarse_index, action, who, note, run_id, details, changes)


def read_manifest(store: Store, version: str | None = None) -> Manifest:
    v = version or current_version(store)
    if v is None:
        raise GalleryNotFound(f"no gallery at {store.uri} (no CURRENT pointer)")
    key = f"versions/{v}/manifest.json"
    if not store.exists(key):
        raise GalleryNotFound(f"gallery version {v} has no manifest at {store.full_uri(key)}")
    return Manifest.from_json(store.read_text(key))


def resolve_version(uri_or_store: str | Store, model_id: str | None = None) -> Manifest:
    """The manifest of the version ``CURRENT`` names now, and nothing else (no shard is read): what
    a job driver pins once, so that its actors and its review page load exactly that version."""
    store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
    m = read_manifest(store)
    if model_id is not None:
        m.check_model(model_id)
    return m


# --------------------------------------------------------------------------------------------
# A version's content, to derive the next version from
# --------------------------------------------------------------------------------------------
def load_verified(store: Store, m: Manifest) -> tuple[list[Shard], pd.DataFrame]:
    """Shards and entries of manifest ``m``, every file read whole and checked against its sha256
    (:func:`read_content`'s load; querying opens a version with the streaming loader,
    :func:`pipeline.gallery.loader.load_streaming`, which must give the same index)."""
    vstore = store.child(f"versions/{m.version}")
    shards = [Shard.from_bytes(read_verified(vstore, s.index, s.index_sha256),
                               read_verified(vstore, s.rerank, s.rerank_sha256)) for s in m.shards]
    entries = pq.read_table(io.BytesIO(read_verified(vstore, m.entries.file, m.entries.sha256))).to_pandas()
    return shards, entries


@overload
def read_lists(store: Store, m: Manifest, checked: bool = ..., indexes: bool = ...,
               lazy: Literal[False] = ...) -> dict[str, list[HashEntry]]: ...
@overload
def read_lists(store: Store, m: Manifest, checked: bool = ..., indexes: bool = ...,
               *, lazy: Literal[True]) -> dict[str, Sequence[HashEntry]]: ...


def read_lists(store: Store, m: Manifest, checked: bool = False, indexes: bool = True,
               lazy: bool = False) -> dict[str, list[HashEntry]] | dict[str, Sequence[HashEntry]]:
    """The hash lists of manifest ``m``, by bank (:class:`~pipeline.gallery.hashlists.StoredList`),
    every file checked against its sha256. ``indexes``: open each stored PDQ index too (memory-mapped
    from a local gallery, read into memory from S3); ``checked``: the local files' checksums were
    verified already (a node cache's copy), so they are read and mapped without being hashed again.
    ``lazy``: a list with a stored index as :class:`~pipeline.gallery.hashlists.IndexedEntries`
    (entries made on access, for processes that only query)."""
    vstore = store.child(f"versions/{m.version}")
    out: dict[str, Sequence[HashEntry]] = {}
    for h in m.hash_lists:
        data = vstore.read_bytes(h.file) if checked and store.is_local else read_verified(vstore, h.file, h.sha256)
        index = _read_list_index(store, vstore, h, checked) if indexes and h.index else None
        if lazy and index is not None:
            try:
                out[h.bank] = H.IndexedEntries(data, index, h.duplicates)
            except ValueError as e:
                raise GalleryIntegrityError(f"{vstore.full_uri(h.file)}: {e}") from None
        else:
            out[h.bank] = H.StoredList(H.entries_from_bytes(data), h.duplicates, index)
    return out


def _read_list_index(store: Store, vstore: Store, h: HashListFile, checked: bool) -> PdqIndex:
    """A stored PDQ index, checked against its sha256, opened to search flat or multi-hash by size."""
    assert h.index is not None and h.index_sha256 is not None
    try:
        if store.is_local:  # checked in chunks, then memory-mapped: its pages are the node's page cache
            from pipeline.gallery.loader import stream_sha256

            actual = h.index_sha256 if checked else stream_sha256(vstore, h.index)
            if actual != h.index_sha256:
                raise checksum_mismatch(vstore, h.index, h.index_sha256, actual)
            index = PdqIndex.mapped(vstore.path(h.index), kind="auto")
        else:
            index = PdqIndex.from_bytes(read_verified(vstore, h.index, h.index_sha256), kind="auto")
    except ValueError as e:
        raise GalleryIntegrityError(f"{vstore.full_uri(h.index)}: {e}") from None
    if len(index) != h.count:
        raise GalleryIntegrityError(f"{vstore.full_uri(h.index)} holds {len(index)} hashes, the manifest says {h.count}")
    return index


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
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # faiss's stub omits DirectMap
    return np.vstack([idx.reconstruct(int(g)) for g in sh.ids])


class StoredVersion(NamedTuple):
    """A version read back for deriving the next one: its manifest and its decoded content."""

    manifest: Manifest
    content: GalleryContent


def read_content(store: Store, version: str | None = None) -> StoredVersion:
    """Load a version's vectors and entries (verified), e.g. to derive the next version."""
    m = read_manifest(store, version)
    shards, entries = load_verified(store, m)
    ids, coarse, rerank = [], [], []
    for sh in shards:
        if sh.ntotal == 0:
            continue
        ids.append(sh.ids)
        coarse.append(_coarse_vectors(sh))
        rerank.append(decode_rerank(sh.rerank))
    cd, rd = m.model.coarse_dim, m.model.rerank_dim
    content = GalleryContent(
        ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        coarse=np.concatenate(coarse) if coarse else np.zeros((0, cd), np.float32),
        rerank=np.concatenate(rerank) if rerank else np.zeros((0, rd), np.float32),
        entries=entries, banks={n: b.bank for n, b in m.banks.items()}, rejected=list(m.rejected),
        disabled={d.id: d for d in m.disabled_references}, lists=read_lists(store, m, indexes=False))
    table = read_keypoints(store, m)
    if table is not None and m.keypoints is not None:
        content.keypoints, content.verify_params = table.to_packed(), m.keypoints.params
    return StoredVersion(m, content)
