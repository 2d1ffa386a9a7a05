"""The manifest of a gallery version, typed: read and written in this module only.

``versions/vNNNNNN/manifest.json`` is one JSON object; :class:`Manifest` is that object, frozen,
with one nested frozen dataclass per sub-object. Readers use attributes, never string keys::

    {"format": 1, "version": "v000003", "parent": "v000002",    Manifest.format / .version / .parent
     "created_at": "2026-...+00:00",                            Manifest.created_at (ISO 8601 UTC)
     "model_id": "...", "dims": {"coarse", "rerank"},           Manifest.model (VersionModel)
     "thresholds": {"coarse", "fine", "rerank_k", "norm"},      ... also in Manifest.model
     "rerank_dtype": "float16",                                 Manifest.rerank_dtype
     "coarse_index": {"type", "hnsw_m", ...},                   Manifest.coarse_index (CoarseIndexSpec)
     "shards": [{"index", "index_sha256", "rerank", ...}],      Manifest.shards (ShardFiles, ...)
     "entries": {"file", "sha256", "rows"},                     Manifest.entries (EntriesFile)
     "banks": {name: {**bank, "count"}},                        Manifest.banks (name -> BankRecord)
     "counts": {"images", "memberships"},                       Manifest.counts (Counts)
     "rejected": [{"bank", "uri", "error_code", ...}],          Manifest.rejected (Rejected, ...)
     "disabled_references": [{"id", "until", "by", ...}],       Manifest.disabled_references
     "hash_lists": [{"bank", "kind", "file", "sha256", ...}],   Manifest.hash_lists (HashListFile, ...)
     "keypoints": {"file", "sha256", "entries", "params", ...}}  Manifest.keypoints (KeypointsFile)

``hash_lists`` (one file per enabled hash bank, ``pdq`` / ``md5``) is written only by a version
that has one: a gallery without hash banks writes the same JSON as before they existed, and a
manifest without the key reads back with no lists. ``keypoints`` (the references' local features
for geometric verification) and ``thresholds.sure`` are written by versions that verify; a version
without them has no verification stage.

:meth:`Manifest.to_json` writes exactly that layout (key order included, ``indent=2``, one final
newline): the same content always gives the same bytes. :meth:`Manifest.from_json` also reads
versions written before ``coarse_index``, ``rerank_k``, ``norm``, ``rejected`` and
``disabled_references`` existed, with the defaults they had.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.card import ModelCard
from pipeline.errors import ModscanError
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeParams, CoarseIndexSpec, ScoreNorm
from pipeline.gallery.verify import VerifyParams

FORMAT_VERSION = 1


class GalleryModelMismatch(ModscanError, RuntimeError):
    """The gallery was built with another model than the one querying it."""


@dataclass(frozen=True)
class VersionModel:
    """What a version records about the model whose vectors it holds, and the thresholds it is
    queried at: the model id (checked at load), the vector dims, and the cascade thresholds.

    :meth:`from_card` is for a new gallery (``gallery build``: the card's calibrated thresholds
    apply); a version derived from another (add, remove, review apply) takes its parent's
    :attr:`Manifest.model`: an update never resets what a gallery was calibrated or overridden
    to, nor adds settings it never had, whatever card the operator's command loaded."""

    model_id: str
    coarse_dim: int
    rerank_dim: int
    coarse_threshold: float
    fine_threshold: float
    rerank_k: int = 500
    norm: ScoreNorm = field(default_factory=ScoreNorm)
    # descriptor-alone threshold; between ``fine_threshold`` and it a match needs geometric
    # verification. None (versions without keypoints): no verification stage.
    sure_threshold: float | None = None
    # the gallery-size calibration that chose the thresholds (pipeline.gallery.calibration), if any
    calibration: Mapping[str, Any] | None = None

    @classmethod
    def from_thresholds(cls, model_id: str, coarse_dim: int, rerank_dim: int,
                        thresholds: Mapping[str, Any]) -> VersionModel:
        """From a card's or manifest's ``thresholds`` dict (``rerank_k`` 500, no ``norm`` and no
        ``sure`` when absent)."""
        sure = thresholds.get("sure")
        return cls(model_id, int(coarse_dim), int(rerank_dim), float(thresholds["coarse"]), float(thresholds["fine"]),
                   int(thresholds.get("rerank_k", 500)), ScoreNorm.from_dict(thresholds.get("norm")),
                   None if sure is None else float(sure), thresholds.get("calibration"))

    @classmethod
    def from_card(cls, card: ModelCard) -> VersionModel:
        return cls.from_thresholds(card.version_id, card.config.coarse_dim, card.config.rerank_dim, card.thresholds)

    def thresholds(self) -> dict[str, Any]:
        """The manifest's ``thresholds`` entry."""
        d: dict[str, Any] = {"coarse": self.coarse_threshold, "fine": self.fine_threshold, "rerank_k": self.rerank_k,
                             "norm": self.norm.to_dict()}
        if self.sure_threshold is not None:  # versions without verification keep their old bytes
            d["sure"] = self.sure_threshold
        if self.calibration is not None:
            d["calibration"] = dict(self.calibration)
        return d

    def params(self, coarse_threshold: float | None = None, fine_threshold: float | None = None,
               rerank_k: int | None = None, sure_threshold: float | None = None) -> CascadeParams:
        """The cascade's parameters at query time: these thresholds, each replaced by the
        argument given for it (a job's overrides). The sure threshold is never below the fine one."""
        def pick(over: Any, own: Any) -> Any:
            return own if over is None else over

        fine = float(pick(fine_threshold, self.fine_threshold))
        sure = pick(sure_threshold, self.sure_threshold)
        return CascadeParams(float(pick(coarse_threshold, self.coarse_threshold)), fine,
                             int(pick(rerank_k, self.rerank_k)), self.norm,
                             None if sure is None else max(float(sure), fine))

    def with_thresholds(self, **kw: Any) -> VersionModel:
        """A copy with some of ``coarse_threshold``, ``fine_threshold``, ``sure_threshold``, ``calibration`` replaced."""
        from dataclasses import replace

        return replace(self, **kw)


