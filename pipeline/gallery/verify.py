"""Geometric verification: local features and a RANSAC-consistent transform between an upload and
a reference, the last stage of the cascade.

A copy detector's global descriptor also scores pictures that merely show the same kind of thing
(one plate of food and another) high, and at a million references such look-alikes exist for
almost every upload. Near-duplicate systems confirm a match the way a person would: the same
local structures at geometrically consistent places. Here that is ORB keypoints (OpenCV,
``opencv-python-headless``) on a grey picture whose long side is :attr:`VerifyParams.side`, Lowe's
ratio test, and a RANSAC affine transform (full affine: uploads are cropped and squashed, and
mirrored, so the query is also matched flipped). The number of RANSAC inliers is the evidence.

References keep their keypoints in the gallery version (:class:`KeypointTable`, written at build
and add time, sha256-checked, never unpickled); an upload's are computed only when one of its
candidates needs verification (:mod:`pipeline.gallery.query` says when).
"""

from __future__ import annotations

import enum
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

ORB_DESCRIPTOR_BYTES = 32


@dataclass(frozen=True)
class VerifyParams:
    """How keypoints are found and matched. Stored in the manifest: a version's references were
    described with these, and queries must be described the same way.

    ``side``: long side of the grey picture keypoints are found on. ``ref_features`` /
    ``query_features``: ORB keypoints kept per reference (what the version stores) and per upload.
    ``ratio``: Lowe's ratio test. ``ransac_px``: RANSAC reprojection error, in pixels of the
    ``side`` picture. ``min_inliers``: inliers that confirm a match. ``min_ref_keypoints``: a
    reference with fewer keypoints cannot be verified (smooth, almost textureless pictures), and
    only the descriptor decides for it."""

    side: int = 512
    ref_features: int = 500
    query_features: int = 1000
    ratio: float = 0.8
    ransac_px: float = 6.0
    min_inliers: int = 12
    min_ref_keypoints: int = 40

    def to_dict(self) -> dict[str, float | int]:
        return {"side": self.side, "ref_features": self.ref_features, "query_features": self.query_features,
                "ratio": self.ratio, "ransac_px": self.ransac_px, "min_inliers": self.min_inliers,
                "min_ref_keypoints": self.min_ref_keypoints}

    @classmethod
    def from_dict(cls, d: dict | None) -> VerifyParams:
        if not d:
            return cls()
        return cls(int(d["side"]), int(d["ref_features"]), int(d["query_features"]), float(d["ratio"]),
                   float(d["ransac_px"]), int(d["min_inliers"]), int(d["min_ref_keypoints"]))


class Keypoints(NamedTuple):
    """ORB keypoints of one picture: ``xy`` ``(n, 2)`` float32 pixel positions in the ``side``
    picture, ``desc`` ``(n, 32)`` uint8 binary descriptors."""

    xy: np.ndarray
    desc: np.ndarray

    @classmethod
    def empty(cls) -> Keypoints:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, ORB_DESCRIPTOR_BYTES), np.uint8))

    def __len__(self) -> int:
        return int(self.xy.shape[0])


def grey(im: Image.Image, side: int) -> np.ndarray:
    """An RGB picture -> grey uint8 ``(h, w)`` with long side ``side`` (aspect kept; small pictures are
    upscaled, so that an upload and its reference are described at one scale)."""
    w, h = im.size
    s = side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(im.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def grey_from_bytes(data: bytes, side: int) -> np.ndarray | None:
    """Encoded image bytes -> :func:`grey`, or None if undecodable (bounded like the job's decoder)."""
    from pipeline.ingest.decode import DecodeConfig, DecodeError, open_image

    try:
        cfg = DecodeConfig(high_res=side)  # JPEG draft at the smallest scale covering ``side``
        return grey(open_image(bytes(data), cfg), side)
    except (DecodeError, OSError, ValueError):
        return None


def orb_keypoints(g: np.ndarray, n_features: int) -> Keypoints:
    """Grey ``(h, w)`` uint8 -> up to ``n_features`` ORB keypoints, strongest first."""
    import cv2

    orb = cv2.ORB.create(nfeatures=int(n_features), fastThreshold=10)
    kps, desc = orb.detectAndCompute(np.ascontiguousarray(g), None)
    if desc is None or not kps:
        return Keypoints.empty()
    order = np.argsort([-k.response for k in kps], kind="stable")[:n_features]
    xy = np.asarray([kps[i].pt for i in order], np.float32).reshape(-1, 2)
    return Keypoints(xy, np.ascontiguousarray(desc[order], dtype=np.uint8))


class QueryKeypoints(NamedTuple):
    """An upload's keypoints as it is and mirrored (left-right)."""

    plain: Keypoints
    mirrored: Keypoints


def query_keypoints(g: np.ndarray, params: VerifyParams) -> QueryKeypoints:
    return QueryKeypoints(orb_keypoints(g, params.query_features),
                          orb_keypoints(np.ascontiguousarray(g[:, ::-1]), params.query_features))


def _inliers_one(q: Keypoints, r: Keypoints, params: VerifyParams) -> int:
    import cv2

    if len(q) < 3 or len(r) < 3:
        return 0
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(q.desc, r.desc, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < params.ratio * p[1].distance]
    # one-to-one: ORB finds a corner at several pyramid levels, and many query keypoints at one spot
    # may all pick the same reference keypoint; only the closest such match counts
    best: dict[int, cv2.DMatch] = {}
    for m in good:
        if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:
            best[m.trainIdx] = m
    good = list(best.values())
    if len(good) < 3:
        return 0
    src = q.xy[[m.queryIdx for m in good]]
    dst = r.xy[[m.trainIdx for m in good]]
    A, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=params.ransac_px,
                                   maxIters=2000, confidence=0.99)
    if A is None or mask is None:
        return 0
    inl = mask.ravel() > 0
    if not plausible(A, dst[inl], r.xy, params):
        return 0
    # inliers are distinct places: keypoints of one corner at several scales count once
    return int(len(np.unique(np.round(dst[inl] / DISTINCT_PX).astype(np.int64), axis=0)))


