"""Waves: near-duplicate clusters among one partition's own uploads (a day's or an hour's).

The gallery holds what someone already decided about; a campaign or a hoax posts one picture,
lightly edited, thousands of times before anyone adds it to a bank, and a recommender that shows
one picture forty times serves its users badly even when the picture is harmless. This module is
the clustering pass over a committed partition, from the features the moderation run stored
(:mod:`pipeline.moderation.signatures`), never all pairs:

1. **Candidates**: every searched upload's stored 128-d low-res feature in one faiss index of the
   partition (:func:`feature_index`: exact inner product up to :data:`FLAT_MAX` uploads, IVF
   beyond), searched top-``k`` (:class:`NeighbourSearch`, a stage); a neighbour at or above
   ``coarse_threshold`` is a candidate pair. Uploads with identical bytes (sha256) are a pair too.
2. **Fine score**, only for uploads with a candidate: their picture is read again and described at
   high resolution (:class:`NodeDescriber`, a stage; the 512-d feature is not stored, see
   docs/waves.md for the numbers), and a pair scores ``cos512 - beta * mean(background terms)``, the
   model's background normalisation made symmetric.
3. **Edges**: identical bytes, or a fine score at ``sure_threshold`` (sized for the partition's
   size from the model card's tails, :func:`sure_for_size`), are edges at once; a pair between
   ``fine_threshold`` and ``sure_threshold`` is an edge when geometric verification
   (:mod:`pipeline.gallery.verify`, :class:`EdgeVerifier`) finds ``min_inliers`` RANSAC inliers.
   Only pairs that would join two different components are verified: a pair inside one changes
   nothing, so the clusters are the same as verifying all.
4. **Clusters**: connected components (:class:`UnionFind`). A cluster's id is the first 16 hex
   digits of sha256(partition, its smallest member key): the same members give the same id on
   every rerun. ``dup_rank`` 1 is the cluster's first upload by upload time (the object's
   modification time), then by key. A cluster of at least ``wave_min_size`` uploads is a **wave**.

Every stage here is a plain class; ``jobs/runtime/waves.py`` distributes them with Ray Data.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.errors import UsageError

FLAT_MAX = 200_000        # up to this many uploads the candidate index is exact (IndexFlatIP)
CLUSTER_ID_HEX = 16
SAME_BYTES, SURE, VERIFIED = "same_bytes", "sure", "verified"
SEARCHED, NOT_SEARCHED, REREAD_FAILED = "searched", "not_searched", "reread_failed"


@dataclass(frozen=True)
class WaveParams:
    """The rule that makes two uploads of one partition near-duplicates (``[job] wave_*``).

    ``k``: neighbours searched per upload; ``coarse_threshold``: the query-to-query 128-d cosine
    of a candidate pair; ``fine_threshold``: the normalised fine score from which a pair is
    verified; ``sure_threshold``: the fine score that needs no verification (None: sized for the
    partition's size, :func:`sure_for_size`); ``min_inliers``: RANSAC inliers that confirm a pair
    (more than the gallery's 12: a day's own uploads hold pictures made from one template, charts
    and captions in one font, that reach 12 to 45 inliers against each other; docs/waves.md);
    ``wave_min_size``: uploads that make a cluster a wave; ``false_merge_budget``: unrelated
    uploads per upload allowed a false sure edge, what ``sure_threshold`` is sized for."""

    k: int = 16
    coarse_threshold: float = 0.40
    fine_threshold: float = 0.15
    sure_threshold: float | None = None
    min_inliers: int = 25
    wave_min_size: int = 5
    false_merge_budget: float = 0.0005

    def __post_init__(self) -> None:
        """The checks of ``[job] wave_*`` (``JobConfig`` builds one to check them; the one home of these rules)."""
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_score = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and -1.0 <= v <= 1.0
        checks = [(is_int(self.k) and 1 <= self.k <= 1024, "wave_k", "an integer in 1..1024", self.k),
                  (is_int(self.min_inliers) and self.min_inliers >= 3, "wave_min_inliers", "an integer >= 3", self.min_inliers),
                  (is_int(self.wave_min_size) and self.wave_min_size >= 2, "wave_min_size", "an integer >= 2", self.wave_min_size),
                  (is_score(self.coarse_threshold), "wave_coarse_threshold", "a score in [-1, 1]", self.coarse_threshold),
                  (is_score(self.fine_threshold), "wave_fine_threshold", "a score in [-1, 1]", self.fine_threshold),
                  (self.sure_threshold is None or is_score(self.sure_threshold), "wave_sure_threshold", "a score in [-1, 1]",
                   self.sure_threshold)]
        for ok, name, what, v in checks:
            if not ok:
                raise UsageError(f"[job] {name} must be {what}, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sure_for_size(tails: Any, n: int, card_fine: float, budget: float) -> float:
    """The fine score at which a pair needs no verification in a partition of ``n`` uploads: each
    upload is compared with ``n - 1`` others, like a gallery of that many references, so the card's
    per-pair fine tail (``tails``: a :class:`~pipeline.gallery.calibration.ScoreTails`, None: the
    card's fine threshold) sets it where at most ``budget`` of unrelated uploads get a false edge."""
    if tails is None:
        return float(card_fine)
    n = max(int(n) - 1, 1)
    per_pair = -math.expm1(math.log1p(-budget) / n)
    return float(max(card_fine, tails.fine.threshold_for(per_pair)))


def cluster_id(part: str, smallest_key: str) -> str:
    """A cluster's stable id: sha256 of (partition, its smallest member key), 16 hex digits."""
    return hashlib.sha256(f"{part}\n{smallest_key}".encode()).hexdigest()[:CLUSTER_ID_HEX]


# --------------------------------------------------------------------------------------------
# 1. Candidates: the partition's features in one index, top-k per upload
# --------------------------------------------------------------------------------------------
def feature_index(x: np.ndarray, nprobe: int = 16, flat_max: int = FLAT_MAX) -> Any:
    """``(n, d)`` unit features -> a faiss inner-product index over them (row = id). Exact up to
    ``flat_max`` uploads; IVF (``4 sqrt(n)`` lists, trained on a fixed sample with faiss's fixed
    k-means seed, ``nprobe``) beyond."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    d = x.shape[1]
    index: faiss.Index
    if len(x) <= flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * math.sqrt(len(x)))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = x[np.random.default_rng(0).choice(len(x), min(len(x), 64 * nlist), replace=False)]
        ivf.train(sample)
        ivf.nprobe = nprobe
        index = ivf
    index.add(x)
    return index


class NeighbourSearch:
    """Stage: ``{"id"}`` (rows of the partition) -> candidate pairs ``{"a", "b", "coarse"}``
    (``a < b``, rows; as many as found, none for an upload without a neighbour at the threshold).
    ``index_bytes``: :func:`feature_index` serialised; every actor holds the partition's whole index
    and reads each query's feature back from it, so only row numbers travel."""

    def __init__(self, index_bytes: Any, k: int, threshold: float) -> None:
        import faiss

        self.index = faiss.deserialize_index(np.asarray(index_bytes, np.uint8))
        if not isinstance(self.index, faiss.IndexFlat):
            faiss.extract_index_ivf(self.index).make_direct_map()
        self.k, self.threshold = int(k), float(threshold)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["id"], np.int64)
        if not len(rows):
            return {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "coarse": np.zeros(0, np.float32)}
        xq = np.stack([self.index.reconstruct(int(r)) for r in rows]).astype(np.float32)
        D, I = self.index.search(xq, min(self.k + 1, self.index.ntotal))  # +1: itself
        q = np.repeat(rows, I.shape[1])
        keep = (I.ravel() >= 0) & (I.ravel() != q) & (D.ravel() >= self.threshold)
        a, b, s = q[keep], I.ravel()[keep], D.ravel()[keep].astype(np.float32)
        return {"a": np.minimum(a, b), "b": np.maximum(a, b), "coarse": s}


def unique_pairs(a: np.ndarray, b: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs found from both ends once, sorted by (a, b); the higher coarse score kept."""
    if not len(a):
        return a.astype(np.int64), b.astype(np.int64), coarse.astype(np.float32)
    order = np.lexsort((-coarse, b, a))
    a, b, coarse = a[order], b[order], coarse[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], coarse[first]


def same_bytes_pairs(sha256: list[str | None]) -> list[tuple[int, int]]:
    """(first row, other row) for every upload whose bytes equal an earlier row's."""
    first: dict[str, int] = {}
    out = []
    for i, h in enumerate(sha256):
        if h is None:
            continue
        if h in first:
            out.append((first[h], i))
        else:
            first[h] = i
    return out


# --------------------------------------------------------------------------------------------
# 2. The fine score of uploads with a candidate
# --------------------------------------------------------------------------------------------
def modified_time(uri: str) -> float:
    """The object's modification time (POSIX seconds; NaN when the store does not say)."""
    from pipeline.ingest.storage import split_uri

    try:
        st, name = split_uri(uri)
        mtime = st.fs.get_file_info(st.path(name)).mtime
        return float(mtime.timestamp()) if mtime is not None else float("nan")
    except Exception:
        return float("nan")


class NodeDescriber:
    """Stage: ``{"node", "image_uri"}`` -> ``{"node", "ok", "fine", "bg", "uploaded_at", "error"}``:
    the upload read again, decoded like the job (model sizes from the card) and described by the
    512-d high-res feature and its background term (for the normalisation), with the object's
    modification time. One output row per input row; a picture that cannot be read or decoded
    again is a row with ``ok`` false and its error code in ``error`` ("" otherwise; its upload stays a cluster of its own)."""

    def __init__(self, model_dir: str | None = None, threads: int | None = None, precision: str = "auto",
                 decode: Any = None) -> None:
        """``decode``: the job's ``[job.decode]`` bounds (a ``DecodeConfig``; None: the defaults); the
        sizes always come from the model card, as in the job."""
        from pipeline.features import FeatureExtractor
        from pipeline.ingest.decode import DecodeConfig, Decoder
        from pipeline.ingest.fetch import Fetcher

        self.fx = FeatureExtractor(model_dir, threads=threads, precision=precision)
        self.fetch, self.decode = Fetcher(), Decoder(DecodeConfig.for_model(self.fx.config, base=decode))
        norm = dict(self.fx.card.thresholds.get("norm") or {})  # the card's score normalisation
        self.beta, self.k = float(norm.get("beta", 0.0)), int(norm.get("k", 1))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from pipeline.gallery.index import background_term

        nodes = np.asarray(batch["node"], np.int64)
        uris = [str(u) for u in batch["image_uri"]]
        dec = self.decode(self.fetch({"image_key": np.asarray(uris, object), "uri": np.asarray(uris, object)}))
        ok = np.asarray(dec["ok"], bool)
        fine = np.zeros((len(nodes), self.fx.config.rerank_dim), np.float32)
        bg = np.zeros(len(nodes), np.float32)
        if ok.any():
            fine[ok] = self.fx.fine_features(dec["high"][ok])
            bank = self.fx.background.f512 if self.fx.background is not None else None
            bg[ok] = background_term(fine[ok], bank, self.k) * self.beta
        return {"node": nodes, "ok": ok, "fine": fine, "bg": bg,
                "uploaded_at": np.asarray([modified_time(u) for u in uris], np.float64),
                "error": np.asarray(["" if o else str(c) for o, c in zip(ok, dec["error_code"])], object)}


def pair_scores(fine: np.ndarray, bg: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised fine scores of pairs: ``fine`` ``(n, 512)``, ``bg`` ``(n,)`` (beta already in),
    ``a``/``b`` ``(m,)`` rows -> ``(m,)`` ``cos - (bg_a + bg_b) / 2``."""
    if not len(a):
        return np.zeros(0, np.float32)
    cos = np.einsum("ij,ij->i", fine[a], fine[b])
    return (cos - (bg[a] + bg[b]) / 2).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 3. Geometric verification of the pairs that would join two clusters
# --------------------------------------------------------------------------------------------
class EdgeVerifier:
    """Stage: ``{"a", "b", "uri_a", "uri_b"}`` -> ``{"a", "b", "inliers"}``: RANSAC inliers between
    the two pictures (``a`` described as an upload, plain and mirrored; ``b`` as a reference), by
    :mod:`pipeline.gallery.verify`'s own matching and plausibility checks. Keypoints are cached per
    picture (pairs come sorted by ``a``). A picture that cannot be read has no keypoints: 0 inliers."""

    def __init__(self, params: Any = None, cache: int = 512) -> None:
        from pipeline.gallery.verify import VerifyParams

        self.params = params or VerifyParams()
        self.cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.size = cache
        from pipeline.ingest.fetch import Fetcher

        self.fetch = Fetcher()

    def _keypoints(self, uri: str, kind: str) -> Any:
        from pipeline.gallery.verify import grey_from_bytes, orb_keypoints, query_keypoints

        key = (uri, kind)
        if key not in self.cache:
            data = self.fetch({"image_key": np.asarray([uri], object), "uri": np.asarray([uri], object)})["bytes"][0]
            g = grey_from_bytes(data, self.params.side) if data else None
            self.cache[key] = None if g is None else (
                query_keypoints(g, self.params) if kind == "q" else orb_keypoints(g, self.params.ref_features))
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return self.cache[key]

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from pipeline.gallery.verify import count_inliers

        out = []
        for ua, ub in zip(batch["uri_a"], batch["uri_b"]):
            q, r = self._keypoints(str(ua), "q"), self._keypoints(str(ub), "r")
            out.append(0 if q is None or r is None else count_inliers(q, r, self.params))
        return {"a": np.asarray(batch["a"], np.int64), "b": np.asarray(batch["b"], np.int64),
                "inliers": np.asarray(out, np.int32)}


# --------------------------------------------------------------------------------------------
# 4. Clusters
# --------------------------------------------------------------------------------------------
class UnionFind:
    """Connected components over rows ``0..n-1``; a component's root is its smallest row."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = int(p[root])
        while p[i] != root:
            p[i], i = root, int(p[i])
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True

    def labels(self) -> np.ndarray:
        return np.asarray([self.find(i) for i in range(len(self.parent))], np.int64)
