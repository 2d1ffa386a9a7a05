"""One copy of a gallery version per node: verified once, memory-mapped by every actor.

A job's Moderator actors all query the same read-only version. Loading it privately costs each
actor the whole version in its own memory (and each restart a full read and check from S3); at
millions of references the node's memory, not its GPUs or cores, then decides how many actors it
holds. The node cache keeps one local copy per node and version, in a layout every array of
which is memory-mapped read-only, so the actors of a node share the same physical pages:

``ROOT/<store key>/versions/<version>/`` (``ROOT``: ``[job] gallery_cache_dir``,
``$MODSCAN_GALLERY_CACHE``, else ``<tmp>/modscan-gallery-cache``; store key: a hash of the
gallery's URI)::

    manifest.json                  the version's manifest, as published
    cache.json                     cache format, source URI, sizes of the files below, fill time
    shard-NNN.coarse.faiss         each shard's bare coarse index (no IDMap: faiss IO_FLAG_MMAP_IFC
                                   maps its codes), and shard-NNN.labels.npy, its row -> id table
    rerank.npy, ids.npy, rows.npy  every rerank vector in ascending id order, the ids, and the
                                   dense id -> row table (absent when ids are sparse)
    entries.arrow                  the entries as an uncompressed Arrow IPC file (bank, category
                                   and action dictionary-encoded; zero-copy reads)
    <every other manifest file>    copied as published (keypoints, hash lists...)

**Filling** is done by whichever process comes first, under an exclusive ``flock`` on
``<version>.lock``: every file is streamed from storage through sha256 (a mismatch is a
:class:`~pipeline.gallery.store.GalleryIntegrityError` and nothing is kept), written into a
``<version>.partial-*`` folder, and the folder is renamed into place: a version folder that
exists is complete. The others wait on the lock and attach. **Attaching** reads ``cache.json``,
checks that every file has the size it was written with, and maps the files: no byte is read
from storage again, and no byte is hashed again (each was checked once per node and version).
An actor that Ray restarts re-attaches in milliseconds.

Older versions of the same gallery are removed once a newer one is filled, keeping the newest
:data:`KEEP_VERSIONS`: a process still mapping a removed version keeps its pages (Linux frees
unlinked files when the last mapping goes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.gallery.index import CascadeIndex, Shard, dense_rows
from pipeline.gallery.manifest import Manifest
from pipeline.gallery.store import GalleryIntegrityError, checksum_mismatch, read_manifest, read_verified
from pipeline.ingest.storage import Store, open_store

CACHE_FORMAT = 1
KEEP_VERSIONS = 2
ENV_VAR = "MODSCAN_GALLERY_CACHE"
_DICT_COLUMNS = ("bank", "category", "action")
# the version locks this process holds (shared, for its lifetime): path -> open lock file
_HELD: dict[str, Any] = {}


def default_root() -> Path:
    """``$MODSCAN_GALLERY_CACHE``, else ``<tmp>/modscan-gallery-cache`` (node-local disk)."""
    return Path(os.environ.get(ENV_VAR) or Path(tempfile.gettempdir()) / "modscan-gallery-cache")


def store_key(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Attached:
    """A version in the node cache, mapped: its manifest, its folder, and what attaching cost."""

    manifest: Manifest
    path: Path              # ROOT/<store key>/versions/<version>
    filled: bool            # this process filled the cache (False: it was there already)
    seconds: float          # time to fill (or wait) and attach

    @property
    def store(self) -> Store:
        """The cache as a local gallery store (``versions/<version>/`` under it)."""
        return open_store(str(self.path.parent.parent))

    def cascade(self, use_gpu: bool | None = None, nprobe: int | None = None,
                ef_search: int | None = None, shards: Sequence[int] | None = None) -> CascadeIndex:
        """The version's cascade over the mapped files (no copy; HNSW graphs and IVF lists, which
        faiss cannot map, are read into the process). ``shards``: only those shards (a shard
        server's, :mod:`pipeline.gallery.sharded`): their coarse indexes mapped, and their rerank
        vectors copied out of the shared matrix into this process (the rows of one shard are spread
        over the whole file, so mapping it would touch every page)."""
        m = self.manifest
        picked = [self._shard(i) for i in (range(len(m.shards)) if shards is None else sorted(set(shards)))]
        ids, rerank = np.load(self.path / "ids.npy", mmap_mode="r"), random_access(np.load(self.path / "rerank.npy", mmap_mode="r"))
        if shards is not None:
            own = np.sort(np.concatenate([np.asarray(s.ids, np.int64) for s in picked] or [np.zeros(0, np.int64)]))
            rows = np.searchsorted(ids, own)
            vecs = np.empty((len(own), m.model.rerank_dim), rerank.dtype)
            for b in range(0, len(own), 1 << 16):  # in blocks: no temporary as large as the result
                vecs[b:b + (1 << 16)] = rerank[rows[b:b + (1 << 16)]]
            return CascadeIndex.attached(picked, m.model.coarse_dim, m.model.rerank_dim, own, vecs, dense_rows(own),
                                         use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search)
        rows_path = self.path / "rows.npy"
        return CascadeIndex.attached(picked, m.model.coarse_dim, m.model.rerank_dim, ids, rerank,
                                     np.load(rows_path, mmap_mode="r") if rows_path.exists() else None,
                                     use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search)

    def _shard(self, i: int) -> Shard:
        """Shard ``i``: its bare coarse index mapped, with its row -> id table (or an IVF index that
        carries its ids, with its ids)."""
        import faiss

        index = faiss.read_index(str(self.path / f"shard-{i:03d}.coarse.faiss"),
                                 faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        labels_path = self.path / f"shard-{i:03d}.labels.npy"
        if labels_path.exists():
            return Shard(index, np.load(labels_path, mmap_mode="r"), np.empty((0, 0)), positional=True)
        return Shard(index, np.load(self.path / f"shard-{i:03d}.ids.npy", mmap_mode="r"), np.empty((0, 0)))

    def entries(self) -> pa.Table:
        """The entries table, memory-mapped (zero-copy column buffers)."""
        return ipc.open_file(pa.memory_map(str(self.path / "entries.arrow"))).read_all()


class NodeCache:
    """The node's cache of gallery versions under ``root`` (:func:`default_root` when None)."""

    def __init__(self, root: str | Path | None = None, keep_versions: int = KEEP_VERSIONS) -> None:
        self.root = Path(root) if root else default_root()
        self.keep_versions = keep_versions

    def attach(self, gallery: str | Store, version: str | None = None) -> Attached:
        """Map ``version`` of ``gallery`` (default: what ``CURRENT`` names now), filling the cache
        first when this node does not hold it yet. The process holds a shared lock on the version
        for as long as it lives, so that no other process evicts what it maps."""
        t0 = time.perf_counter()
        store = open_store(gallery) if isinstance(gallery, str) else gallery
        base = self.root / store_key(store.uri) / "versions"
        if version is None:
            version = read_manifest(store).version
        final = base / version
        base.mkdir(parents=True, exist_ok=True)
        lock = _HELD.get(str(final))
        if lock is None:
            lock = open(base / f"{version}.lock", "a+")
            fcntl.flock(lock, fcntl.LOCK_SH)  # waits while another process fills
        filled = False
        if not (final / "cache.json").exists():
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first process fills, the others wait here
            if not (final / "cache.json").exists():
                self._fill(store, read_manifest(store, version), final)
                filled = True
            fcntl.flock(lock, fcntl.LOCK_SH)
        _HELD[str(final)] = lock
        m = self._check(final)
        if filled:
            self._evict(base, version)
        return Attached(m, final, filled, time.perf_counter() - t0)

    # -- filling -----------------------------------------------------------------------------
    def _fill(self, store: Store, m: Manifest, final: Path) -> None:
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{m.version}.partial-", dir=final.parent))
        try:
            vstore = store.child(f"versions/{m.version}")
            converted = {m.entries.file} | {f for s in m.shards for f in (s.index, s.rerank)}
            _write_entries(vstore, m, tmp / "entries.arrow")
            _write_shards(vstore, m, tmp)
            for name, sha in m.files():
                if name not in converted:
                    _copy_verified(vstore, name, sha, tmp / name)
            (tmp / "manifest.json").write_text(m.to_json())
            for f in sorted(tmp.iterdir()):
                drop_from_page_cache(f)
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / "cache.json").write_text(json.dumps(
                {"format": CACHE_FORMAT, "source": store.uri, "version": m.version, "sizes": sizes,
                 "fill_seconds": round(time.perf_counter() - t0, 3)}, indent=2))
            if final.exists():  # an incomplete folder of an older layout: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _check(path: Path) -> Manifest:
        """The cached manifest, once every file has the size it was written with."""
        info = json.loads((path / "cache.json").read_text())
        if info.get("format") != CACHE_FORMAT:
            raise GalleryIntegrityError(f"node cache {path}: format {info.get('format')} is not {CACHE_FORMAT}; "
                                        f"remove the folder to refill it")
        for name, size in info["sizes"].items():
            p = path / name
            if not p.exists() or p.stat().st_size != size:
                raise GalleryIntegrityError(f"node cache {path}: {name} is missing or truncated; remove the "
                                            f"folder to refill it")
        return Manifest.from_json((path / "manifest.json").read_text())

    def _evict(self, base: Path, keep: str) -> None:
        """Remove all but the newest :attr:`keep_versions` complete versions (never ``keep``)."""
        done = sorted(p.name for p in base.iterdir() if (p / "cache.json").exists())
        for old in [v for v in done if v != keep][: max(0, len(done) - self.keep_versions)]:
            if str(base / old) in _HELD:
                continue  # this process maps it
            with open(base / f"{old}.lock", "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # mapped by another process, or being filled
                shutil.rmtree(base / old, ignore_errors=True)


def drop_from_page_cache(path: Path) -> None:
    """Flush a filled file to disk and drop its pages from the page cache (``POSIX_FADV_DONTNEED``):
    a fill writes the whole version (13 GB at 10M references) and would otherwise leave all of it
    cached, pushing out other pages, although the job then touches only the coarse codes and its
    candidates' rows. Pages the actors read come back on demand."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def random_access(a: np.ndarray) -> np.ndarray:
    """``a`` (an ``np.load(mmap_mode="r")`` map) with the kernel told that its pages are read at
    random (``MADV_RANDOM``): no read-around. The rerank matrix is read a few candidate rows at a
    time, and read-around would page in 128 KB about each 1 KB row: at 10M references, one batch of
    32 queries with 500 candidates each made 3 GB of the 9.5 GB matrix resident instead of 16 MB."""
    mm = getattr(a, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return a


def resident_bytes(path: Path) -> int:
    """Bytes of the file ``path`` resident in the page cache (``mincore``)."""
    size = path.stat().st_size
    if not size:
        return 0
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = ctypes.c_char.from_buffer(mm)
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident = int((np.frombuffer(memoryview(vec), np.uint8) & 1).sum()) * page
        del buf
    finally:
        mm.close()
    return min(resident, size)


def _copy_verified(vstore: Store, name: str, sha: str, dest: Path) -> None:
    """Stream a file to ``dest`` through sha256."""
    from pipeline.gallery.loader import stream_sha256

    with open(dest, "wb") as out:
        actual = stream_sha256(vstore, name, sink=out)
    if actual != sha:
        raise checksum_mismatch(vstore, name, sha, actual)


def _write_entries(vstore: Store, m: Manifest, dest: Path) -> None:
    table = pq.read_table(pa.BufferReader(read_verified(vstore, m.entries.file, m.entries.sha256)))
    ids = table.column("id").to_numpy()
    if len(ids) > 1 and np.any(np.diff(ids) < 0):
        table = table.sort_by([("id", "ascending"), ("bank", "ascending")])
    for c in _DICT_COLUMNS:
        i = table.schema.get_field_index(c)
        table = table.set_column(i, c, table.column(c).dictionary_encode())
    table = table.combine_chunks()
    with ipc.new_file(str(dest), table.schema) as w:
        w.write_table(table)


def _write_shards(vstore: Store, m: Manifest, tmp: Path) -> None:
    """Coarse indexes unwrapped to their bare index + label table; rerank vectors streamed into one
    id-sorted ``.npy`` (``np.lib.format.open_memmap``), each file hashed on the way."""
    import faiss

    from pipeline.gallery.loader import read_shards, rerank_layout

    layout = rerank_layout(vstore, m)
    rerank = np.lib.format.open_memmap(str(tmp / "rerank.npy"), "w+", layout.dtype,
                                       (len(layout.sorted_ids), m.model.rerank_dim))
    for i, ((ids, _), index) in enumerate(zip(layout.shards, read_shards(vstore, m, layout, rerank))):
        if isinstance(index, faiss.IndexIDMap2):
            np.save(tmp / f"shard-{i:03d}.labels.npy", faiss.vector_to_array(index.id_map).astype(np.int64))
            faiss.write_index(faiss.downcast_index(index.index), str(tmp / f"shard-{i:03d}.coarse.faiss"))
        else:
            np.save(tmp / f"shard-{i:03d}.ids.npy", np.asarray(ids, np.int64))
            faiss.write_index(index, str(tmp / f"shard-{i:03d}.coarse.faiss"))
        del index
    rerank.flush()
    del rerank
    sorted_ids = layout.sorted_ids
    np.save(tmp / "ids.npy", sorted_ids)
    rows = dense_rows(sorted_ids)
    if rows is not None:
        np.save(tmp / "rows.npy", rows)


def cached_status(root: str | Path | None = None) -> list[dict[str, Any]]:
    """What the node cache holds: one row per cached version (source, version, bytes)."""
    base = Path(root) if root else default_root()
    out = []
    for info_path in sorted(base.glob("*/versions/*/cache.json")):
        info = json.loads(info_path.read_text())
        out.append({"source": info.get("source"), "version": info.get("version"),
                    "bytes": sum(info.get("sizes", {}).values()), "path": str(info_path.parent)})
    return out
