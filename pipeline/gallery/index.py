"""The sharded two-stage index: coarse 128-d faiss shards + 512-d rerank vectors, ids everywhere.

One interface (like ThreatExchange's ``SignalTypeIndex``): :meth:`CascadeIndex.build`,
:meth:`CascadeIndex.search_coarse` (128-d queries -> top-K ids above the coarse threshold, each
shard's top-K merged by :func:`merge_coarse`) and :meth:`CascadeIndex.score_fine` (512-d queries x
candidate ids -> fine scores). :attr:`CascadeIndex.shards` holds one :class:`Shard` per file pair
(:meth:`Shard.index_bytes` / :meth:`Shard.rerank_bytes`, :meth:`Shard.from_bytes`).

Ids are explicit int64 (``IndexIDMap2``); an entry lives in shard ``id % n_shards``. Row position
is never identity: rerank vectors are looked up by id through a sorted id table.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

RERANK_DTYPES = ("float32", "float16", "int8")


@dataclass(frozen=True)
class ScoreNorm:
    """Score normalisation of the fine (512-d) score, SSCD-style:

    ``fine = raw - beta * mean(top-k cosine of the query to the background bank)``

    The background bank (shipped with the model) holds pictures that are never references:
    training photos and generated everyday pictures. A query that looks like much of the world
    (a gradient, a caption on a flat colour, a generic scene) is close to the background and loses
    more than a distinctive one, so one threshold holds across content types. ``beta = 0`` turns
    it off. ``modscan evaluate`` calibrates ``beta`` and ``k`` and stores them in the card.
    """

    beta: float = 0.0
    k: int = 1

    @classmethod
    def from_dict(cls, d: dict | None) -> ScoreNorm:
        d = d or {}
        return cls(beta=float(d.get("beta", 0.0)), k=int(d.get("k", 1)))

    def to_dict(self) -> dict:
        return {"beta": self.beta, "k": self.k}


def background_term(xq512: np.ndarray, background: np.ndarray | None, k: int) -> np.ndarray:
    """``(B, d)`` queries x ``(N, d)`` background -> ``(B,)`` mean of each query's top-k cosines."""
    xq = np.asarray(xq512, np.float32)
    if background is None or len(background) == 0 or len(xq) == 0:
        return np.zeros(len(xq), np.float32)
    S = xq @ np.asarray(background, np.float32).T
    k = max(1, min(k, S.shape[1]))
    top = -np.partition(-S, k - 1, axis=1)[:, :k]
    return top.mean(axis=1).astype(np.float32)


@dataclass(frozen=True)
class CascadeParams:
    """Thresholds and sizes of the cascade; the single place they live at query time."""

    coarse_threshold: float
    fine_threshold: float
    rerank_k: int = 500
    norm: ScoreNorm = ScoreNorm()
    # the descriptor-alone threshold (normalised fine score): a candidate between ``fine_threshold``
    # and this one matches only when geometric verification confirms it (pipeline.gallery.verify).
    # None: no verification stage (every candidate at or above ``fine_threshold`` matches).
    sure_threshold: float | None = None


