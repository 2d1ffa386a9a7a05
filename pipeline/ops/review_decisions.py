"""Review decisions fed back into the gallery: ``modscan review apply DECISIONS.csv``.

The file is CSV with a header. Columns (any order; the first four are required, and each row
needs an ``image_key`` or a ``reference_id``):

==============  ==========================================================================
``decision``    ``false_positive`` | ``confirmed`` | ``disable_reference`` | ``enable_reference``
``reviewer``    who decided (kept in the audit log)
``note``        why (kept in the audit log; required: an audit entry without a reason is noise)
``image_key``   the upload: a full URI (``s3://...``, ``/abs/path``) or a key under ``--input``
``reference_id`` the gallery entry the upload matched (the review page shows it)
``bank``        optional: the allow bank for ``false_positive``, the bank for ``confirmed``
``until``       optional: ``YYYY-MM-DD`` (00:00 UTC) or an ISO timestamp; a disable ends then
``run_id``      optional: the moderation run the row came from (kept in the audit log)
==============  ==========================================================================

What each decision does:

* ``false_positive`` with a ``bank`` (an allow bank): the upload is added to that allow-list, so
  it and its copies stop matching; the reference stays active for everything else.
  Without a ``bank``: the reference is disabled (until ``until``, or until enabled again).
* ``confirmed``: the upload is added to ``bank``, or to the blocking bank of ``reference_id``
  when it has exactly one: new edits of the same picture then match directly.
* ``disable_reference`` / ``enable_reference``: switch a reference off (optionally ``until``) /
  on again. A disabled reference stays in the gallery (vectors, memberships) and never matches.

Every row is validated before anything is written, and every problem is reported as
``FILE:LINE: message``; one bad row (or one upload that cannot be read or decoded) means nothing
is applied. A valid file becomes **one** new gallery version: stored vectors are reused as
``gallery add`` does (an upload already in the gallery by sha256 only gains a membership), and
one audit record (:mod:`pipeline.gallery.audit`) lists every row with its reviewer, note and run.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.card import ModelCard
from pipeline import gallery as G
from pipeline.errors import UsageError
from pipeline.ingest.storage import Store, UnsafeKeyError, open_store, safe_key
from pipeline.schemas import Action

DECISIONS = ("false_positive", "confirmed", "disable_reference", "enable_reference")
REQUIRED = ("decision", "reviewer", "note")
OPTIONAL = ("image_key", "reference_id", "bank", "until", "run_id")


class DecisionFileError(UsageError, ValueError):
    """Every problem of a decisions file, each as ``file:line: message``; nothing was applied."""

    def __init__(self, path: str, errors: list[tuple[int, str]]) -> None:
        self.errors = sorted(errors)
        lines = [f"{path}:{ln}: {msg}" for ln, msg in self.errors]
        # ";" keeps the entries apart when the CLI prints the message on one line
        super().__init__(f"{len(errors)} error(s) in decisions file, nothing applied:\n" + ";\n".join(lines))


@dataclass(frozen=True)
class Change:
    """One validated row and what it will do."""

    line: int
    decision: str
    reviewer: str
    note: str
    effect: str                       # add_to_bank | disable | enable
    image: str | None = None          # resolved upload URI
    reference_id: int | None = None
    bank: str | None = None
    disabled_until: str | None = None  # ISO UTC
    run_id: str | None = None

    def audit(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ApplyResult:
    version: str | None               # None for a dry run
    parent: str
    changes: tuple[Change, ...]
    added: dict[str, dict[str, int]]  # bank -> add stats (added / new_membership / already_present)


def _parse_until(text: str, now: _dt.datetime) -> str:
    """``YYYY-MM-DD`` (start of that day, UTC) or an ISO timestamp (UTC if naive) -> ISO UTC."""
    try:
        if len(text) == 10:
            t = _dt.datetime.combine(_dt.date.fromisoformat(text), _dt.time(), _dt.UTC)
        else:
            t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            t = t.replace(tzinfo=_dt.UTC) if t.tzinfo is None else t.astimezone(_dt.UTC)
    except ValueError:
        raise ValueError(f"until {text!r} is not YYYY-MM-DD or an ISO 8601 timestamp") from None
    if t <= now:
        raise ValueError(f"until {text} is not in the future (now {now.isoformat(timespec='seconds')})")
    return t.isoformat()


def _resolve_image(key: str, input_uri: str | None) -> str:
    if key.startswith("s3://") or os.path.isabs(key):
        return key
    if not input_uri:
        raise ValueError(f"image_key {key!r} is relative: pass --input PREFIX (the run's input) or use a full URI")
    try:
        return input_uri.rstrip("/") + "/" + safe_key(key)
    except UnsafeKeyError as e:
        raise ValueError(str(e)) from None


class _Gallery:
    """What validation needs to know about the current version."""

    def __init__(self, content: G.GalleryContent) -> None:
        self.banks = content.banks
        self.ids = set(content.ids.tolist())
        e = content.entries
        self.banks_of: dict[int, list[str]] = {}
        for gid, bank in zip(e["id"].tolist(), e["bank"].tolist()):
            self.banks_of.setdefault(int(gid), []).append(bank)
        self.disabled = set(content.disabled)


def _parse_or_record(errs: list[str], parse: Callable[..., Any], *args: Any) -> Any:
    """``parse(*args)``, or None with the ValueError's message appended to ``errs``."""
    try:
        return parse(*args)
    except ValueError as e:
        errs.append(str(e))
        return None


