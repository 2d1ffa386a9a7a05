"""Indexes over hash lists: :class:`PdqIndex` (Hamming range search) and :class:`Md5Index` (exact).

**PdqIndex: flat up to** :data:`FLAT_MAX` **entries, multi-index hashing beyond.** Both are exact
at every distance (recall 1.0 against brute force, measured and tested), and both search plain
numpy arrays, so an index stored in a gallery version is memory-mapped rather than rebuilt:

* ``flat``: a brute-force popcount over every entry's 32 bytes (faiss ``hamming_range_search``
  on the codes array itself);
* ``mih``: multi-index hashing over sorted arrays (:mod:`pipeline.signals.multihash`): 11
  substrings of 23 bits, each table a permutation of the entries sorted by substring and a bucket
  directory, probed with ``nflip = max_distance // 11`` flipped bits a table. Exact by the
  pigeonhole principle up to :data:`MAX_NFLIP` (``max_distance <= 32``); past it the query scans
  the same codes flat (still exact). ThreatExchange's ``PDQMultiHashIndex``
  (``pdq_faiss_matcher.py``) uses faiss's ``IndexBinaryMultiHash`` with 16 tables of 16 bits;
  faiss's multi-hash keeps private hash maps (~1 KB/hash, rebuilt in every process), which is why
  it is not used any more (``mih_faiss`` in the benchmark). ``IndexBinaryHNSW`` has no range
  search in faiss and is approximate (recall 0.72 at 100k): not used.

Measured with ``modscan bench hashes`` (:mod:`jobs.bench.hashes`) on uniformly random PDQ-like
hashes (5% near-duplicate variants) with planted near-duplicate queries at distance 31, 1 thread,
2 CPU cores shared with other work (``AMD EPYC`` in ``/proc/cpuinfo``), faiss 1.15.1. Each index
is built once and stored; "load s" is a fresh process opening it (mapping the file; for faiss's
multi-hash, the old path: reading the codes and rebuilding), "anon" the heap that process holds
after loading and querying (``docs/benchmarks.md`` has every column and the commands)::

    size  method     build s  load s  queries/s  anon B/hash  stored B/hash  recall vs flat
    100k  flat        0       0.001     10,793        1           191          1.0
    100k  mih         0.08    0.001      6,703       58           191          1.0
    300k  flat        0       0.001      3,610        0.3         230          1.0
    300k  mih         0.27    0.001      5,334       27           230          1.0
    1M    flat        0       0.001        931        0.1         168          1.0
    1M    mih         1.1     0.001      3,272        9           168          1.0
    1M    mih_faiss  10.5    10.5        2,773      982            32          1.0
    10M   flat        0       0.002         88        0.0         113          1.0
    10M   mih        13.4     0.001      1,469        1.4         113          1.0
    10M   mih_faiss 221.6   221.6          273      616            32          1.0

Flat is faster up to ~200k entries, multi-hash beyond (3.5x flat at 1M, 17x at 10M), hence
:data:`FLAT_MAX` = 200,000; both search the same stored file, so the choice is made on load.
(queries/s vary up to 3x between runs on this shared machine.)

Queries run in batches; a query's matches are sorted by distance, then entry index, so ties are
deterministic. Entry indexes are positions in the list the index was built from.

Storage (:meth:`PdqIndex.to_bytes`, :meth:`PdqIndex.save`; :meth:`PdqIndex.from_bytes`,
:meth:`PdqIndex.load`, :meth:`PdqIndex.mapped`): a safetensors file (format
``modscan.pdq-index`` v2, no pickle) of the ``(n, 32)`` uint8 ``codes`` and, for ``mih``, the
tables' ``perm`` and ``offsets`` (uint32), with the kind and layout in its metadata. A gallery
version stores one beside each pdq list (:mod:`pipeline.gallery.hashlists`); :meth:`PdqIndex.mapped`
opens it with ``np.memmap``, so every process on a node shares its pages. v1 files (codes only)
still load, building the tables.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.signals.hashes import MD5_HEX_LEN, PDQ_BITS, PDQ_BYTES, pack_hex
from pipeline.signals.lists import HashEntry
from pipeline.signals.multihash import MAX_NFLIP, MIH_BITS, MIH_NHASH, MultiHashTables, range_search_codes

__all__ = ["FLAT_MAX", "INDEX_KINDS", "MAX_NFLIP", "MIH_BITS", "MIH_NHASH", "HashMatch", "Md5Index", "PdqIndex"]

INDEX_KINDS = ("auto", "flat", "mih")
# entries up to which `auto` searches flat (the measurement is in the module docstring)
FLAT_MAX = 200_000
QUERY_BATCH = 4096
_FORMAT = "modscan.pdq-index"
_MD5_FORMAT = "modscan.md5-index"
_VERSION = "1"
_PDQ_VERSIONS = ("1", "2")  # 1: codes only; 2: codes + the multi-hash tables
_ST_DTYPES: dict[str, type[np.unsignedinteger[Any]]] = {"U8": np.uint8, "U32": np.uint32}


@dataclass(frozen=True)
class HashMatch:
    """One list entry within reach of a query: its position in the list the index was built from
    and the Hamming distance (0 for MD5). Lists of matches come sorted by distance, then entry
    index (deterministic ties)."""

    entry_idx: int
    distance: int


def _as_entries_hashes(entries: Iterable[HashEntry | str]) -> list[str]:
    return [e.hash if isinstance(e, HashEntry) else str(e) for e in entries]


def _query_codes(hashes: Sequence[str | None] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries -> (codes of the present ones, their positions); None entries are skipped."""
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint8:
        c = np.ascontiguousarray(hashes)
        if c.ndim != 2 or c.shape[1] != PDQ_BYTES:
            raise ValueError(f"PDQ query codes are (n, {PDQ_BYTES}) uint8, got {c.shape}")
        return c, np.arange(len(c))
    hs = list(hashes)
    pos = np.asarray([i for i, h in enumerate(hs) if h is not None], np.int64)
    return pack_hex([hs[i] for i in pos]), pos


