"""Reference galleries: immutable versions in object storage, their updates, and the query side.

Three modules, one concern each; imports run one way (``update`` -> ``store`` <- ``query``):

- :mod:`pipeline.gallery.store`: the version format and its I/O: what a version records of its
  model (:class:`VersionModel`), write and publish, read and verify, the streaming loader;
- :mod:`pipeline.gallery.update`: build a version from bank sources, add and remove images, info;
- :mod:`pipeline.gallery.query`: :class:`GalleryIndex` (a loaded version), the cascade over it and
  the bank rules that turn candidates into one :class:`Match` per query.

The names below are the package's interface (``from pipeline import gallery as G; G.build(...)``).
"""

from __future__ import annotations

from pipeline.gallery.query import Candidates, CoarseHits, FineScores, GalleryIndex, Match, SearchResult
from pipeline.gallery.store import (
    FORMAT_VERSION,
    GalleryContent,
    GalleryIntegrityError,
    GalleryModelMismatch,
    GalleryNotFound,
    LoadedVersion,
    StoredVersion,
    VersionModel,
    check_model,
    current_version,
    disabled_in_force,
    list_versions,
    load_streaming,
    publish_version,
    read_content,
    read_manifest,
    resolve_version,
    stream_sha256,
    verify,
    write_audited,
    write_version,
)
from pipeline.gallery.update import Extractor, Update, add, add_images, build, info, list_source, remove

__all__ = [
    "FORMAT_VERSION", "Candidates", "CoarseHits", "Extractor", "FineScores", "GalleryContent", "GalleryIndex",
    "GalleryIntegrityError", "GalleryModelMismatch", "GalleryNotFound", "LoadedVersion", "Match", "SearchResult",
    "StoredVersion", "Update", "VersionModel", "add", "add_images", "build", "check_model", "current_version",
    "disabled_in_force", "info", "list_source", "list_versions", "load_streaming", "publish_version", "read_content",
    "read_manifest", "remove", "resolve_version", "stream_sha256", "verify", "write_audited", "write_version",
]