def _parse_reference(text: str, gal: _Gallery) -> int:
    try:
        ref = int(text)
    except ValueError:
        raise ValueError(f"reference_id {text!r} is not an integer") from None
    if ref not in gal.ids:
        raise ValueError(f"reference #{ref} is not in the gallery")
    return ref


def _false_positive_effect(r: dict[str, str], bank: str | None, gal: _Gallery, errs: list[str]) -> str:
    if not r.get("bank"):
        if not r.get("reference_id"):
            errs.append("false_positive without a bank disables the reference: reference_id is empty")
        return "disable"
    if bank is not None and gal.banks[bank].action != Action.ALLOW.value:
        errs.append(f"false_positive adds the upload to an allow bank; {bank!r} is a "
                    f"{gal.banks[bank].action} bank")
    if not r.get("image_key"):
        errs.append("false_positive with a bank needs the upload's image_key")
    if r.get("until"):
        errs.append("until applies to disabling a reference; leave bank empty to disable it")
    return "add_to_bank"


def _confirmed_bank(r: dict[str, str], ref: int | None, bank: str | None, gal: _Gallery, errs: list[str]) -> str | None:
    """The bank a ``confirmed`` row adds to: its own, or the one blocking bank of its reference."""
    if not r.get("image_key"):
        errs.append("confirmed needs the upload's image_key")
    if r.get("until"):
        errs.append("until is only for disabling a reference")
    if bank is not None and gal.banks[bank].action == Action.ALLOW.value:
        errs.append(f"confirmed adds the upload to a blocking bank; {bank!r} is an allow bank")
    if not r.get("bank") and ref is not None:
        blocking = sorted(b for b in gal.banks_of.get(ref, []) if gal.banks[b].action != Action.ALLOW.value)
        if len(blocking) == 1:
            return blocking[0]
        errs.append(f"reference #{ref} is in blocking banks {blocking}: name one in column bank")
    elif not r.get("bank") and not r.get("reference_id"):
        errs.append("confirmed needs a bank or the matched reference_id")
    return bank


def _switch_effect(decision: str, r: dict[str, str], ref: int | None, gal: _Gallery, errs: list[str]) -> str:
    """disable_reference / enable_reference."""
    if not r.get("reference_id"):
        errs.append(f"{decision} needs a reference_id")
    if r.get("bank"):
        errs.append(f"{decision} takes no bank (a reference is switched off in every bank)")
    if decision == "enable_reference" and r.get("until"):
        errs.append("enable_reference takes no until")
    if decision == "enable_reference" and ref is not None and ref not in gal.disabled:
        errs.append(f"reference #{ref} is not disabled")
    return "disable" if decision == "disable_reference" else "enable"


def _check_row(r: dict[str, str], line: int, gal: _Gallery, input_uri: str | None, now: _dt.datetime
               ) -> tuple[Change | None, list[tuple[int, str]]]:
    """One row -> (change, errors). Collects every error of the row, not only the first."""
    errs: list[str] = []
    decision = r.get("decision", "")
    if decision not in DECISIONS:
        errs.append(f"decision {decision!r} must be one of {list(DECISIONS)}")
    for col in REQUIRED[1:]:
        if not r.get(col):
            errs.append(f"{col} is empty")
    ref = _parse_or_record(errs, _parse_reference, r["reference_id"], gal) if r.get("reference_id") else None
    image = _parse_or_record(errs, _resolve_image, r["image_key"], input_uri) if r.get("image_key") else None
    if not r.get("image_key") and not r.get("reference_id"):
        errs.append("needs an image_key or a reference_id")
    until = _parse_or_record(errs, _parse_until, r["until"], now) if r.get("until") else None
    bank = r.get("bank") or None
    if bank is not None and bank not in gal.banks:
        errs.append(f"bank {bank!r} is not in the gallery (banks: {sorted(gal.banks)})")
        bank = None
    effect = ""
    if decision == "false_positive":
        effect = _false_positive_effect(r, bank, gal, errs)
    elif decision == "confirmed":
        effect, bank = "add_to_bank", _confirmed_bank(r, ref, bank, gal, errs)
    elif decision in ("disable_reference", "enable_reference"):
        effect = _switch_effect(decision, r, ref, gal, errs)
    if errs:
        return None, [(line, m) for m in errs]
    return Change(line, decision, r["reviewer"], r["note"], effect, image, ref, bank, until,
                  r.get("run_id") or None), []


