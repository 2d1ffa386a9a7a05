"""Indexes over hash lists: :class:`PdqIndex` (Hamming range search, faiss binary) and
:class:`Md5Index` (exact).

**PdqIndex: flat up to** :data:`FLAT_MAX` **entries, multi-index hashing beyond.** Both are exact at
the distances banks use (recall 1.0 against brute force, measured and tested):

* ``flat``: ``faiss.IndexBinaryFlat``, a brute-force popcount over every entry (32 bytes each);
* ``mih``: ``faiss.IndexBinaryMultiHash`` with :data:`MIH_NHASH` = 11 tables of
  :data:`MIH_BITS` = 23 bits (253 of the 256 bits), probed with ``nflip = max_distance // nhash``
  flipped bits per table. That is exact by the pigeonhole principle: if two hashes are within
  ``d`` bits, they are within ``d`` bits on the 253 hashed ones, so one of the 11 disjoint
  substrings differs in at most ``d // 11`` bits, and every substring within ``nflip`` bits of the
  query's is probed. Past :data:`MAX_NFLIP` (``max_distance >= 33``) the probes grow as
  ``C(23, nflip)`` and the query falls back to the flat storage the multi-hash index keeps
  (still exact). ThreatExchange's ``PDQMultiHashIndex`` (``pdq_faiss_matcher.py``) uses 16 tables
  of 16 bits; at distance 31 that probes 1/241 of all entries per query, which is no faster than
  flat at any size measured (``mih16`` below). ``IndexBinaryHNSW`` has no range search in faiss
  (knn + filter only) and is approximate: recall 0.72 at 100k, not used.

So the choice is about cost, not recall. Flat is 32 B/hash, builds instantly and costs time
linear in the list (~1-3 ms per query per million entries and thread here); multi-hash costs an
almost constant ~0.7-2 ms per query, ~1 KB/hash of heap and ~15-35 s of build per million
entries. Multi-hash is 2-5x slower up to 300k, 1.4-3.6x faster at 1M (two runs), 2.5-5.7x faster
at 3M (flat 4.9-11.3 ms/query, multi-hash 2.0 ms/query, 111 s build), and the gap grows linearly
with the list. :data:`FLAT_MAX` is therefore 1M: past it, the 30x memory buys a speed-up that only
grows. Measured with ``modscan bench hashes`` (:mod:`jobs.bench_hashes`) on uniformly random
PDQ-like hashes (5% near-duplicate variants) with planted near-duplicate queries, 1 faiss
thread, 2 CPU cores shared with other work (AMD EPYC), faiss 1.15.1::

    .venv/bin/python -c "from jobs.bench_hashes import bench_hashes; bench_hashes(sizes=(10_000, 100_000), \
        queries=1000, methods=('flat', 'mih', 'mih16', 'hnsw'), hnsw_max_size=100_000)"
    .venv/bin/python -c "from jobs.bench_hashes import bench_hashes; bench_hashes(sizes=(300_000, 1_000_000), \
        queries=1000, methods=('flat', 'mih', 'mih16'))"

    size   method  build s  queries/s  heap B/hash  recall vs flat
    10k    flat    0.0002   51,491       34         1.0
    10k    mih     0.19        835      994         1.0
    100k   flat    0.0004    6,262       32         1.0
    100k   mih     1.5       1,111    1,051         1.0
    100k   mih16   3.0       4,847      834         1.0
    100k   hnsw   16.7       2,388      180         0.72
    300k   flat    0.0015    2,836       32         1.0
    300k   mih     4.3       1,186      991         1.0
    300k   mih16   4.2       1,108      457         1.0
    1M     flat    0.0085      419       32         1.0
    1M     mih    15.4       1,515      982         1.0
    1M     mih16   8.8         256      292         1.0

(queries/s vary up to 2x between runs on this shared machine.) The 1M / 10M figures for the
docs come from ``modscan bench hashes`` on a quiet machine.

Queries run in batches through ``range_search`` (faiss's radius is strict, so the radius passed
is ``max_distance + 1``); a query's matches are sorted by distance, then entry index, so ties are
deterministic. Entry indexes are positions in the list the index was built from.

Storage (:meth:`PdqIndex.to_bytes` / :meth:`PdqIndex.from_bytes`, :meth:`PdqIndex.save` /
:meth:`PdqIndex.load`): a safetensors file of the ``(n, 32)`` codes plus the index kind in its
metadata, no pickle; loading rebuilds the faiss index (instant for flat, ~30 s per million
entries for multi-hash).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.signals.hashes import MD5_HEX_LEN, PDQ_BITS, PDQ_BYTES, pack_hex
from pipeline.signals.lists import HashEntry

INDEX_KINDS = ("auto", "flat", "mih")
# entries up to which `auto` builds a flat index (the measurement is in the module docstring)
FLAT_MAX = 1_000_000
# multi-index hashing layout: 11 tables of 23 bits (253 of the 256 bits), probed with nflip = 2 at
# distance 31 (measured fastest of 8x32, 10x25, 11x23, 12x21, 14x18, 16x16 at 1M entries)
MIH_NHASH = 11
MIH_BITS = 23
MAX_NFLIP = 2
QUERY_BATCH = 4096
_FORMAT = "modscan.pdq-index"
_MD5_FORMAT = "modscan.md5-index"
_VERSION = "1"


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


class PdqIndex:
    """PDQ hashes of one list, searchable by Hamming distance.

    Build with :meth:`build` (entries, bare hex, or ``(n, 32)`` uint8 codes); ``kind`` ``auto``
    takes ``flat`` up to :data:`FLAT_MAX` entries and ``mih`` beyond. :meth:`query` returns, per
    query, every entry within ``max_distance`` (inclusive), the same for either kind.
    """

    def __init__(self, codes: np.ndarray, kind: str = "auto", nhash: int = MIH_NHASH, bits: int = MIH_BITS) -> None:
        c = np.ascontiguousarray(codes, dtype=np.uint8)
        if c.ndim != 2 or c.shape[1] != PDQ_BYTES:
            raise ValueError(f"PDQ codes are (n, {PDQ_BYTES}) uint8, got {c.shape}")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if not (1 <= nhash and 1 <= bits <= 64 and nhash * bits <= PDQ_BITS):
            raise ValueError(f"multi-hash layout needs nhash >= 1, 1-64 bits and nhash * bits <= {PDQ_BITS}, got {nhash} x {bits}")
        self.kind = ("flat" if len(c) <= FLAT_MAX else "mih") if kind == "auto" else kind
        self.nhash, self.bits = int(nhash), int(bits)
        if self.kind == "flat":
            self._index: faiss.IndexBinary = faiss.IndexBinaryFlat(PDQ_BITS)
            self._flat = self._index
        else:
            mih = faiss.IndexBinaryMultiHash(PDQ_BITS, self.nhash, self.bits)
            self._index, self._flat = mih, mih.storage
        if len(c):
            self._index.add(c)

    @classmethod
    def build(cls, entries: Sequence[HashEntry | str] | np.ndarray, kind: str = "auto", nhash: int = MIH_NHASH,
              bits: int = MIH_BITS) -> PdqIndex:
        """An index of ``entries`` in order (entry index = position); ValueError for a malformed hash."""
        codes = entries if isinstance(entries, np.ndarray) else pack_hex(_as_entries_hashes(entries))
        return cls(codes, kind, nhash, bits)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def codes(self) -> np.ndarray:
        """The ``(n, 32)`` uint8 codes, in entry order (a copy)."""
        return faiss.vector_to_array(self._flat.xb).reshape(-1, PDQ_BYTES).copy()

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
            nflip = r // self.nhash
            index = self._index if self.kind == "mih" and nflip <= MAX_NFLIP else self._flat
            if index is not self._flat:
                index.nflip = nflip
            for s in range(0, len(codes), batch_size):
                lims, D, I = index.range_search(codes[s:s + batch_size], r + 1)
                per = np.diff(lims.astype(np.int64))
                qid = np.repeat(np.arange(len(per)), per)
                o = np.lexsort((I, D, qid))  # by query, then distance, then entry index
                counts[pos[s:s + len(per)]] = per
                dists.append(D[o].astype(np.int32))
                idxs.append(I[o].astype(np.int64))
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

    def to_bytes(self) -> bytes:
        """Safetensors bytes: the codes, and the kind in the metadata (no pickle)."""
        return st_save({"codes": self.codes()}, metadata={"format": _FORMAT, "version": _VERSION,
                                                           "kind": self.kind, "nhash": str(self.nhash), "bits": str(self.bits)})

    @classmethod
    def from_bytes(cls, data: bytes) -> PdqIndex:
        """Inverse of :meth:`to_bytes`; ValueError for anything else."""
        codes, meta = _load(data, _FORMAT, "codes", PDQ_BYTES)
        try:
            return cls(codes, meta.get("kind", "auto"), int(meta.get("nhash", MIH_NHASH)), int(meta.get("bits", MIH_BITS)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{_FORMAT}: bad metadata {meta}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PdqIndex:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    def memory_bytes(self) -> int:
        """Bytes faiss would serialise this index to: the codes and, for multi-hash, its tables."""
        return int(faiss.serialize_index_binary(self._index).size)


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
        keys = self._pack([hs[i] for i in pos]).view("S16").ravel()
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