def encode_rerank(x: np.ndarray, dtype: str) -> np.ndarray:
    """Unit float vectors -> stored form. int8 is a fixed scale (components of unit vectors lie in
    [-1, 1], and in practice |x| < 0.5, so 1/255 steps keep cosine error below ~1e-3)."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if dtype == "int8":
        return np.clip(np.rint(x * 255.0), -127, 127).astype(np.int8)
    raise ValueError(f"rerank dtype must be one of {RERANK_DTYPES}, got {dtype!r}")


def decode_rerank(x: np.ndarray) -> np.ndarray:
    """Stored form -> float32 (approximately unit) vectors."""
    if x.dtype == np.int8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.float16 and x.size >= 4096:
        # numpy's float16 -> float32 cast is scalar code (~3 ns/element, most of the rerank time);
        # torch's is vectorised (F16C) and about twice as fast. torch is already loaded in every
        # process that reranks (feature extraction).
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return x.astype(np.float32, copy=False)


def gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # faiss-cpu
        return False


@dataclass
class Shard:
    """One shard: a faiss index over coarse vectors with explicit ids, and the rerank vectors."""

    index: faiss.Index
    ids: np.ndarray        # (n,) int64, order of ``rerank`` rows
    rerank: np.ndarray     # (n, rerank_dim) stored dtype
    # the index returns row positions, and ``ids[row]`` is the id: a node-cache shard, whose bare
    # index is memory-mapped without the IDMap wrapper (and its private reverse map)
    positional: bool = False

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def index_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    def rerank_bytes(self) -> bytes:
        return st_save({"ids": np.ascontiguousarray(self.ids, np.int64), "vectors": np.ascontiguousarray(self.rerank)})

    @classmethod
    def from_bytes(cls, index_bytes: bytes, rerank_bytes: bytes) -> Shard:
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        t = st_load(rerank_bytes)
        return cls(index, t["ids"].astype(np.int64), t["vectors"])


COARSE_INDEX_TYPES = ("flat", "hnsw", "ivf")
COARSE_CODES = ("float16", "float32")


@dataclass(frozen=True)
class CoarseIndexSpec:
    """The coarse (128-d) index of every shard: ``flat`` (exact), ``hnsw`` or ``ivf``, its vectors
    stored as ``float16`` (faiss ``SQfp16``: 256 B a reference, default) or ``float32`` (512 B).

    Stored in the gallery manifest; ``nprobe`` / ``ef_search`` are the query-time defaults, which
    ``[job] coarse_nprobe`` / ``coarse_ef_search`` override. IVF's ``nlist`` defaults to
    ``4 * sqrt(n)`` per shard (faiss' rule of thumb), capped so each list trains on >= 39 points.
    Add and remove rebuild every shard from the stored vectors, so every type supports both.

    float16 codes change a coarse cosine by at most ~1e-3 (the stage only picks the ``rerank_k``
    candidates the fine scores decide on); they halve the bytes a node keeps per reference and
    search faster than float32 on CPU (``docs/benchmarks.md``). Older versions read back float32.
    """

    type: str = "flat"
    hnsw_m: int = 32
    ivf_nlist: int | None = None
    nprobe: int = 32
    ef_search: int = 128
    codes: str = "float16"

    def __post_init__(self) -> None:
        if self.type not in COARSE_INDEX_TYPES:
            raise ValueError(f"coarse index must be one of {COARSE_INDEX_TYPES}, got {self.type!r}")
        if self.codes not in COARSE_CODES:
            raise ValueError(f"coarse index codes must be one of {COARSE_CODES}, got {self.codes!r}")

    def factory(self, n: int) -> str:
        """faiss factory string for a shard of ``n`` vectors."""
        storage = "SQfp16" if self.codes == "float16" else "Flat"
        if self.type == "hnsw":
            return f"HNSW{self.hnsw_m}" + (",SQfp16" if self.codes == "float16" else "")
        if self.type == "ivf":
            nlist = self.ivf_nlist or int(4 * np.sqrt(max(1, n)))
            return f"IVF{max(1, min(nlist, n // 39 or 1))},{storage}"
        return storage

    def to_dict(self) -> dict:
        d = {"type": self.type, "hnsw_m": self.hnsw_m, "ivf_nlist": self.ivf_nlist, "nprobe": self.nprobe,
             "ef_search": self.ef_search}
        if self.codes != "float32":  # float32 versions keep the bytes they had before codes existed
            d["codes"] = self.codes
        return d

    @classmethod
    def parse(cls, value: str | dict | CoarseIndexSpec | None) -> CoarseIndexSpec:
        """A spec for a new version: a dict, a spec, or a faiss factory string (``Flat``, ``HNSW32``,
        ``IVF1024,Flat``: float32 codes; ``SQfp16``, ``HNSW32,SQfp16``: float16); None is the default."""
        if isinstance(value, CoarseIndexSpec):
            return value
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls(**{k: v for k, v in value.items() if k in cls.__dataclass_fields__})
        v = str(value)
        codes = "float16" if "SQFP16" in v.upper() else "float32"
        if v.upper().startswith("HNSW"):
            return cls("hnsw", hnsw_m=int(v[4:].split(",")[0] or 32), codes=codes)
        if v.upper().startswith("IVF"):
            return cls("ivf", ivf_nlist=int(v[3:].split(",")[0]), codes=codes)
        return cls(codes=codes)

    @classmethod
    def from_manifest(cls, value: str | dict | None) -> CoarseIndexSpec:
        """What a manifest's ``coarse_index`` says; an entry without ``codes`` (or no entry) is
        float32, which every version written before the field held."""
        if isinstance(value, dict):
            return cls.parse({"codes": "float32", **value})
        return cls.parse(value if value is not None else "Flat")


def _new_coarse_index(dim: int, spec: str, train_x: np.ndarray | None) -> faiss.Index:
    """``spec`` is a faiss factory string for the coarse stage: ``Flat`` (exact, default),
    ``HNSW32``, ``IVF1024,Flat``...; always inner product on unit vectors (= cosine)."""
    base = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained:
        if train_x is None or len(train_x) == 0:
            raise ValueError(f"coarse index {spec!r} needs training vectors")
        base.train(train_x)
    if spec.startswith("IVF"):
        return base  # IVF indexes take explicit ids natively
    return faiss.IndexIDMap2(base)


def dense_rows(sorted_ids: np.ndarray) -> np.ndarray | None:
    """The id -> row table of ascending ``sorted_ids`` when the ids are compact (at most about
    twice as many slots as ids), else None (rows are then found by binary search)."""
    if not len(sorted_ids) or sorted_ids[0] < 0 or sorted_ids[-1] >= 2 * len(sorted_ids) + 1024:
        return None
    row_of = np.full(int(sorted_ids[-1]) + 1, -1, np.int64)
    row_of[sorted_ids] = np.arange(len(sorted_ids))
    return row_of


def merge_coarse(parts: list[tuple[np.ndarray, np.ndarray]], B: int, k: int,
                 threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard ``(D, I)`` results, in shard order -> the global ``(B, k)`` top ``k`` above
    ``threshold``: concatenated in that order, then a stable sort by score (ties: shard order)."""
    if not parts:
        return np.full((B, k), -np.inf, np.float32), np.full((B, k), -1, np.int64)
    D = np.concatenate([d for d, _ in parts], axis=1)
    I = np.concatenate([i for _, i in parts], axis=1).astype(np.int64)
    D = np.where((I >= 0) & (D >= threshold), D, -np.inf).astype(np.float32)
    I = np.where(np.isfinite(D), I, -1)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    D, I = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    pad = ((0, 0), (0, k - D.shape[1]))  # fewer than k candidates in every shard together
    return np.pad(D, pad, constant_values=-np.inf), np.pad(I, pad, constant_values=-1)


class CascadeIndex:
    """All shards of one gallery version, ready to query."""

    def __init__(self, shards: list[Shard], coarse_dim: int, rerank_dim: int, use_gpu: bool | None = None,
                 nprobe: int | None = None, ef_search: int | None = None) -> None:
        ids = [s.ids for s in shards if len(s.ids)]
        vecs = [s.rerank for s in shards if len(s.ids)]
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        if len(sorted_ids) > 1 and np.any(np.diff(sorted_ids) == 0):
            raise ValueError("duplicate gallery ids across shards")
        rerank = (np.concatenate(vecs) if vecs else np.zeros((0, rerank_dim), np.float16))[order]
        self._setup(shards, coarse_dim, rerank_dim, sorted_ids, rerank, dense_rows(sorted_ids), use_gpu, nprobe,
                    ef_search)

    def _setup(self, shards: list[Shard], coarse_dim: int, rerank_dim: int, sorted_ids: np.ndarray,
               rerank: np.ndarray, row_of: np.ndarray | None, use_gpu: bool | None, nprobe: int | None,
               ef_search: int | None) -> None:
        self.shards, self.coarse_dim, self.rerank_dim = shards, coarse_dim, rerank_dim
        # Dense id -> row table when ids are compact (the usual case: ids are assigned in order and
        # only removals leave holes): one gather per lookup instead of a binary search.
        self._sorted_ids, self._rerank, self._row_of = sorted_ids, rerank, row_of
        self._search = [self._searchable(s, use_gpu, nprobe, ef_search) for s in shards]

    @classmethod
    def attached(cls, shards: list[Shard], coarse_dim: int, rerank_dim: int, sorted_ids: np.ndarray,
                 rerank: np.ndarray, row_of: np.ndarray | None, use_gpu: bool | None = None,
                 nprobe: int | None = None, ef_search: int | None = None) -> CascadeIndex:
        """An index over arrays prepared once per node (:mod:`pipeline.gallery.nodecache`, memory-
        mapped): ``sorted_ids`` ascending, ``rerank`` their vectors in that order, ``row_of`` the
        dense id -> row table (:func:`dense_rows`) or None. Nothing is copied or re-sorted."""
        if len(rerank) != len(sorted_ids) or sum(s.ntotal for s in shards) != len(sorted_ids):
            raise ValueError("attached index: shard sizes, ids and rerank rows disagree")
        self = cls.__new__(cls)
        self._setup(shards, coarse_dim, rerank_dim, sorted_ids, rerank, row_of, use_gpu, nprobe, ef_search)
        return self

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, ids: np.ndarray, coarse: np.ndarray, rerank: np.ndarray, n_shards: int,
              rerank_dtype: str = "float16", coarse_spec: str | CoarseIndexSpec = "Flat",
              use_gpu: bool | None = False) -> CascadeIndex:
        """Shard ``id % n_shards``; ``coarse_spec`` is a :class:`CoarseIndexSpec` or a faiss
        factory string (benchmarks)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("gallery ids must be unique")
        if not (len(ids) == len(coarse) == len(rerank)):
            raise ValueError(f"ids/coarse/rerank lengths differ: {len(ids)}, {len(coarse)}, {len(rerank)}")
        if n_shards < 1:
            raise ValueError("n_shards must be >= 1")
        cdim = coarse.shape[1] if coarse.ndim == 2 and coarse.shape[1] else 128
        rdim = rerank.shape[1] if rerank.ndim == 2 and rerank.shape[1] else 512
        coarse = np.ascontiguousarray(coarse, np.float32).reshape(len(ids), cdim)
        rerank = np.asarray(rerank, np.float32).reshape(len(ids), rdim)
        shards = []
        for s in range(n_shards):
            m = (ids % n_shards) == s
            factory = coarse_spec.factory(int(m.sum()) or len(ids)) if isinstance(coarse_spec, CoarseIndexSpec) \
                else coarse_spec
            index = _new_coarse_index(cdim, factory, coarse[m] if m.any() else coarse)
            if m.any():
                index.add_with_ids(coarse[m], ids[m])
            shards.append(Shard(index, ids[m].copy(), encode_rerank(rerank[m], rerank_dtype)))
        if isinstance(coarse_spec, CoarseIndexSpec):
            return cls(shards, cdim, rdim, use_gpu=use_gpu, nprobe=coarse_spec.nprobe, ef_search=coarse_spec.ef_search)
        return cls(shards, cdim, rdim, use_gpu=use_gpu)

    def _searchable(self, s: Shard, use_gpu: bool | None, nprobe: int | None, ef_search: int | None):
        """Return (index to search, id table or None). On GPU the flat inner index is cloned to the
        device and labels mapped back through the IDMap's id table."""
        idx = s.index
        if nprobe is not None and hasattr(faiss, "extract_index_ivf"):
            try:
                faiss.extract_index_ivf(idx).nprobe = nprobe
            except RuntimeError:  # not an IVF index (flat, hnsw): nprobe does not apply
                pass
        inner: faiss.Index | None
        id_table: np.ndarray | None
        if s.positional:
            inner = faiss.downcast_index(idx)
            id_table = s.ids
        elif isinstance(idx, faiss.IndexIDMap2):
            inner = faiss.downcast_index(idx.index)
            id_table = None
        else:
            inner = id_table = None
        if ef_search is not None and inner is not None and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = ef_search
        want_gpu = gpu_available() if use_gpu is None else use_gpu
        if want_gpu and inner is not None and s.ntotal and isinstance(inner, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
            # exact search on the device: float32 codes as they are, float16 codes kept float16 there
            res = faiss.StandardGpuResources()
            co = faiss.GpuClonerOptions()
            flat = inner
            if isinstance(inner, faiss.IndexScalarQuantizer):
                flat = faiss.IndexFlatIP(inner.d)
                flat.add(inner.reconstruct_n(0, inner.ntotal))
                co.useFloat16 = True
            if id_table is None:  # not positional and an inner index: an IndexIDMap2
                assert isinstance(idx, faiss.IndexIDMap2)
                id_table = faiss.vector_to_array(idx.id_map).astype(np.int64)
            return faiss.index_cpu_to_gpu(res, 0, flat, co), np.asarray(id_table, np.int64), res
        return idx, id_table, None

    # -- queries ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(len(self._sorted_ids))

    @property
    def sorted_ids(self) -> np.ndarray:
        """Every entry id of the version, ascending (read-only view)."""
        return self._read_only(self._sorted_ids)

    @property
    def rerank_matrix(self) -> np.ndarray:
        """The rerank vectors in :attr:`sorted_ids` order, in their stored dtype (read-only view)."""
        return self._read_only(self._rerank)

    @property
    def row_table(self) -> np.ndarray | None:
        """The dense id -> row table (read-only) when ids are compact, or None when ids are sparse
        (rows are then found by binary search)."""
        return None if self._row_of is None else self._read_only(self._row_of)

    @staticmethod
    def _read_only(a: np.ndarray) -> np.ndarray:
        v = a.view()
        v.flags.writeable = False
        return v

    def search_coarse(self, xq: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """``(B, coarse_dim)`` unit queries -> ``D, I`` of shape ``(B, k)``: the best ``k`` gallery
        ids with cosine >= ``threshold``, best first; padding is ``I = -1``, ``D = -inf``."""
        return merge_coarse([p for p in self.search_shards(xq, k) if p is not None], len(xq), k, threshold)

    def search_shards(self, xq: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each shard's own top ``min(k, shard size)``: ``(D, I)`` with gallery ids, or None for an
        empty shard (or no query), in shard order: what :func:`merge_coarse` merges."""
        xq = np.ascontiguousarray(xq, np.float32)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.shards)
        for s, ((index, id_table, _res), shard) in enumerate(zip(self._search, self.shards)):
            if shard.ntotal and len(xq):
                D, I = index.search(xq, min(k, shard.ntotal))
                out[s] = (D, I if id_table is None else np.where(I >= 0, id_table[np.clip(I, 0, None)], -1))
        return out

    def adopt_rerank_matrix(self, rerank: np.ndarray, sorted_ids: np.ndarray) -> None:
        """Score with ``rerank``, whose rows are the vectors of ``sorted_ids`` (ascending): the
        streaming loader fills this one matrix instead of handing over per-shard copies."""
        if not np.array_equal(self._sorted_ids, sorted_ids) or len(rerank) != len(sorted_ids):
            raise ValueError("rerank matrix rows do not match the index's ids in ascending order")
        self._rerank = rerank

    def rerank_vectors(self, ids: np.ndarray) -> np.ndarray:
        """``(n,)`` ids -> ``(n, rerank_dim)`` float32 vectors; KeyError for unknown ids."""
        ids = np.asarray(ids, np.int64)
        if self._row_of is not None:  # compact ids: one gather
            inside = (ids >= 0) & (ids < len(self._row_of))
            pos = np.where(inside, self._row_of[np.where(inside, ids, 0)], -1)
            ok = pos >= 0
        else:                         # sparse ids: binary search in the sorted id table
            pos = np.searchsorted(self._sorted_ids, ids)
            ok = (pos < len(self._sorted_ids)) & (self._sorted_ids[np.clip(pos, 0, max(0, len(self._sorted_ids) - 1))] == ids) \
                if len(self._sorted_ids) else np.zeros(len(ids), bool)
        if not np.all(ok):
            raise KeyError(f"unknown gallery ids {ids[~ok][:5].tolist()}")
        return decode_rerank(self._rerank[pos])

    def score_fine(self, xq512: np.ndarray, I: np.ndarray) -> np.ndarray:
        """``(B, rerank_dim)`` queries and ``(B, k)`` candidate ids -> ``(B, k)`` fine cosine
        scores (``-inf`` where ``I = -1``). Works in blocks of queries so that the gathered
        candidate vectors stay small (a 500-candidate batch would otherwise materialise GBs)."""
        F = np.full(I.shape, -np.inf, np.float32)
        xq = np.asarray(xq512, np.float32)
        if I.shape[1] == 0 or not (I >= 0).any():
            return F
        first = int(I[I >= 0][0])
        for b in range(0, len(I), 32):
            Ib = I[b:b + 32]
            valid = Ib >= 0
            if not valid.any():
                continue
            # (b, k, d) candidate vectors, padding slots pointed at a real entry and masked after
            vecs = self.rerank_vectors(np.where(valid, Ib, first).ravel()).reshape(Ib.shape[0], Ib.shape[1], -1)
            scores = np.matmul(vecs, xq[b:b + 32, :, None])[:, :, 0]
            F[b:b + 32] = np.where(valid, scores, -np.inf)
        return F

    def search_fine_exhaustive(self, xq512: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Baseline: exact 512-d search over the whole gallery (no cascade) -> ``D, I`` ``(B, k)``."""
        if self.ntotal == 0:
            return np.full((len(xq512), k), -np.inf, np.float32), np.full((len(xq512), k), -1, np.int64)
        flat = faiss.IndexFlatIP(self.rerank_dim)
        flat.add(decode_rerank(self._rerank))
        D, pos = flat.search(np.ascontiguousarray(xq512, np.float32), min(k, self.ntotal))
        return D, np.where(pos >= 0, self._sorted_ids[np.clip(pos, 0, None)], -1)