# A transform a real edit can make: scale between 1/8 and 8 on each axis, at most 3x more on one
# axis than the other (crops, squashes, rotations, mirrors). Random matches between unrelated
# pictures fit degenerate transforms (everything collapsed onto a line or a point); on coco photos
# this check took the most inliers of random unrelated pairs from 20 to 10 and kept every copy.
MAX_SCALE = 8.0
MAX_ANISOTROPY = 3.0
# Inliers must cover at least this share of side^2 on the reference (a 36 x 36 px patch at side 512),
# and at least MIN_INLIER_COVER of the area the reference's own keypoints span: a copy shares most
# of its reference (the edit suite crops to 35 % of the area at most), while two pictures of one
# animal, or two charts of one template, share a patch. On 250 edited copies this dropped 0.4 % of
# them and 2 of 5 verifier passes among 1,500 high-scoring unrelated pairs (bench scale).
MIN_INLIER_AREA = 0.005
MIN_INLIER_COVER = 0.10
# Inliers closer than this (pixels of the side picture, on the reference) are one place.
DISTINCT_PX = 4.0


def plausible(A: np.ndarray, inliers_ref: np.ndarray, ref_xy: np.ndarray, params: VerifyParams) -> bool:
    """``A`` ``(2, 3)`` query -> reference affine, ``inliers_ref`` ``(n, 2)`` (on the reference,
    whose keypoints are ``ref_xy``): a real edit's transform, over enough of the reference."""
    import cv2

    s = np.linalg.svd(A[:, :2], compute_uv=False)
    if s[1] < 1.0 / MAX_SCALE or s[0] > MAX_SCALE or s[0] > MAX_ANISOTROPY * s[1]:
        return False
    if len(inliers_ref) < 3:
        return False
    hull = lambda xy: cv2.contourArea(cv2.convexHull(np.ascontiguousarray(xy, np.float32)))
    area = hull(inliers_ref)
    return bool(area >= MIN_INLIER_AREA * params.side * params.side and area >= MIN_INLIER_COVER * hull(ref_xy))


def count_inliers(q: QueryKeypoints, r: Keypoints, params: VerifyParams) -> int:
    """RANSAC inliers between an upload (plain or mirrored, whichever holds more) and a reference."""
    return max(_inliers_one(q.plain, r, params), _inliers_one(q.mirrored, r, params))


def reference_keypoints(data: bytes, params: VerifyParams) -> Keypoints:
    """A reference's stored keypoints from its encoded bytes (empty if undecodable)."""
    g = grey_from_bytes(data, params.side)
    return Keypoints.empty() if g is None else orb_keypoints(g, params.ref_features)


def image_keypoints(im: Image.Image, params: VerifyParams) -> Keypoints:
    """A reference's stored keypoints from a decoded picture."""
    return orb_keypoints(grey(im, params.side), params.ref_features)


def encode_png(g: np.ndarray) -> bytes:
    """Grey picture -> PNG bytes (tests and fixtures)."""
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Stored keypoints of a version's references
# --------------------------------------------------------------------------------------------
_XY_BYTES = 2 * 2  # float16 x, y
KEYPOINT_BYTES = _XY_BYTES + ORB_DESCRIPTOR_BYTES  # 36 bytes per stored keypoint