def parse_decisions(text: str, path: str, content: G.GalleryContent, input_uri: str | None = None,
                    now: _dt.datetime | None = None) -> list[Change]:
    """Validate a whole decisions file against a gallery version; raise
    :class:`DecisionFileError` with every problem, or return the changes in file order."""
    now = now or _dt.datetime.now(_dt.UTC)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DecisionFileError(path, [(1, "empty file: expected a header row")]) from None
    errors: list[tuple[int, str]] = []
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    missing = [h for h in REQUIRED if h not in header]
    if unknown:
        errors.append((1, f"unknown columns {unknown} (known: {list(REQUIRED + OPTIONAL)})"))
    if missing:
        errors.append((1, f"missing required columns {missing}"))
    if "image_key" not in header and "reference_id" not in header:
        errors.append((1, "needs an image_key or a reference_id column"))
    if len(set(header)) != len(header):
        errors.append((1, "a column appears twice"))
    if errors:
        raise DecisionFileError(path, errors)
    gal = _Gallery(content)
    changes: list[Change] = []
    switched: dict[int, int] = {}  # reference -> line of its disable/enable decision
    line = reader.line_num + 1
    for row in reader:
        start, line = line, reader.line_num + 1  # a quoted note may span lines: report the first
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            errors.append((start, f"{len(row)} fields, the header has {len(header)}"))
            continue
        ch, errs = _check_row({h: v.strip() for h, v in zip(header, row)}, start, gal, input_uri, now)
        errors += errs
        if ch is not None and ch.effect in ("disable", "enable") and ch.reference_id is not None:
            if ch.reference_id in switched:
                errors.append((start, f"reference #{ch.reference_id} is already switched on line "
                                      f"{switched[ch.reference_id]}; one disable/enable per reference and file"))
                continue
            switched[ch.reference_id] = start
        if ch is not None:
            changes.append(ch)
    if errors:
        raise DecisionFileError(path, errors)
    if not changes:
        raise DecisionFileError(path, [(1, "no decisions in the file")])
    return changes


def _extract_uploads(changes: list[Change], extract: G.Extractor, path: str) -> dict[str, dict[str, Any]]:
    """Features of every upload to add, or DecisionFileError naming the rows whose upload failed."""
    uris = sorted({c.image for c in changes if c.effect == "add_to_bank" and c.image})
    results = {r["uri"]: r for r in extract(uris)} if uris else {}
    errors = [(c.line, f"upload {c.image} cannot be added: {results[c.image]['error_code']}: "
                       f"{results[c.image]['error_message']}")
              for c in changes if c.effect == "add_to_bank" and not results[c.image]["ok"]]
    if errors:
        raise DecisionFileError(path, errors)
    return results


def _extracted(result: dict[str, Any]) -> G.Extractor:
    """An extractor that returns the features already extracted from one upload."""
    return lambda _uris: [result]


def apply_decisions(store: Store, text: str, path: str, card: ModelCard, extract: G.Extractor,
                    input_uri: str | None = None, who: str | None = None, dry_run: bool = False) -> ApplyResult:
    """Validate, extract the uploads to add, then write one new version with one audit record.
    ``card`` must be the gallery's model (its features are what the gallery stores)."""
    m, content = G.read_content(store)
    if input_uri:  # a relative local --input becomes absolute: entries keep where the upload came from
        input_uri = open_store(input_uri).uri
    changes = parse_decisions(text, path, content, input_uri)
    if any(c.effect == "add_to_bank" for c in changes):
        m.check_model(card.version_id)
    results = _extract_uploads(changes, extract, path)
    added: dict[str, dict[str, int]] = {}
    now = _dt.datetime.now(_dt.UTC).isoformat()
    for c in changes:
        if c.effect == "add_to_bank":
            assert c.bank is not None and c.image is not None  # parse_decisions sets both for this effect
            st = G.add_images(content, content.banks[c.bank], [c.image], _extracted(results[c.image]))
            tot = added.setdefault(c.bank, {})
            for k, v in st.items():
                tot[k] = tot.get(k, 0) + v
        elif c.effect == "disable":
            assert c.reference_id is not None  # parse_decisions sets it for disable and enable
            content.disabled[c.reference_id] = G.DisabledReference(c.reference_id, c.disabled_until, c.reviewer, now,
                                                                   c.note, c.run_id)
        elif c.reference_id is not None:
            content.disabled.pop(c.reference_id, None)
    if dry_run:
        return ApplyResult(None, m.version, tuple(changes), added)
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.decision] = counts.get(c.decision, 0) + 1
    runs = {c.run_id for c in changes if c.run_id}
    # the gallery's own model and thresholds: a review never recalibrates
    version = G.write_derived(store, m, content, "review_apply", who,
                              run_id=runs.pop() if len(runs) == 1 else None,
                              note=f"review apply {os.path.basename(path)}: {len(changes)} decision(s)",
                              details={"decisions": counts, "added": added, "file": os.path.basename(path)},
                              changes=[c.audit() for c in changes])
    return ApplyResult(version, m.version, tuple(changes), added)