@dataclass(frozen=True)
class ShardFiles:
    """One shard's two files and their checksums."""

    index: str              # faiss coarse index, e.g. shard-000.faiss
    index_sha256: str
    rerank: str             # ids + rerank vectors, e.g. shard-000.rerank.safetensors
    rerank_sha256: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "index_sha256": self.index_sha256, "rerank": self.rerank,
                "rerank_sha256": self.rerank_sha256, "count": self.count}


@dataclass(frozen=True)
class EntriesFile:
    """The entries table (one row per id and bank) and its checksum."""

    file: str
    sha256: str
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "rows": self.rows}


@dataclass(frozen=True)
class BankRecord:
    """A bank as a version records it: its declaration and how many images it holds."""

    bank: Bank
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.bank.to_dict(), "count": self.count}


@dataclass(frozen=True)
class HashListFile:
    """One hash bank's list as a version holds it: a Parquet file (``hash``, ``entry_id``,
    ``metadata``; :data:`~pipeline.schemas.HASH_LIST_SCHEMA`), its checksum, and the list file it
    was read from; ``duplicates``: the exact duplicate lines its ingestion dropped; ``index`` /
    ``index_sha256``: a pdq list's stored PDQ index (:mod:`pipeline.gallery.hashlists`), absent in
    versions written before it existed. The optional keys are written only when set."""

    bank: str
    kind: str               # pdq | md5
    file: str               # e.g. list-ncmec_pdq.parquet
    sha256: str
    count: int
    source: str
    duplicates: int = 0
    index: str | None = None          # e.g. list-ncmec_pdq.pdq-index.safetensors
    index_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bank": self.bank, "kind": self.kind, "file": self.file, "sha256": self.sha256,
                             "count": self.count, "source": self.source}
        if self.duplicates:
            d["duplicates"] = self.duplicates
        if self.index is not None:
            d.update(index=self.index, index_sha256=self.index_sha256)
        return d


@dataclass(frozen=True)
class KeypointsFile:
    """The references' local features (:class:`~pipeline.gallery.verify.KeypointTable`), the
    parameters they were found with, and the file's checksum."""

    file: str               # keypoints.safetensors
    sha256: str
    entries: int            # references with a row (every image of the version)
    keypoints: int          # keypoints stored in all
    params: VerifyParams

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "entries": self.entries, "keypoints": self.keypoints,
                "params": self.params.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KeypointsFile:
        return cls(d["file"], d["sha256"], int(d["entries"]), int(d["keypoints"]), VerifyParams.from_dict(d["params"]))


@dataclass(frozen=True)
class Counts:
    images: int
    memberships: int

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "memberships": self.memberships}


@dataclass(frozen=True)
class Rejected:
    """A bank source image that could not be added (unreadable, undecodable, low content)."""

    bank: str
    uri: str
    error_code: str | None
    error_message: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "uri": self.uri, "error_code": self.error_code, "error_message": self.error_message}


@dataclass(frozen=True)
class DisabledReference:
    """A reference switched off by a review decision: it stays in the gallery and never matches
    while in force. ``until`` is an ISO 8601 UTC instant, or None: until enabled again."""

    id: int
    until: str | None
    by: str | None
    at: str | None
    note: str | None
    run_id: str | None

    def in_force(self, at: _dt.datetime) -> bool:
        return self.until is None or _dt.datetime.fromisoformat(self.until) > at

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "until": self.until, "by": self.by, "at": self.at, "note": self.note,
                "run_id": self.run_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DisabledReference:
        return cls(int(d["id"]), d.get("until"), d.get("by"), d.get("at"), d.get("note"), d.get("run_id"))


