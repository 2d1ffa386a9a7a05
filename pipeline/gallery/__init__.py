"""Reference galleries: immutable versions in object storage, their updates, and the query side.

Modules, one concern each; imports run one way (``a <- b``: ``b`` imports ``a``):
``manifest`` <- ``store`` <- ``loader`` <- ``query``, and ``store`` <- ``update``.

- :mod:`pipeline.gallery.manifest`: what a version records (:class:`Manifest`, typed and frozen,
  read and written there only), including its model and thresholds (:class:`VersionModel`);
- :mod:`pipeline.gallery.store`: the version format's I/O: write and publish, read a manifest,
  read a version's content back to derive the next one;
- :mod:`pipeline.gallery.loader`: the streaming, verified loader the query side uses, and ``verify``;
- :mod:`pipeline.gallery.update`: build a version from bank sources, add and remove images, info;
- :mod:`pipeline.gallery.query`: :func:`open_gallery`, the one way to open a version for querying
  (the job, ``lookup``, ``evaluate`` and the benchmarks), :class:`GalleryIndex` (a loaded version),
  the cascade over it and the bank rules that turn candidates into one :class:`Match` per query;
- :mod:`pipeline.gallery.verify`: geometric verification (ORB keypoints, RANSAC) and the
  references' stored keypoints (:class:`~pipeline.gallery.verify.KeypointTable`);
- :mod:`pipeline.gallery.calibration`: thresholds sized for a version's number of references
  from the model card's measured score tails;
- :mod:`pipeline.gallery.extract`: the feature stage that describes reference pictures
  (``GalleryFeatureStage``, ``local_extractor``);
- :mod:`pipeline.gallery.index` (the sharded faiss index), :mod:`~pipeline.gallery.banks` (bank
  files) and :mod:`~pipeline.gallery.audit` (the append-only audit log) underneath.

Words, one meaning each:

- *coarse*: the first stage, 128-d (low-res query features, coarse scores, the coarse threshold);
- *fine*: the second stage, 512-d: query features (``FeatureExtractor.fine_features``), fine
  scores (what the fine thresholds apply to, after score normalisation);
- *rerank*: the second stage's step, scoring the coarse candidates with fine features, and the
  stored things named after it: ``rerank_k`` (candidates reranked per query), the gallery's
  *rerank vectors* (``shard-NNN.rerank.safetensors``, ``rerank_dtype``, ``rerank_dim``);
- *sure*: the fine score at or above which the descriptor alone decides; between the fine and
  the sure thresholds a match needs *verification* (local features, RANSAC *inliers*).

The two index classes have verbs of their own: :class:`~pipeline.gallery.index.CascadeIndex` is
the bare index (``search_coarse``, ``score_fine``, ``search_fine_exhaustive``: thresholds and ``k``
are arguments); :class:`GalleryIndex` is a version with its rules (``coarse_hits`` at its own
thresholds, ``normalise``, ``candidates``, ``decide``, ``search``).

The names below are the package's interface (``from pipeline import gallery as G; G.build(...)``).
"""

from __future__ import annotations

from pipeline.gallery.loader import LoadedVersion, load_streaming, stream_sha256, verify
from pipeline.gallery.manifest import (
    FORMAT_VERSION,
    BankRecord,
    Counts,
    DisabledReference,
    EntriesFile,
    GalleryModelMismatch,
    KeypointsFile,
    Manifest,
    Rejected,
    ShardFiles,
    VersionModel,
)
from pipeline.gallery.query import (
    Candidates,
    CoarseHits,
    FineScores,
    GalleryIndex,
    Match,
    MatchRule,
    ModelRef,
    QueryModel,
    QueryOverrides,
    SearchResult,
    open_gallery,
)
from pipeline.gallery.store import (
    GalleryContent,
    GalleryIntegrityError,
    GalleryNotFound,
    StoredVersion,
    current_version,
    list_versions,
    publish_version,
    read_content,
    read_manifest,
    resolve_version,
    write_audited,
    write_derived,
    write_version,
)
from pipeline.gallery.update import (
    Extractor,
    Update,
    add,
    add_images,
    build,
    export_hashes,
    info,
    list_source,
    remove,
    replace_list,
)

__all__ = [
    "FORMAT_VERSION", "BankRecord", "Candidates", "CoarseHits", "Counts", "DisabledReference", "EntriesFile",
    "Extractor", "FineScores", "GalleryContent", "GalleryIndex", "GalleryIntegrityError", "GalleryModelMismatch",
    "GalleryNotFound", "KeypointsFile", "LoadedVersion", "Manifest", "Match", "MatchRule", "ModelRef", "QueryModel", "QueryOverrides", "Rejected",
    "SearchResult", "ShardFiles", "StoredVersion", "Update", "VersionModel", "add", "add_images", "build",
    "current_version", "export_hashes", "info", "replace_list", "list_source", "list_versions", "load_streaming", "open_gallery", "publish_version",
    "read_content", "read_manifest", "remove", "resolve_version", "stream_sha256", "verify", "write_audited",
    "write_derived", "write_version",
]
