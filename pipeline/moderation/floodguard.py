"""Flood guard: a reference that matches far more uploads than any real one should is held.

An over-broad reference (a near-uniform picture, a logo that appears in every screenshot) turns
into thousands of wrong filters in one night. ThreatExchange's HMA users asked for exactly this
(issue #1994: quarantine a signal "if the number of matches exceeds an expected baseline").

:func:`guard_staged` runs between the job's staged write and its commit (see
:mod:`pipeline.moderation.flags`): it counts the run's blocking matches per bank and per reference, and every
row of a reference with more than ``max_matches_per_reference`` matches gets ``action = review``
instead of ``filter`` / ``downrank``, with a ``reason`` that names the reference, its count, the
limit and the action it would have had. The staged files are rewritten in place (they are not
visible to readers yet), so the commit's verification and counts see the final rows.

Why an absolute count (default 1,000) and not a share of the day's uploads: a share is below one
match on small partitions (0.5 % of 120 uploads holds every reference that matches once) and is
500,000 wrong filters on a 100M-upload day before it trips. A count bounds what one reference can
do in one run and keeps a held reference's review queue a size people can work through. Set it
from your own baseline: ``_run.json``'s ``flood_guard.matches_per_reference`` holds the busiest
references of every run. ``0`` switches holding off (the counts are still recorded).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.storage import Store
from pipeline.moderation.flags import staging_key
from pipeline.schemas import FILE_SCHEMA, Action, Status

DEFAULT_MAX_MATCHES_PER_REFERENCE = 1000
TOP_REFERENCES = 100  # _run.json keeps the busiest references, not one line per gallery entry


@dataclass(frozen=True)
class HeldReference:
    reference_id: int | None   # None for a hash-list entry (list_entry_id names it)
    bank: str
    category: str | None
    matches: int
    held_action: str   # what the rows would have had: filter | downrank
    list_entry_id: str | None = None


# What a match is counted against: a gallery reference id, or (bank, list entry) for a hash bank's
# match (flag rows' list_entry_id): a list entry that matches too much is held like a reference.
Key = int | tuple[str, str]


def _key(r: dict[str, Any]) -> Key | None:
    if r["reference_id"] is not None:
        return int(r["reference_id"])
    if r.get("list_entry_id") is not None:
        return (r["bank"], r["list_entry_id"])
    return None


def _key_name(k: Key) -> str:
    return str(k) if isinstance(k, int) else f"{k[0]}:{k[1]}"


def _busiest(kv: tuple[Key, int]) -> tuple:
    """Order of the busiest keys: most matches first, then references by id, then list entries."""
    k, n = kv
    return (-n, isinstance(k, tuple), k if isinstance(k, int) else 0, k if isinstance(k, tuple) else ("", ""))


@dataclass(frozen=True)
class FloodReport:
    max_matches_per_reference: int
    matched_rows: int
    references_matched: int
    matches_per_bank: dict[str, int]
    matches_per_reference: dict[str, int]   # top TOP_REFERENCES, str(id) -> matches
    allowed_per_bank: dict[str, int]        # uploads an allow-list suppressed, per allow bank
    held: tuple[HeldReference, ...]
    held_rows: int
    files_rewritten: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reason_for(h: HeldReference, limit: int) -> str:
    what = f"reference #{h.reference_id}" if h.reference_id is not None else f"list entry {h.list_entry_id!r}"
    return (f"flood guard: {what} ({h.bank}) matched {h.matches} uploads in this run, more than "
            f"max_matches_per_reference={limit}; held for review instead of {h.held_action}")


def guard_staged(out: Store, run_id: str, max_matches_per_reference: int = DEFAULT_MAX_MATCHES_PER_REFERENCE
                 ) -> FloodReport:
    """Count the staged rows of ``run_id`` (staged in one pass) and hold over-matching references
    in place (see module doc)."""
    data = f"{staging_key(run_id)}/data"
    files = [f"{data}/{k}" for k in out.child(data).list() if k.endswith(".parquet")]
    return guard_files(out, files, max_matches_per_reference)[0]


def guard_files(out: Store, files: list[str], max_matches_per_reference: int = DEFAULT_MAX_MATCHES_PER_REFERENCE,
                rewrite_into: str | None = None) -> tuple[FloodReport, list[str]]:
    """Count the rows of ``files`` (keys under ``out``) and hold over-matching references. A file
    with held rows is rewritten in place, or, with ``rewrite_into`` (a folder key), as a new file
    there while the staged one stays as it was: a chunked run's staged chunks may be resumed by a
    rerun, which must count them as the Moderator wrote them. -> (report, the files to publish)."""
    per_ref: Counter[Key] = Counter()
    per_bank: Counter[str] = Counter()
    allowed: Counter[str] = Counter()
    ref_info: dict[Key, tuple[str, str | None, Counter[str]]] = {}
    cols = ["status", "action", "bank", "category", "reference_id", "list_entry_id"]
    for k in files:
        t = pq.read_table(out.path(k), filesystem=out.fs)
        t = t.select([c for c in cols if c in t.column_names]).to_pylist()
        for r in t:
            rid = _key(r) if r["status"] == Status.MATCHED.value else None
            if rid is not None:
                per_ref[rid] += 1
                per_bank[r["bank"]] += 1
                info = ref_info.setdefault(rid, (r["bank"], r["category"], Counter()))
                info[2][r["action"]] += 1
            elif r["status"] == Status.CLEAN.value and r["bank"] is not None:
                allowed[r["bank"]] += 1
    held = []
    if max_matches_per_reference > 0:
        for rid, n in sorted(per_ref.items(), key=_busiest):
            if n > max_matches_per_reference:
                bank, category, actions = ref_info[rid]
                held.append(HeldReference(rid if isinstance(rid, int) else None, bank, category, n,
                                          actions.most_common(1)[0][0], None if isinstance(rid, int) else rid[1]))
    published, held_rows, rewritten = list(files), 0, 0
    if held:
        published, held_rows, rewritten = _hold(out, files, held, max_matches_per_reference, rewrite_into)
    top = sorted(per_ref.items(), key=_busiest)[:TOP_REFERENCES]
    return FloodReport(max_matches_per_reference, sum(per_ref.values()), len(per_ref), dict(sorted(per_bank.items())),
                       {_key_name(r): n for r, n in top}, dict(sorted(allowed.items())), tuple(held), held_rows,
                       rewritten), published


def _hold(out: Store, files: list[str], held: list[HeldReference], limit: int,
          rewrite_into: str | None) -> tuple[list[str], int, int]:
    """Rewrite the files that hold rows of ``held`` references -> (files to publish, rows held, files rewritten)."""
    reasons: dict[Key, str] = {(h.reference_id if h.reference_id is not None else (h.bank, h.list_entry_id or "")):
                               reason_for(h, limit) for h in held}
    n_rows = n_files = 0
    published = []
    for i, k in enumerate(files):
        t = pq.read_table(out.path(k), filesystem=out.fs)
        for f in FILE_SCHEMA:  # columns a staged file may predate: null
            if f.name not in t.column_names:
                t = t.append_column(f.name, pa.nulls(len(t), f.type))
        t = t.select(FILE_SCHEMA.names).cast(FILE_SCHEMA)
        rows = t.select(["status", "reference_id", "bank", "list_entry_id"]).to_pylist()
        keys = [_key(r) if r["status"] == Status.MATCHED.value else None for r in rows]
        mask = [key is not None and key in reasons for key in keys]
        n = sum(mask)
        if n == 0:
            published.append(k)
            continue
        action = [Action.REVIEW.value if m else a for m, a in zip(mask, t["action"].to_pylist())]
        reason = [reasons[key] if m and key is not None else old for m, key, old in zip(mask, keys, t["reason"].to_pylist())]
        t = t.set_column(t.schema.get_field_index("action"), FILE_SCHEMA.field("action"), pa.array(action, pa.string()))
        t = t.set_column(t.schema.get_field_index("reason"), FILE_SCHEMA.field("reason"), pa.array(reason, pa.string()))
        buf = io.BytesIO()
        pq.write_table(t, buf)
        dst = k if rewrite_into is None else f"{rewrite_into}/held-{i:06d}.parquet"
        out.write_bytes(dst, buf.getvalue())  # staged, not yet visible: replacing it is safe
        published.append(dst)
        n_rows += n
        n_files += 1
    return published, n_rows, n_files


def summary_lines(flood: dict[str, Any] | None) -> list[str]:
    """Lines for the end-of-run summary; loud when a reference was held."""
    if not flood:
        return []
    lines = []
    if flood.get("matches_per_bank"):
        lines.append(f"  matches per bank: {json.dumps(flood['matches_per_bank'])}; "
                     f"{flood['references_matched']} references matched")
    for h in flood.get("held", []):
        what = (f"reference #{h['reference_id']}" if h.get("reference_id") is not None
                else f"list entry {h.get('list_entry_id')!r}")
        lines.append(f"  !! HELD by the flood guard: {what} ({h['bank']}) matched "
                     f"{h['matches']} uploads > max_matches_per_reference={flood['max_matches_per_reference']}: "
                     f"its rows are action=review, not {h['held_action']}")
    return lines
