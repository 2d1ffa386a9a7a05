"""Every record schema of modscan, in one place.

* :data:`FLAG_SCHEMA`: the output row, one per input object, read by the recommender.
* :data:`ENTRY_SCHEMA`: one gallery membership (an image id in a bank).
* :class:`ErrorCode`: the stable error codes of ``status = error`` rows.
* :class:`Status` / :class:`Action`: closed vocabularies of the flag row.

Flag rows carry ``action = review`` with a ``reason`` when the flood guard
(:mod:`pipeline.moderation.floodguard`) held their reference: the reference matched more uploads in one run
than ``max_matches_per_reference``, so its rows wait for a person instead of being filtered or
down-ranked. ``reason`` is null on every other row; partitions written before the column existed
read back with it null.

Stages check their boundaries with :func:`check_columns`; the writer casts to the declared schema
so that a type drift is an error, not a silently different file.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Iterable
from typing import Any

import pyarrow as pa


class Status(str, enum.Enum):
    MATCHED = "matched"  # a blocking bank matched: action is filter or downrank
    CLEAN = "clean"      # nothing matched (or an allow-list entry won)
    ERROR = "error"      # the object could not be read or decoded; see error_code
    LOW_CONTENT = "low_content"  # decoded, but near-uniform (flat colour, almost empty canvas):
    #                              nothing to identify it by, never a match; action is none


class Action(str, enum.Enum):
    FILTER = "filter"
    DOWNRANK = "downrank"
    ALLOW = "allow"      # only as a bank action; flags carry NONE when an allow-list entry wins
    REVIEW = "review"    # only on flags: a held reference's match, waiting for a person (see ``reason``)
    NONE = "none"


class ErrorCode(str, enum.Enum):
    """Stable codes: dashboards and alerts key on these, so never rename one."""

    READ_ERROR = "read_error"                  # object missing or unreadable in storage
    EMPTY_FILE = "empty_file"                  # zero bytes
    FILE_TOO_LARGE = "file_too_large"          # more bytes than decode.max_bytes
    NOT_AN_IMAGE = "not_an_image"              # no image format recognised (PDF, HTML, random bytes)
    TRUNCATED = "truncated"                    # recognised image whose data ends early / is corrupt
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than decode.max_pixels
    IMAGE_TOO_SMALL = "image_too_small"        # a side below decode.min_side (e.g. 1x1 trackers)
    DECODE_ERROR = "decode_error"              # anything else the decoder refused
    INTERNAL_ERROR = "internal_error"          # a bug in modscan: the row is kept, the job goes on
    FORBIDDEN_KEY = "forbidden_key"            # manifest key outside the allowed locations: never read


FLAG_SCHEMA = pa.schema([
    pa.field("image_key", pa.string(), nullable=False),   # object key relative to the input root
    pa.field("image_sha256", pa.string()),                # of the bytes read; null if unreadable
    pa.field("dt", pa.string(), nullable=False),          # partition date YYYY-MM-DD
    pa.field("hour", pa.int32()),                         # hour (UTC) of an hourly partition dt=D/hour=HH/; null for a day
    pa.field("status", pa.string(), nullable=False),      # Status
    pa.field("action", pa.string(), nullable=False),      # filter | downrank | review | none
    pa.field("bank", pa.string()),                        # matched bank (or winning allow bank)
    pa.field("category", pa.string()),                    # e.g. sensitive/violence
    pa.field("reference_id", pa.int64()),                 # gallery entry id of the best match
    pa.field("coarse_score", pa.float32()),               # best 128-d cosine (null: no candidate)
    pa.field("fine_score", pa.float32()),                 # normalised 512-d score of the match (null: not reranked)
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("gallery_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),                  # ErrorCode when status = error
    pa.field("error_message", pa.string()),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("reason", pa.string()),                      # why action = review (flood guard); else null
    pa.field("fine_score_raw", pa.float32()),             # plain 512-d cosine of the same pair (before normalisation)
    # set only on rows a retro run (`modscan retro`) re-decided and changed; null on every other row
    # and on partitions written before the columns existed
    pa.field("decided_by_run", pa.string()),              # the retro run that changed this row's decision
    pa.field("previous_action", pa.string()),             # the action the row had before that change
    # hash signals (issue 20): which signal decided the row, the hash-list entry it matched, and the
    # upload's own PDQ; null on partitions written before the columns existed
    pa.field("signal", pa.string()),                      # descriptor | pdq | md5: the signal of bank/match; else null
    pa.field("pdq_distance", pa.int32()),                 # Hamming distance of a pdq match (0-256); else null
    pa.field("list_entry_id", pa.string()),               # the list's entry id of a hash match (its hash if none)
    pa.field("list_metadata", pa.string()),               # that entry's metadata (JSON object text) or null
    pa.field("pdq_hash", pa.string()),                    # the upload's PDQ (64 hex, ThreatExchange's) on decoded rows
    pa.field("pdq_quality", pa.int32()),                  # its PDQ quality 0-100; null where no PDQ hash
    # geometric verification (pipeline.gallery.verify); null where nothing was verified and on
    # partitions written before the columns existed
    pa.field("inliers", pa.int32()),                      # RANSAC inliers of the deciding (or best rejected) candidate
    pa.field("match_rule", pa.string()),                  # MatchRule: how the descriptor's decision was reached
])

# The partition columns live in the path (dt=YYYY-MM-DD/, and hour=HH/ below it for an hourly
# partition), hive style, not inside the files: pandas/pyarrow/DuckDB readers of the output root
# get them back as columns. A copy inside the files would clash with the path's (pyarrow refuses
# to merge string with dictionary).
PARTITION_COLUMN = "dt"
PARTITION_COLUMNS = (PARTITION_COLUMN, "hour")
FILE_SCHEMA = pa.schema([f for f in FLAG_SCHEMA if f.name not in PARTITION_COLUMNS])

# One row per searched upload of a run (decoded, not low content): what `modscan retro` matches
# later changes of the gallery against without re-reading the image (pipeline/moderation/signatures.py).
# coarse_feature: the 128-d low-res query feature, little-endian float16, as fixed_size_binary(256)
# (one 256-byte value per row: no list offsets or per-element levels; every Parquet reader reads it
# as bytes, while a list<halffloat> needs pyarrow >= 15 and a reader that knows Parquet FLOAT16).
SIGNATURE_SCHEMA = pa.schema([
    pa.field("image_key", pa.string(), nullable=False),
    pa.field("image_uri", pa.string()),                   # the full URI the bytes were read from
    pa.field("image_sha256", pa.string()),
    pa.field("coarse_feature", pa.binary(256), nullable=False),
    pa.field("pdq_hash", pa.string()),                    # filled when hash signals land; else null
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])

# One row per upload of a partition, the companion of its flags under ``OUTPUT/_waves/``
# (pipeline/moderation/waves.py): the near-duplicate cluster each upload belongs to among the
# partition's own uploads, for the recommender ("keep the first, down-rank the repeats") and the
# reviewers' waves. ``dup_basis``: ``searched`` (compared with the partition's other uploads),
# ``not_searched`` (an error or low-content row: never compared, a cluster of its own) or
# ``reread_failed`` (its picture could not be read again for the fine score: a cluster of its own).
WAVE_SCHEMA = pa.schema([
    pa.field("image_key", pa.string(), nullable=False),
    pa.field("dup_cluster_id", pa.string(), nullable=False),   # 16 hex digits: sha256(partition, smallest member key)
    pa.field("dup_cluster_size", pa.int32(), nullable=False),
    pa.field("dup_rank", pa.int32(), nullable=False),          # 1: the cluster's first upload (upload time, then key)
    pa.field("wave", pa.bool_(), nullable=False),              # dup_cluster_size >= [job] wave_min_size
    pa.field("uploaded_at", pa.timestamp("us", tz="UTC")),     # the object's modification time; null if unknown
    pa.field("dup_score", pa.float32()),                       # best normalised fine score of an edge it joined by
    pa.field("dup_edge", pa.string()),                         # how that edge was accepted: same_bytes | sure | verified
    pa.field("dup_basis", pa.string(), nullable=False),
    pa.field("image_uri", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),           # the waves run
    pa.field("flags_run_id", pa.string(), nullable=False),     # the flags partition it clustered
])

ENTRY_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),           # stable gallery id (one per unique sha256)
    pa.field("bank", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("added_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # the reference's own hash signals (decoder's PDQ, MD5 of its bytes), for `gallery export-hashes`;
    # null in versions written before they were kept
    pa.field("pdq_hash", pa.string()),
    pa.field("pdq_quality", pa.int32()),
    pa.field("md5", pa.string()),
])

# One hash bank's list inside a gallery version (list-<bank>.parquet), in list order.
HASH_LIST_SCHEMA = pa.schema([
    pa.field("hash", pa.string(), nullable=False),        # lower-case hex: 64 digits (pdq), 32 (md5)
    pa.field("entry_id", pa.string()),                    # the list's own id, if it has one
    pa.field("metadata", pa.string()),                    # the list's JSON object (canonical text), if any
])


def check_columns(batch: dict | pa.Table, required: Iterable[str], where: str) -> None:
    """Raise a clear error when a stage receives a batch without the columns it needs."""
    names = set(batch.column_names if isinstance(batch, pa.Table) else batch.keys())
    missing = [c for c in required if c not in names]
    if missing:
        raise KeyError(f"{where}: batch lacks columns {missing}; has {sorted(names)}")


def error_rows(keys: list[str], codes: list[str], messages: list[str | None], *, model_version: str,
               gallery_version: str, run_id: str, sha256s: list[str | None] | None = None) -> Any:
    """``status = error`` flag rows (:data:`FILE_SCHEMA`) for keys that produced no decision: the
    driver's ``forbidden_key`` rows and a failed Moderator batch. Columns not named here are null."""
    n = len(keys)
    now = _dt.datetime.now(_dt.UTC)
    given: dict[str, list[Any]] = {
        "image_key": list(keys), "image_sha256": list(sha256s) if sha256s is not None else [None] * n,
        "status": [Status.ERROR.value] * n, "action": [Action.NONE.value] * n,
        "error_code": list(codes), "error_message": list(messages), "model_version": [model_version] * n,
        "gallery_version": [gallery_version] * n, "run_id": [run_id] * n, "processed_at": [now] * n}
    return pa.Table.from_pydict({f.name: given.get(f.name, [None] * n) for f in FILE_SCHEMA}, schema=FILE_SCHEMA)
