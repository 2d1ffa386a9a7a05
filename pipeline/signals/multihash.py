"""Exact Hamming range search over 256-bit PDQ codes held in plain numpy arrays, so that a stored
index is memory-mapped and shared by every process on a node instead of rebuilt in each.

**Multi-index hashing over sorted arrays.** The code's first ``nhash * bits`` bits are cut into
``nhash`` disjoint substrings (default :data:`MIH_NHASH` = 11 of :data:`MIH_BITS` = 23 bits,
253 of the 256). Per substring ("table") the index keeps

* ``perm``: the entries sorted by the top ``dbits`` bits of their substring (stable: entry order
  within a bucket), ``(nhash, n)`` uint32;
* ``offsets``: where each of the ``2**dbits`` buckets starts in ``perm``, ``(nhash, 2**dbits + 1)``
  uint32, so a bucket's run is ``perm[t, offsets[t, k]:offsets[t, k + 1]]`` — two reads, no
  search;

and the ``(n, 32)`` uint8 ``codes`` the exact distances are checked on. ``dbits`` is
``min(bits, ceil(log2 n) + 1)``: at most about one entry a bucket on random codes, and a
directory of at most ``4 n`` offsets a table (16 B/hash). At 10M entries it is the full 23 bits
(an exact key lookup); below ~4M a bucket holds 2-8 keys and the extra candidates are dropped
by the exact distance check.

**Exact by the pigeonhole principle.** Two codes within ``d`` bits are within ``d`` bits on the
hashed ones, so one of the ``nhash`` disjoint substrings differs in at most ``nflip = d // nhash``
bits; a query probes, in every table, each bucket that a substring within ``nflip`` bits of its own
falls in (the distinct ``(mask >> (bits - dbits))`` for every mask of at most ``nflip`` set bits:
277 at ``nflip = 2`` and 23 bits), gathers the entries, and keeps those within ``d`` on all 256
bits. Past :data:`MAX_NFLIP` the probes grow as ``C(bits, nflip)`` and the caller falls back to a
brute-force scan of the same codes (:func:`range_search_codes`, still exact).

Why not faiss's ``IndexBinaryMultiHash``: it deserialises into private hash maps (616-982 B/hash
in every process, 171-256 s to build at 10M here); these arrays are 110-230 B/hash, built once
when a gallery version is written (13 s at 10M), and a process maps them in a millisecond without
reading them (``docs/benchmarks.md``).
"""

from __future__ import annotations

import itertools

import faiss
import numpy as np

PDQ_BYTES = 32
PDQ_BITS = 256
# 11 tables of 23 bits (253 of the 256 bits), probed with nflip = 2 at distance 31 (measured
# fastest of 8x32, 10x25, 11x23, 12x21, 14x18, 16x16 at 1M entries with faiss's multi-hash)
MIH_NHASH = 11
MIH_BITS = 23
MAX_NFLIP = 2
# queries probed together, and the candidates one pass may gather before it splits its queries
MIH_BATCH = 128
MAX_CANDIDATES = 4_000_000


def directory_bits(n: int, bits: int) -> int:
    """``dbits`` of a table over ``n`` entries: ``min(bits, ceil(log2 n) + 1)``, at least 1."""
    return min(int(bits), max(1, int(max(n, 1) - 1).bit_length() + 1))


def substring_keys(codes: np.ndarray, nhash: int, bits: int) -> np.ndarray:
    """``(nhash, n)`` uint32: substring ``t`` of each ``(n, 32)`` code is its bits ``t * bits`` to
    ``(t + 1) * bits - 1``, first bit most significant (``np.unpackbits`` order)."""
    c = np.ascontiguousarray(codes, np.uint8)
    words = c.view(">u8").astype(np.uint64)  # (n, 4) big-endian words: bit 0 is word 0's top bit
    out = np.empty((nhash, len(c)), np.uint32)
    for t in range(nhash):
        i, r = divmod(t * bits, 64)
        hi = words[:, i] << np.uint64(r)
        if r and r + bits > 64:
            hi |= words[:, i + 1] >> np.uint64(64 - r)
        out[t] = (hi >> np.uint64(64 - bits)).astype(np.uint32)
    return out