@dataclass(frozen=True)
class Manifest:
    """One gallery version's manifest (see the module docstring for the JSON it reads and writes)."""

    version: str
    parent: str | None
    created_at: str
    model: VersionModel
    rerank_dtype: str
    coarse_index: CoarseIndexSpec
    shards: tuple[ShardFiles, ...]
    entries: EntriesFile
    banks: Mapping[str, BankRecord]
    counts: Counts
    rejected: tuple[Rejected, ...] = ()
    disabled_references: tuple[DisabledReference, ...] = ()
    hash_lists: tuple[HashListFile, ...] = ()
    keypoints: KeypointsFile | None = None
    format: int = FORMAT_VERSION

    # -- rules read off a manifest ---------------------------------------------------------
    def files(self) -> list[tuple[str, str]]:
        """(file name, sha256) of every data file of the version."""
        shard_files = [f for s in self.shards for f in ((s.index, s.index_sha256), (s.rerank, s.rerank_sha256))]
        kp = [(self.keypoints.file, self.keypoints.sha256)] if self.keypoints is not None else []
        lists = [f for h in self.hash_lists
                 for f in [(h.file, h.sha256)] + ([(h.index, h.index_sha256 or "")] if h.index else [])]
        return shard_files + [(self.entries.file, self.entries.sha256)] + lists + kp

    def disabled_in_force(self, at: _dt.datetime | None = None) -> dict[int, DisabledReference]:
        """References disabled at ``at`` (default: now): id -> record. A record with ``until =
        None`` is disabled until a person enables it again; otherwise until that instant."""
        at = at or _dt.datetime.now(_dt.UTC)
        return {d.id: d for d in self.disabled_references if d.in_force(at)}

    def check_model(self, model_id: str) -> None:
        """Refuse features of model ``model_id`` against a version built with another model."""
        if self.model.model_id != model_id:
            raise GalleryModelMismatch(
                f"gallery {self.version} was built with model {self.model.model_id!r} but the query model is "
                f"{model_id!r}: features of different models are not comparable; rebuild the gallery "
                f"(`modscan gallery build`) or use the matching model")

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the key order every version has been written in."""
        d = {
            "format": self.format,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "model_id": self.model.model_id,
            "dims": {"coarse": self.model.coarse_dim, "rerank": self.model.rerank_dim},
            "thresholds": self.model.thresholds(),
            "rerank_dtype": self.rerank_dtype,
            "coarse_index": self.coarse_index.to_dict(),
            "shards": [s.to_dict() for s in self.shards],
            "entries": self.entries.to_dict(),
            "banks": {n: b.to_dict() for n, b in self.banks.items()},
            "counts": self.counts.to_dict(),
            "rejected": [r.to_dict() for r in self.rejected],
            "disabled_references": [d.to_dict() for d in self.disabled_references],
        }
        if self.hash_lists:
            d["hash_lists"] = [h.to_dict() for h in self.hash_lists]
        if self.keypoints is not None:
            d["keypoints"] = self.keypoints.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """ValueError for an object that is not a manifest (a key missing, a value of another type)."""
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a gallery manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        banks = {n: BankRecord(Bank.from_dict(b), int(b.get("count", 0))) for n, b in d["banks"].items()}
        return cls(
            version=d["version"], parent=d.get("parent"), created_at=d["created_at"],
            model=VersionModel.from_thresholds(d["model_id"], d["dims"]["coarse"], d["dims"]["rerank"], d["thresholds"]),
            rerank_dtype=d["rerank_dtype"], coarse_index=CoarseIndexSpec.from_manifest(d.get("coarse_index")),
            shards=tuple(ShardFiles(**s) for s in d["shards"]), entries=EntriesFile(**d["entries"]),
            banks=banks, counts=Counts(**d["counts"]),
            rejected=tuple(Rejected(r["bank"], r["uri"], r.get("error_code"), r.get("error_message"))
                           for r in d.get("rejected", [])),
            disabled_references=tuple(DisabledReference.from_dict(x) for x in d.get("disabled_references", [])),
            hash_lists=tuple(HashListFile(**h) for h in d.get("hash_lists", [])),
            keypoints=KeypointsFile.from_dict(d["keypoints"]) if d.get("keypoints") else None,
            format=int(d.get("format", FORMAT_VERSION)))

    @classmethod
    def from_json(cls, data: str | bytes) -> Manifest:
        return cls.from_dict(json.loads(data))
