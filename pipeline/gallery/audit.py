"""The gallery's append-only audit log: who changed what, when, why, and from which run.

Layout under a gallery root, beside ``versions/``::

    audit/20261125T101530.123456Z-v000004-1f2e3d4c.json     # one immutable object per operation

One object per operation (``build``, ``add``, ``remove``, ``review_apply``), written once and never
touched again. S3 has no append; an object per entry is append-only by construction and needs no
read-modify-write, so two operations can never lose each other's entries by rewriting a shared
file. Keys start with a UTC timestamp, so a sorted listing is the log in time order.

The log lives outside ``versions/``: it is the history of the gallery, not a property of one
version. Versions are immutable and ``CURRENT`` only moves forward, so add/remove/apply never
touch it, and pointing ``CURRENT`` back at an old version keeps the whole log.

Tamper evidence: every record stores the sha256 of the bytes of the record before it
(``prev_sha256``). Rewriting or deleting an old record breaks the chain, which :func:`verify_log`
(and ``modscan gallery info``) reports; :func:`append` refuses to overwrite an existing key.

Writers record an operation *before* they publish its version (see
:func:`pipeline.gallery.publish_version`): a published change always has its entry, and a crash in
between leaves an entry that names a version ``CURRENT`` never pointed to.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ModscanError
from pipeline.ingest.storage import Store

AUDIT_PREFIX = "audit"
FORMAT_VERSION = 1
ACTIONS = ("build", "add", "remove", "review_apply")
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_STAMP_EXAMPLE = "20261125T101530.123456Z"


class AuditLogError(ModscanError, RuntimeError):
    """The audit log cannot be written (an existing entry would be overwritten)."""


@dataclass(frozen=True)
class AuditRecord:
    """One operation on the gallery. ``changes`` holds one dict per reviewed row for
    ``review_apply`` (decision, reference_id, image, bank, reviewer, note, run_id,
    disabled_until, line); ``details`` holds the operation's counts."""

    at: str                      # ISO 8601 UTC
    action: str                  # one of ACTIONS
    who: str
    version: str                 # the version this operation produced
    parent: str | None           # the version it started from
    note: str | None = None
    run_id: str | None = None    # the moderation run the decision came from, when known
    details: dict[str, Any] = field(default_factory=dict)
    changes: tuple[dict[str, Any], ...] = ()
    prev_sha256: str | None = None
    key: str = ""                # object key, filled when read back

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("key")
        d["changes"] = list(self.changes)
        return json.dumps({"format": FORMAT_VERSION, **d}, indent=2, sort_keys=True, default=str) + "\n"


def default_actor() -> str:
    """Who is operating: ``MODSCAN_OPERATOR`` (set it in schedulers), else the OS user."""
    who = os.environ.get("MODSCAN_OPERATOR")
    if who:
        return who
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def list_keys(store: Store) -> list[str]:
    """Keys of every audit record, in time order."""
    return sorted(k for k in store.list(AUDIT_PREFIX) if k.endswith(".json"))


def append(store: Store, action: str, version: str, parent: str | None, who: str | None = None,
           note: str | None = None, run_id: str | None = None, details: dict[str, Any] | None = None,
           changes: list[dict[str, Any]] | tuple[dict[str, Any], ...] = ()) -> AuditRecord:
    """Write one new record; never overwrites. Returns the record (with its key)."""
    if action not in ACTIONS:
        raise ValueError(f"audit action must be one of {ACTIONS}, got {action!r}")
    keys = list_keys(store)
    prev = _sha256(store.read_bytes(keys[-1])) if keys else None
    now = _dt.datetime.now(_dt.UTC)
    rec = AuditRecord(at=now.isoformat(), action=action, who=who or default_actor(), version=version,
                      parent=parent, note=note, run_id=run_id, details=dict(details or {}),
                      changes=tuple(changes), prev_sha256=prev)
    stamp = now
    if keys:
        # A writer whose clock is behind the last one's must still sort after it: the key's time
        # is only for ordering, ``at`` keeps the writer's own clock.
        last = _dt.datetime.strptime(keys[-1].split("/")[-1][:len(_STAMP_EXAMPLE)], _STAMP)
        last = last.replace(tzinfo=_dt.UTC)
        stamp = max(now, last + _dt.timedelta(microseconds=1))
    key = f"{AUDIT_PREFIX}/{stamp.strftime(_STAMP)}-{version}-{uuid.uuid4().hex[:8]}.json"
    if store.exists(key):
        raise AuditLogError(f"audit log: {store.full_uri(key)} exists; entries are never overwritten")
    store.write_text(key, rec.to_json())
    return AuditRecord(**{**asdict(rec), "changes": rec.changes, "key": key})


def _parse(key: str, raw: bytes) -> AuditRecord:
    d = json.loads(raw)
    d.pop("format", None)
    d["changes"] = tuple(d.get("changes", ()))
    return AuditRecord(**d, key=key)


def read_log(store: Store) -> list[AuditRecord]:
    """Every record, oldest first."""
    return [_parse(k, store.read_bytes(k)) for k in list_keys(store)]


def verify_log(store: Store) -> list[str]:
    """Problems with the chain of records (empty list: intact). A rewritten record changes its
    sha256, so the next record's ``prev_sha256`` no longer matches; a deleted one too."""
    problems = []
    prev: str | None = None
    for k in list_keys(store):
        raw = store.read_bytes(k)
        try:
            rec = _parse(k, raw)
        except (ValueError, TypeError) as e:
            problems.append(f"{k}: unreadable record ({type(e).__name__})")
            prev = _sha256(raw)
            continue
        if rec.prev_sha256 != prev:
            problems.append(f"{k}: prev_sha256 does not match the record before it "
                            f"(an earlier record was rewritten, deleted or inserted)")
        prev = _sha256(raw)
    return problems


def flat_entries(records: list[AuditRecord]) -> list[dict[str, Any]]:
    """One line per change, for display: a review apply expands to its rows, other operations
    are one line each."""
    out = []
    for r in records:
        base = {"at": r.at, "action": r.action, "who": r.who, "version": r.version, "note": r.note,
                "run_id": r.run_id}
        if not r.changes:
            out.append({**base, **{k: v for k, v in r.details.items() if not isinstance(v, (dict, list))}})
        for c in r.changes:  # who decided (the reviewer) and who applied the file
            out.append({**base, "who": c.get("reviewer") or r.who, "applied_by": r.who, "note": c.get("note"),
                        "run_id": c.get("run_id"),
                        **{k: c.get(k) for k in ("decision", "reference_id", "image", "bank", "disabled_until")}})
    return out