def flip_masks(bits: int, nflip: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``nflip`` set bits, uint32 (``sum C(bits, i)``)."""
    masks = [0]
    for k in range(1, nflip + 1):
        masks += [sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), k)]
    return np.asarray(masks, np.uint32)


def range_search_codes(xb: np.ndarray, xq: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force: ``(lims, D, I)`` of every ``xb`` row within ``max_distance`` of each ``xq`` row
    (faiss ``hamming_range_search`` on the arrays themselves, memory-mapped ones included: nothing
    is copied into an index). Unsorted within a query."""
    nq = len(xq)
    if not len(xb) or not nq:
        return np.zeros(nq + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
    xq = np.ascontiguousarray(xq, np.uint8)
    if not xb.flags.c_contiguous:
        xb = np.ascontiguousarray(xb)
    res = faiss.RangeSearchResult(nq)
    # faiss's radius is strict; its stubs lack the function
    faiss.hamming_range_search(faiss.swig_ptr(xq), faiss.swig_ptr(xb), nq, len(xb),  # type: ignore[attr-defined]
                               int(max_distance) + 1, PDQ_BYTES, res)
    lims = faiss.rev_swig_ptr(res.lims, nq + 1).astype(np.int64)
    nd = int(lims[-1])
    D = faiss.rev_swig_ptr(res.distances, nd).astype(np.int32) if nd else np.zeros(0, np.int32)
    I = faiss.rev_swig_ptr(res.labels, nd).astype(np.int64) if nd else np.zeros(0, np.int64)
    return lims, D, I


def _runs(lo: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Positions ``lo[i] .. lo[i] + cnt[i] - 1`` for every ``i``, concatenated (int64)."""
    total = int(cnt.sum())
    starts = np.repeat(lo - np.cumsum(cnt) + cnt, cnt)
    return starts + np.arange(total, dtype=np.int64)


class MultiHashTables:
    """The arrays of one multi-index hashing index (module docstring). Read-only once built: any
    of them may be a memory map of a stored index.

    ``codes`` (n, 32) uint8, ``perm`` (nhash, n) uint32, ``offsets`` (nhash, 2**dbits + 1) uint32."""

    def __init__(self, codes: np.ndarray, perm: np.ndarray, offsets: np.ndarray, nhash: int, bits: int) -> None:
        n = len(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != PDQ_BYTES:
            raise ValueError(f"codes must be (n, {PDQ_BYTES}) uint8, got {codes.dtype} {codes.shape}")
        if not (1 <= nhash and 1 <= bits <= 32 and nhash * bits <= PDQ_BITS):
            raise ValueError(f"multi-hash layout needs nhash >= 1, 1-32 bits and nhash * bits <= {PDQ_BITS}, "
                             f"got {nhash} x {bits}")
        dbits = directory_bits(n, bits)
        if perm.dtype != np.uint32 or perm.shape != (nhash, n):
            raise ValueError(f"perm must be ({nhash}, {n}) uint32, got {perm.dtype} {perm.shape}")
        if offsets.dtype != np.uint32 or offsets.shape != (nhash, (1 << dbits) + 1):
            raise ValueError(f"offsets must be ({nhash}, {(1 << dbits) + 1}) uint32, got {offsets.dtype} {offsets.shape}")
        if nhash and n and not (int(offsets[:, 0].max()) == 0 and (np.asarray(offsets[:, -1]) == n).all()):
            raise ValueError("offsets must run from 0 to n in every table")
        self.codes, self.perm, self.offsets = codes, perm, offsets
        self.nhash, self.bits, self.dbits = int(nhash), int(bits), dbits

    @classmethod
    def build(cls, codes: np.ndarray, nhash: int = MIH_NHASH, bits: int = MIH_BITS) -> MultiHashTables:
        """Sort every table of ``codes`` ((n, 32) uint8, kept by reference)."""
        c = np.ascontiguousarray(codes, np.uint8)
        if c.ndim != 2 or c.shape[1] != PDQ_BYTES:
            raise ValueError(f"codes must be (n, {PDQ_BYTES}) uint8, got {c.shape}")
        if not 1 <= bits <= 32 or nhash * bits > PDQ_BITS or nhash < 1:
            raise ValueError(f"multi-hash layout needs nhash >= 1, 1-32 bits and nhash * bits <= {PDQ_BITS}, "
                             f"got {nhash} x {bits}")
        n, dbits = len(c), directory_bits(len(c), bits)
        perm = np.empty((nhash, n), np.uint32)
        offsets = np.zeros((nhash, (1 << dbits) + 1), np.uint32)
        entry = np.arange(n, dtype=np.uint64)
        for t, keys in enumerate(substring_keys(c, nhash, bits)):
            bucket = keys >> np.uint32(bits - dbits)
            # (bucket, entry) packed in one uint64 and sorted: entry order within a bucket, and faster
            # than a stable argsort (numpy's SIMD sort of 64-bit integers)
            order = (bucket.astype(np.uint64) << np.uint64(32)) | entry
            order.sort()
            perm[t] = order & np.uint64(0xFFFFFFFF)
            np.cumsum(np.bincount(bucket, minlength=1 << dbits), out=offsets[t, 1:])
        return cls(c, perm, offsets, nhash, bits)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.perm.nbytes + self.offsets.nbytes)

    def search(self, xq: np.ndarray, max_distance: int,
               max_candidates: int = MAX_CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lims, D, I)``: every entry within ``max_distance`` of each ``(m, 32)`` query, a query's
        matches sorted by distance then entry index. ValueError past :data:`MAX_NFLIP`. Queries are
        probed :data:`MIH_BATCH` at a time, fewer where their candidates exceed ``max_candidates``
        (lists with many near-identical entries fill some buckets)."""
        nflip = int(max_distance) // self.nhash
        if nflip > MAX_NFLIP:
            raise ValueError(f"distance {max_distance} needs {nflip} flipped bits a table (> {MAX_NFLIP}): scan instead")
        xq = np.ascontiguousarray(xq, np.uint8)
        masks = np.unique(flip_masks(self.bits, nflip) >> np.uint32(self.bits - self.dbits))
        qkeys = substring_keys(xq, self.nhash, self.bits) >> np.uint32(self.bits - self.dbits)
        parts = [self._search_batch(xq, qkeys, masks, s, min(s + MIH_BATCH, len(xq)), int(max_distance), max_candidates)
                 for s in range(0, len(xq), MIH_BATCH)]
        counts = np.zeros(len(xq), np.int64)
        for q, _d, _e in parts:
            counts += np.bincount(q, minlength=len(xq))
        lims = np.zeros(len(xq) + 1, np.int64)
        np.cumsum(counts, out=lims[1:])
        D = np.concatenate([d for _q, d, _e in parts]) if parts else np.zeros(0, np.int32)
        I = np.concatenate([e for _q, _d, e in parts]) if parts else np.zeros(0, np.int64)
        return lims, D, I

    def _search_batch(self, xq: np.ndarray, qkeys: np.ndarray, masks: np.ndarray, s: int, e: int, r: int,
                      cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries ``s:e``: (query, distance, entry) of their matches, sorted; split in halves while
        the candidates they would gather exceed ``cap``."""
        probes = qkeys[:, s:e, None] ^ masks[None, None, :]            # (nhash, b, P) bucket ids
        lo = np.stack([self.offsets[t][probes[t]] for t in range(self.nhash)]).astype(np.int64)
        cnt = np.stack([self.offsets[t][probes[t] + 1] for t in range(self.nhash)]).astype(np.int64) - lo
        if e - s > 1 and int(cnt.sum()) > cap:
            m = (s + e) // 2
            a, b = self._search_batch(xq, qkeys, masks, s, m, r, cap), self._search_batch(xq, qkeys, masks, m, e, r, cap)
            return tuple(np.concatenate([x, y]) for x, y in zip(a, b))  # type: ignore[return-value]
        qs, es = [], []
        for t in range(self.nhash):
            nz = cnt[t].ravel() > 0
            c = cnt[t].ravel()[nz]
            es.append(self.perm[t][_runs(lo[t].ravel()[nz], c)])
            qs.append(np.repeat(np.repeat(np.arange(s, e), probes.shape[2])[nz], c))
        q = np.concatenate(qs).astype(np.int64)
        ent = np.concatenate(es).astype(np.int64)
        words = self.codes.view(np.uint64)                               # (n, 4): 4 popcounts a pair
        d = np.bitwise_count(words[ent] ^ xq.view(np.uint64)[q]).sum(1, dtype=np.int32)
        keep = d <= r
        key, first = np.unique(q[keep] * len(self.codes) + ent[keep], return_index=True)  # found in two tables: once
        q, ent, d = key // len(self.codes), key % len(self.codes), d[keep][first]
        o = np.lexsort((ent, d, q))
        return q[o], d[o], ent[o]