def _check_distance(max_distance: int) -> int:
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or not 0 <= max_distance <= PDQ_BITS:
        raise ValueError(f"max_distance must be an integer in [0, {PDQ_BITS}], got {max_distance!r}")
    return int(max_distance)


def _flat_search(codes: np.ndarray, xq: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`range_search_codes` with each query's matches sorted by distance, then entry index."""
    lims, D, I = range_search_codes(codes, xq, r)
    qid = np.repeat(np.arange(len(xq)), np.diff(lims))
    o = np.lexsort((I, D, qid))
    return lims, D[o], I[o]


class PdqIndex:
    """PDQ hashes of one list, searchable by Hamming distance.

    Build with :meth:`build` (entries, bare hex, or ``(n, 32)`` uint8 codes); ``kind`` ``auto``
    takes ``flat`` up to ``flat_max`` (default :data:`FLAT_MAX`) entries and ``mih`` beyond.
    :meth:`query` returns, per query, every entry within ``max_distance`` (inclusive), the same for
    either kind. A stored index opens with :meth:`mapped` (a local file, memory-mapped) or
    :meth:`from_bytes`.
    """

    def __init__(self, codes: np.ndarray, kind: str = "auto", nhash: int = MIH_NHASH, bits: int = MIH_BITS,
                 flat_max: int | None = None, tables: MultiHashTables | None = None) -> None:
        c = codes if isinstance(codes, np.memmap) else np.ascontiguousarray(codes, dtype=np.uint8)
        if c.dtype != np.uint8 or c.ndim != 2 or c.shape[1] != PDQ_BYTES:
            raise ValueError(f"PDQ codes are (n, {PDQ_BYTES}) uint8, got {c.shape}")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if not (1 <= nhash and 1 <= bits <= 32 and nhash * bits <= PDQ_BITS):
            raise ValueError(f"multi-hash layout needs nhash >= 1, 1-32 bits and nhash * bits <= {PDQ_BITS}, got {nhash} x {bits}")
        limit = FLAT_MAX if flat_max is None else int(flat_max)
        self.kind = ("flat" if len(c) <= limit else "mih") if kind == "auto" else kind
        self.nhash, self.bits = int(nhash), int(bits)
        self._codes = c
        self._tables: MultiHashTables | None = None
        if self.kind == "mih":
            self._tables = tables if tables is not None else MultiHashTables.build(c, self.nhash, self.bits)

    @classmethod
    def build(cls, entries: Sequence[HashEntry | str] | np.ndarray, kind: str = "auto", nhash: int = MIH_NHASH,
              bits: int = MIH_BITS, flat_max: int | None = None) -> PdqIndex:
        """An index of ``entries`` in order (entry index = position); ValueError for a malformed hash."""
        codes = entries if isinstance(entries, np.ndarray) else pack_hex(_as_entries_hashes(entries))
        return cls(codes, kind, nhash, bits, flat_max)

    def __len__(self) -> int:
        return len(self._codes)

    def codes(self) -> np.ndarray:
        """The ``(n, 32)`` uint8 codes, in entry order (a copy)."""
        return np.array(self._codes, np.uint8)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays searched, by their stored names (memory maps of a :meth:`mapped` index)."""
        out = {"codes": self._codes}
        if self._tables is not None:
            out.update(perm=self._tables.perm, offsets=self._tables.offsets)
        return out

    def search(self, queries: Sequence[str | None] | np.ndarray, max_distance: int = 31,
               batch_size: int = QUERY_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR form of :meth:`query`: ``(lims, distances, entry_idx)`` with query ``i``'s matches
        at ``lims[i]:lims[i + 1]``, sorted by distance then entry index (``None`` queries: none)."""
        r = _check_distance(max_distance)
        codes, pos = _query_codes(queries)
        nq = len(queries) if not isinstance(queries, np.ndarray) else len(codes)
        counts = np.zeros(nq, np.int64)
        dists: list[np.ndarray] = []
        idxs: list[np.ndarray] = []
        if len(self) and len(codes):
            use_tables = self._tables is not None and r // self.nhash <= MAX_NFLIP
            for s in range(0, len(codes), batch_size):
                xq = codes[s:s + batch_size]
                lims, D, I = self._tables.search(xq, r) if use_tables and self._tables is not None \
                    else _flat_search(self._codes, xq, r)
                counts[pos[s:s + len(xq)]] = np.diff(lims)
                dists.append(D)
                idxs.append(I)
        # queries are in position order and a None query has no matches: concatenation is the CSR
        lims_out = np.zeros(nq + 1, np.int64)
        np.cumsum(counts, out=lims_out[1:])
        D_out = np.concatenate(dists) if dists else np.zeros(0, np.int32)
        I_out = np.concatenate(idxs) if idxs else np.zeros(0, np.int64)
        return lims_out, D_out, I_out

    def query(self, queries: Sequence[str | None] | np.ndarray, max_distance: int = 31,
              batch_size: int = QUERY_BATCH) -> list[list[HashMatch]]:
        """Per query (hex or None), every entry with ``hamming <= max_distance`` (0-256) as
        :class:`HashMatch`, sorted by distance then entry index; ``[]`` for None or no match."""
        lims, D, I = self.search(queries, max_distance, batch_size)
        return [[HashMatch(int(I[k]), int(D[k])) for k in range(lims[q], lims[q + 1])] for q in range(len(lims) - 1)]

    # -- storage ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Safetensors bytes (v2): the codes, the tables of a ``mih`` index, the kind and layout in
        the metadata (no pickle)."""
        meta = {"format": _FORMAT, "version": "2", "kind": self.kind, "nhash": str(self.nhash), "bits": str(self.bits)}
        return st_save({k: np.ascontiguousarray(a) for k, a in self.arrays().items()}, metadata=meta)

    @classmethod
    def _stored(cls, arrays: dict[str, np.ndarray], meta: dict[str, str], kind: str | None,
                flat_max: int | None) -> PdqIndex:
        """An index of stored ``arrays``: as stored (``kind`` None) or by size (``auto``); the
        stored tables are used as they are, never rebuilt."""
        try:
            nhash, bits = int(meta.get("nhash", MIH_NHASH)), int(meta.get("bits", MIH_BITS))
            codes = arrays["codes"]
            tables = MultiHashTables(codes, arrays["perm"], arrays["offsets"], nhash, bits) \
                if "perm" in arrays and "offsets" in arrays else None
            return cls(codes, kind or meta.get("kind", "auto"), nhash, bits, flat_max, tables)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{_FORMAT}: bad content ({meta}): {e}") from None

    @classmethod
    def from_bytes(cls, data: bytes, kind: str | None = None, flat_max: int | None = None) -> PdqIndex:
        """Inverse of :meth:`to_bytes` (v1 files too); ValueError for anything else. ``kind``:
        None keeps the stored kind, ``auto`` chooses by size."""
        raw = bytes(data)
        arrays, meta = _read_safetensors(raw, None)
        _check_pdq_arrays(arrays, meta)
        return cls._stored(arrays, meta, kind, flat_max)

    @classmethod
    def mapped(cls, path: str | os.PathLike[str], kind: str | None = None, flat_max: int | None = None) -> PdqIndex:
        """A stored index memory-mapped read-only from a local file (``np.memmap``: the pages are
        the page cache's, shared by every process that maps the file; nothing is copied or
        rebuilt). The caller checks the file's sha256. ValueError for anything else."""
        arrays, meta = _read_safetensors(None, str(path))
        _check_pdq_arrays(arrays, meta)
        return cls._stored(arrays, meta, kind, flat_max)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PdqIndex:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    def memory_bytes(self) -> int:
        """Bytes of the arrays searched: the codes and, for ``mih``, the tables (private for an
        index built in this process; page cache shared by the node for a :meth:`mapped` one)."""
        return int(self._codes.nbytes + (self._tables.perm.nbytes + self._tables.offsets.nbytes if self._tables else 0))


def _read_safetensors(raw: bytes | None, path: str | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The U8 / U32 tensors of a safetensors buffer (views of it) or local file (memory maps), and
    its metadata; ValueError for a malformed file."""
    try:
        if raw is None:
            assert path is not None
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n < (64 << 20):
                    raise ValueError("no safetensors header")
                header = json.loads(f.read(n))
            size = os.path.getsize(path)
        else:
            n = struct.unpack("<Q", raw[:8])[0]
            if not 0 < n < min(len(raw), 64 << 20):
                raise ValueError("no safetensors header")
            header, size = json.loads(raw[8:8 + n]), len(raw)
        meta = header.pop("__metadata__", None) or {}
        arrays: dict[str, np.ndarray] = {}
        for name, h in header.items():
            dt = _ST_DTYPES[h["dtype"]]
            shape = tuple(int(x) for x in h["shape"])
            a, b = (int(x) for x in h["data_offsets"])
            count = int(np.prod(shape)) if shape else 1
            if b - a != count * np.dtype(dt).itemsize or 8 + n + b > size:
                raise ValueError(f"{name}: {b - a} bytes for shape {shape}")
            if count == 0:
                arrays[name] = np.zeros(shape, dt)
            elif path is not None:
                arrays[name] = np.memmap(path, dtype=dt, mode="r", offset=8 + n + a, shape=shape)
            elif raw is not None:
                arrays[name] = np.frombuffer(raw, dt, count, 8 + n + a).reshape(shape)
        return arrays, meta
    except (KeyError, ValueError, TypeError, OSError, struct.error, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"not a {_FORMAT} file: {type(e).__name__}: {e}") from None


def _check_pdq_arrays(arrays: dict[str, Any], meta: dict[str, str]) -> None:
    if meta.get("format") != _FORMAT or meta.get("version") not in _PDQ_VERSIONS:
        raise ValueError(f"not a {_FORMAT} v{'/'.join(_PDQ_VERSIONS)} file (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    a = arrays.get("codes")
    if a is None or a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != PDQ_BYTES:
        raise ValueError(f"{_FORMAT}: 'codes' must be (n, {PDQ_BYTES}) uint8")


def _load(data: bytes, fmt: str, key: str, width: int) -> tuple[np.ndarray, dict[str, str]]:
    """A safetensors file of ``fmt`` -> (its ``key`` tensor, its metadata); ValueError otherwise."""
    raw = bytes(data)
    try:
        n = struct.unpack("<Q", raw[:8])[0]
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
        t = st_load(raw)
    except Exception as e:
        raise ValueError(f"not a {fmt} file: {type(e).__name__}: {e}") from None
    if meta.get("format") != fmt or meta.get("version") != _VERSION:
        raise ValueError(f"not a {fmt} v{_VERSION} file (format {meta.get('format')!r}, version {meta.get('version')!r})")
    a = t.get(key)
    if a is None or a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{fmt}: {key!r} must be (n, {width}) uint8")
    return a, meta


class Md5Index:
    """MD5 hashes of one list, matched exactly: a sorted array of 16-byte digests and binary
    search. Duplicates are kept (every entry with the digest matches, in entry order)."""

    def __init__(self, digests: np.ndarray) -> None:
        d = np.ascontiguousarray(digests, np.uint8)
        if d.ndim != 2 or d.shape[1] != 16:
            raise ValueError(f"MD5 digests are (n, 16) uint8, got {d.shape}")
        keys = d.view("S16").ravel()
        self._order = np.argsort(keys, kind="stable").astype(np.int64)
        self._sorted = keys[self._order]
        self._digests = d

    @staticmethod
    def _pack(hashes: Sequence[str]) -> np.ndarray:
        hs = list(hashes)
        bad = next((h for h in hs if not isinstance(h, str) or len(h) != MD5_HEX_LEN), None)
        if bad is not None:
            raise ValueError(f"not an MD5 hash (32 hex digits): {bad!r}")
        try:
            raw = bytes.fromhex("".join(hs))
        except ValueError:
            raise ValueError("malformed MD5 hex in the input") from None
        return np.frombuffer(raw, np.uint8).reshape(len(hs), 16)

    @classmethod
    def build(cls, entries: Sequence[HashEntry | str]) -> Md5Index:
        """An index of ``entries`` in order (entry index = position)."""
        return cls(cls._pack(_as_entries_hashes(entries)) if len(entries) else np.zeros((0, 16), np.uint8))

    def __len__(self) -> int:
        return len(self._order)

    def query(self, hashes: Sequence[str | None]) -> list[list[HashMatch]]:
        """Per query (hex, either case, or None), the entries with exactly that MD5 (distance 0),
        in entry order; ``[]`` for None or no match."""
        hs = list(hashes)
        pos = [i for i, h in enumerate(hs) if h is not None]
        out: list[list[HashMatch]] = [[] for _ in hs]
        if not pos or not len(self):
            return out
        keys = self._pack([h for h in hs if h is not None]).view("S16").ravel()
        lo = np.searchsorted(self._sorted, keys, side="left")
        hi = np.searchsorted(self._sorted, keys, side="right")
        for i, a, b in zip(pos, lo, hi):
            if b > a:
                out[i] = [HashMatch(int(e), 0) for e in np.sort(self._order[a:b])]
        return out

    def to_bytes(self) -> bytes:
        return st_save({"digests": np.ascontiguousarray(self._digests)}, metadata={"format": _MD5_FORMAT, "version": _VERSION})

    @classmethod
    def from_bytes(cls, data: bytes) -> Md5Index:
        digests, _ = _load(data, _MD5_FORMAT, "digests", 16)
        return cls(digests)