def pack(kp: Keypoints) -> bytes:
    """Keypoints -> bytes (``n`` float16 xy pairs, then ``n`` 32-byte descriptors): how a
    reference's keypoints travel between the feature stage and the version writer."""
    return kp.xy.astype("<f2").tobytes() + np.ascontiguousarray(kp.desc, np.uint8).tobytes()


def unpack(b: bytes) -> Keypoints:
    n, rest = divmod(len(b), KEYPOINT_BYTES)
    if rest:
        raise ValueError(f"packed keypoints of {len(b)} bytes: not a multiple of {KEYPOINT_BYTES}")
    xy = np.frombuffer(b, "<f2", count=2 * n).reshape(n, 2).astype(np.float32)
    desc = np.frombuffer(b, np.uint8, offset=n * _XY_BYTES).reshape(n, ORB_DESCRIPTOR_BYTES)
    return Keypoints(xy, desc)


class KeypointTable:
    """The references' keypoints of one version, by gallery id: ``ids`` ``(N,)`` int64 ascending,
    ``offsets`` ``(N + 1,)`` int64 into ``xy`` ``(M, 2)`` float16 and ``desc`` ``(M, 32)`` uint8.
    Stored as one safetensors file (``keypoints.safetensors``): plain arrays, never unpickled."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, xy: np.ndarray, desc: np.ndarray) -> None:
        if not (len(offsets) == len(ids) + 1 and offsets[0] == 0 and offsets[-1] == len(xy) == len(desc)
                and np.all(np.diff(offsets) >= 0) and np.all(np.diff(ids) > 0)
                and xy.ndim == 2 and xy.shape[1] == 2 and desc.ndim == 2 and desc.shape[1] == ORB_DESCRIPTOR_BYTES):
            raise ValueError("malformed keypoint table (ids, offsets, xy and desc disagree)")
        self.ids, self.offsets, self.xy, self.desc = ids, offsets, xy, desc

    @classmethod
    def from_packed(cls, packed: dict[int, bytes]) -> KeypointTable:
        ids = np.asarray(sorted(packed), np.int64)
        kps = [unpack(packed[int(i)]) for i in ids]
        counts = np.asarray([len(k) for k in kps], np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        xy = np.concatenate([k.xy for k in kps]).astype(np.float16) if kps else np.zeros((0, 2), np.float16)
        desc = np.concatenate([k.desc for k in kps]) if kps else np.zeros((0, ORB_DESCRIPTOR_BYTES), np.uint8)
        return cls(ids, offsets, xy.reshape(-1, 2), desc.reshape(-1, ORB_DESCRIPTOR_BYTES))

    def to_packed(self) -> dict[int, bytes]:
        return {int(g): pack(self.get(int(g))) for g in self.ids}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_keypoints(self) -> int:
        return int(self.offsets[-1])

    def count(self, gid: int) -> int:
        """Stored keypoints of reference ``gid`` (0 for an id the table does not hold)."""
        i = int(np.searchsorted(self.ids, gid))
        return int(self.offsets[i + 1] - self.offsets[i]) if i < len(self.ids) and self.ids[i] == gid else 0

    def get(self, gid: int) -> Keypoints:
        i = int(np.searchsorted(self.ids, gid))
        if i >= len(self.ids) or self.ids[i] != gid:
            return Keypoints.empty()
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Keypoints(np.asarray(self.xy[a:b], np.float32), np.asarray(self.desc[a:b]))

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save({"ids": self.ids, "offsets": self.offsets, "xy": np.ascontiguousarray(self.xy, np.float16),
                     "desc": np.ascontiguousarray(self.desc, np.uint8)})

    @classmethod
    def mapped(cls, path: str) -> KeypointTable:
        """A stored table memory-mapped read-only from a local file (whose checksum the caller has
        checked): the descriptors stay on disk, in the page cache every process on the node
        shares, and only the candidates verified are ever read. ``ValueError`` if malformed."""
        import json
        import struct

        try:
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n < (64 << 20):
                    raise ValueError("not a safetensors file")
                header = json.loads(f.read(n))
            dtypes = {"I64": "<i8", "F16": "<f2", "U8": "u1"}
            arrays = {}
            for name in ("ids", "offsets", "xy", "desc"):
                h = header[name]
                a, b = h["data_offsets"]
                shape = tuple(h["shape"])
                arr = np.memmap(path, dtype=dtypes[h["dtype"]], mode="r", offset=8 + n + a, shape=shape) \
                    if b > a else np.zeros(shape, dtypes[h["dtype"]])
                if arr.nbytes != b - a:
                    raise ValueError(f"{name}: {b - a} bytes for shape {shape}")
                arrays[name] = arr
            return cls(np.asarray(arrays["ids"], np.int64), np.asarray(arrays["offsets"], np.int64), arrays["xy"],
                       arrays["desc"])
        except (KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed keypoint file: {e}") from None

    @classmethod
    def from_bytes(cls, b: bytes) -> KeypointTable:
        """Read a stored table; anything malformed is a ``ValueError`` (the loader reports it as a corrupt file)."""
        from safetensors.numpy import load

        try:
            t = load(bytes(b))
            return cls(t["ids"].astype(np.int64), t["offsets"].astype(np.int64), t["xy"], t["desc"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"malformed keypoint file: {e}") from None
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(f"malformed keypoint file: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# The verification stage of a decision (used by pipeline.gallery.query.GalleryIndex.decide)
# --------------------------------------------------------------------------------------------
class MatchRule(str, enum.Enum):
    """How the descriptor's decision was reached (the flag row's ``match_rule``; stable names).

    A candidate whose normalised fine score reaches its bank's fine threshold matches when:

    * ``sure``: its score also reaches the gallery's sure threshold (the descriptor alone decides);
    * ``verified``: geometric verification found at least ``min_inliers`` RANSAC inliers;
    * ``unverifiable_reference``: the reference has too few keypoints to verify (smooth, almost
      textureless pictures), so the fine threshold alone decides, as without verification;
    * ``fine``: the version has no verification stage (no keypoints, no sure threshold).

    ``verification_failed``: a clean row whose best candidate reached the fine threshold but not the
    sure one, and verification did not confirm it (too few inliers, or beyond the
    :data:`VERIFY_PER_QUERY` candidates a query verifies)."""

    SURE = "sure"
    VERIFIED = "verified"
    UNVERIFIABLE_REFERENCE = "unverifiable_reference"
    FINE = "fine"
    VERIFICATION_FAILED = "verification_failed"


# At most this many candidates are verified per upload, best fine score first: verification costs
# milliseconds a candidate, and a copy's true reference is almost always its best candidate.
VERIFY_PER_QUERY = 5

# At most this many candidates are verified per upload, best fine score first: verification costs
# milliseconds a candidate, and a copy's true reference is almost always its best candidate.
VERIFY_PER_QUERY = 5

# query row -> its keypoints (None: no picture to verify with)
QueryKeypointsFn = Callable[[int], "QueryKeypoints | None"]


class CandidateVerifier:
    """Geometric verification of one query's candidates, lazily: the query's keypoints are
    computed on the first candidate that needs them, each reference verified at most once, and at
    most :data:`VERIFY_PER_QUERY` references per query. ``stats`` (seconds, queries, pairs) is
    the gallery's running account of verification work."""

    def __init__(self, keypoints: KeypointTable | None, params: VerifyParams, sure: float | None,
                 stats: dict[str, float], q: int, kp_fn: QueryKeypointsFn | None) -> None:
        self.keypoints, self.params, self.sure, self.stats = keypoints, params, sure, stats
        self.q, self.kp_fn = q, kp_fn
        self.done: dict[int, int | None] = {}  # gid -> inliers (None: not verified, the per-query cap)
        self._kp: QueryKeypoints | None = None
        self._kp_read = False

    def confirm(self, gid: int, fine: float, thr: float) -> tuple[str, int | None]:
        """The rule that confirms candidate ``gid`` (fine >= ``thr``), or VERIFICATION_FAILED."""
        if self.sure is None:
            return MatchRule.FINE.value, None
        if fine >= max(self.sure, thr):
            return MatchRule.SURE.value, None
        if self.keypoints is None or self.keypoints.count(gid) < self.params.min_ref_keypoints:
            return MatchRule.UNVERIFIABLE_REFERENCE.value, None
        if gid not in self.done:
            self.done[gid] = self._inliers(gid) if len(self.done) < VERIFY_PER_QUERY else None
        n = self.done[gid]
        ok = n is not None and n >= self.params.min_inliers
        return (MatchRule.VERIFIED.value if ok else MatchRule.VERIFICATION_FAILED.value), n

    def _inliers(self, gid: int) -> int:
        t = time.perf_counter()
        try:
            if not self._kp_read:
                self._kp, self._kp_read = (self.kp_fn(self.q) if self.kp_fn is not None else None), True
                self.stats["queries"] += 1
            if self._kp is None or self.keypoints is None:
                return 0
            self.stats["pairs"] += 1
            return count_inliers(self._kp, self.keypoints.get(gid), self.params)
        finally:
            self.stats["seconds"] += time.perf_counter() - t

    def record(self) -> tuple[tuple[int, int], ...]:
        """(reference id, inliers) of every candidate verified."""
        return tuple((g, n) for g, n in self.done.items() if n is not None)
