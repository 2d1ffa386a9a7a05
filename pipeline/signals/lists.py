"""Hash lists of hash-sharing programs: read and validated line by line, written back.

Three formats, told apart by :func:`detect_format`:

* **ThreatExchange's plain signal file**, as ``threatexchange``'s local-file exchange
  (``threatexchange/exchanges/impl/file_api.py``) reads and writes it: one ``<signal_type>
  <hash>`` per line, the type and the hash separated by the line's first space. Blank lines are
  skipped (that reader skips them too). The format has **no comments**: that reader would take
  ``# note`` as a signal of type ``#``, so a ``#`` line is an error here rather than a file that
  means different things to two readers. Signal type names are ThreatExchange's:
  ``pdq`` (``PdqSignal``) and ``video_md5`` (``VideoMD5Signal``, the type NCMEC, StopNCII and Tech
  Against Terrorism MD5s arrive as; an MD5 is a file's, whatever the content); ``md5`` is accepted
  as a synonym. Entries carry no id or metadata.
* **A bare-hash file**: one hash a line and nothing else, what that reader takes when its
  collaboration sets ``signal_type`` ("if the file row doesn't list the signal type, interpret as
  this type"; each stripped line is then the signal). The bank's ``kind`` is that signal type.
  Every line of such a file must be bare: a ``<type> <hash>`` line in it is an error (that reader
  would take the whole line as one malformed signal).
* **CSV** with a header: ``hash`` (required), ``entry_id`` and ``metadata`` (optional; metadata a
  JSON object, e.g. a program's own id and labels, returned with a match). One kind per file,
  the bank's.

**Duplicates.** A line that repeats an earlier entry exactly (same hash, same entry id, same
metadata as JSON; a hash's case does not count) is dropped and counted
(:attr:`HashList.duplicates`, reported wherever the list's size is), as ThreatExchange's own reader
de-duplicates silently: program-scale lists repeat lines. A *conflicting* duplicate (the same hash
with another entry id or metadata, or the same entry id on another hash) is refused, naming both
lines.

Every other line is checked too and every problem reported as ``FILE:LINE: message``, all at once,
in a :class:`HashListError` (a :class:`~pipeline.errors.ConfigFileError`, exit 2, like bank files):
64 hex digits for PDQ, 32 for MD5 (either case; stored lower-case), unknown signal types, a signal
type of the other kind (a ``pdq`` bank takes only PDQ lines, an ``md5`` bank only MD5 lines), bad
JSON, unknown CSV columns, non-UTF-8 text. At most :data:`MAX_REPORTED` problems are listed, then a
count.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import ConfigFileError, MissingInput
from pipeline.ingest.storage import split_uri
from pipeline.signals.hashes import MD5_HEX_LEN, PDQ_HEX_LEN

HashKind = Literal["pdq", "md5"]
KINDS: tuple[str, ...] = ("pdq", "md5")
HEX_LEN = {"pdq": PDQ_HEX_LEN, "md5": MD5_HEX_LEN}
# signal type name (as a signal file spells it) -> kind
SIGNAL_TYPES = {"pdq": "pdq", "video_md5": "md5", "md5": "md5"}
# what the writer spells each kind as: ThreatExchange's names, so that `threatexchange` reads it back
WRITE_TYPE = {"pdq": "pdq", "md5": "video_md5"}
# ThreatExchange signal types that exist but are no image hash lists modscan matches
_OTHER_TE_TYPES = {"url", "url_md5", "raw_text", "trend_query", "video_sha256", "video_tmk_pdqf", "pdq_ocr",
                   "tlsh", "tlsh_pdf", "clip", "text_md5"}
CSV_COLUMNS = ("hash", "entry_id", "metadata")
FORMATS = ("auto", "signals", "bare", "csv")
MAX_REPORTED = 200
MAX_ENTRY_ID = 256

_HEX = {k: re.compile(f"[0-9a-fA-F]{{{n}}}") for k, n in HEX_LEN.items()}
_ANY_HEX = re.compile("[0-9a-fA-F]+")


@dataclass(frozen=True)
class HashEntry:
    """One list entry. ``hash``: lower-case hex (64 digits for PDQ, 32 for MD5); ``entry_id``: the
    list's own id (CSV ``entry_id``), None where the list has none; ``metadata``: the CSV's JSON
    object as canonical JSON text (sorted keys, compact; hashable, ready for a Parquet string
    column), None where absent. :meth:`meta` parses it."""

    hash: str
    entry_id: str | None = None
    metadata: str | None = None

    def meta(self) -> dict[str, Any] | None:
        return json.loads(self.metadata) if self.metadata is not None else None


class HashList(list[HashEntry]):
    """A parsed list: its entries in file order, and what ingestion made of the file: the
    ``format`` it was read as and the exact ``duplicates`` it dropped (module docstring)."""

    def __init__(self, entries: Iterable[HashEntry] = (), duplicates: int = 0, format: str = "signals") -> None:
        super().__init__(entries)
        self.duplicates = int(duplicates)
        self.format = format


class HashListError(ConfigFileError, ValueError):
    """All problems of one hash list, each as ``file:line: message``."""

    what = "hash list"


def canonical_metadata(obj: dict[str, Any]) -> str:
    """A metadata object as the canonical JSON text :class:`HashEntry` keeps."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"hash list kind must be one of {KINDS}, got {kind!r}")


def detect_format(text: str, name: str = "") -> str:
    """``"csv"`` for a ``.csv`` name or a first non-blank line that is a CSV header naming a
    known column (its first field ``hash``, ``entry_id`` or ``metadata``); ``"bare"`` when that
    line is hex digits alone (a hash without its type); ``"signals"`` otherwise (a signal-file line
    is ``<type> <hash>``, never such a header)."""
    if name.lower().endswith(".csv"):
        return "csv"
    for line in text.splitlines():
        if line.strip():
            first = line.split(",", 1)[0].strip().strip('"').lower()
            if first in CSV_COLUMNS:
                return "csv"
            return "bare" if _ANY_HEX.fullmatch(line.strip()) else "signals"
    return "signals"


class _Problems:
    """Collects (line, message) pairs; stops listing after MAX_REPORTED, keeps counting."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []
        self.more = 0
        self.last = 0

    def add(self, line: int, msg: str) -> None:
        if len(self.items) < MAX_REPORTED:
            self.items.append((line, msg))
        else:
            self.more += 1
            self.last = line

    def raise_if_any(self, path: str) -> None:
        if self.items:
            items = list(self.items)
            if self.more:
                items.append((self.last, f"... and {self.more} more problem(s) not listed"))
            raise HashListError(path, items)


def _shown(s: str, n: int = 80) -> str:
    return repr(s if len(s) <= n else s[: n - 3] + "...")


def _check_hash(raw: str, kind: str, line: int, problems: _Problems) -> str | None:
    """The lower-cased hash, or None (a problem recorded) when ``raw`` is not one of ``kind``."""
    n = HEX_LEN[kind]
    if not _HEX[kind].fullmatch(raw):
        what = "PDQ" if kind == "pdq" else "MD5"
        other = next((k for k, m in HEX_LEN.items() if k != kind and len(raw) == m and _HEX[k].fullmatch(raw)), None)
        hint = f" (an {other} hash? this list is for a kind = {kind!r} bank)" if other else ""
        problems.add(line, f"{what} hash must be {n} hex digits, got {len(raw)} character(s): {_shown(raw)}{hint}")
        return None
    return raw.lower()


class _Seen:
    """The entries kept so far, by hash and by entry id: an exact repeat is counted and dropped, a
    conflicting one is a problem naming the line it conflicts with."""

    def __init__(self) -> None:
        self.entries: list[HashEntry] = []
        self.lines: list[int] = []
        self.by_hash: dict[str, int] = {}
        self.by_id: dict[str, int] = {}
        self.duplicates = 0

    def add(self, e: HashEntry, line: int, problems: _Problems) -> None:
        at = self.by_hash.get(e.hash)
        if at is not None:
            first = self.entries[at]
            if first == e:
                self.duplicates += 1
                return
            what = " and ".join(f for f in ("entry_id", "metadata") if getattr(first, f) != getattr(e, f))
            problems.add(line, f"duplicate hash {e.hash} with another {what} than at line {self.lines[at]} "
                               f"(a conflicting duplicate: which one holds?)")
            return
        if e.entry_id is not None and e.entry_id in self.by_id:
            at = self.by_id[e.entry_id]
            problems.add(line, f"duplicate entry_id {e.entry_id!r} (first at line {self.lines[at]}, "
                               f"with hash {self.entries[at].hash})")
            return
        self.by_hash[e.hash] = len(self.entries)
        if e.entry_id is not None:
            self.by_id[e.entry_id] = len(self.entries)
        self.entries.append(e)
        self.lines.append(line)


def _signal_line(s: str, kind: str, ln: int, problems: _Problems) -> str | None:
    """The hash of one non-blank ``<signal_type> <hash>`` line, or None (a problem recorded)."""
    if s.startswith("#"):
        problems.add(ln, "the signal-file format has no comments (threatexchange would read '#' as a signal type)")
        return None
    stype, _, sig = s.partition(" ")
    sig = sig.strip()
    if not sig:
        bare = " (a bare hash: a file of bare hashes has no '<signal_type> ' on any line)" if _ANY_HEX.fullmatch(s) else ""
        problems.add(ln, f"expected '<signal_type> <hash>', got {_shown(s)}{bare}")
        return None
    st = stype.lower()
    if st not in SIGNAL_TYPES:
        if st in _OTHER_TE_TYPES:
            problems.add(ln, f"signal type {_shown(stype)} is not an image hash modscan matches (known: {sorted(SIGNAL_TYPES)})")
        else:
            problems.add(ln, f"unknown signal type {_shown(stype)} (known: {sorted(SIGNAL_TYPES)})")
        return None
    if SIGNAL_TYPES[st] != kind:
        problems.add(ln, f"a {SIGNAL_TYPES[st]} signal ({stype!r}) in a {kind} list: a {kind} bank takes only "
                         f"{' / '.join(t for t, k in SIGNAL_TYPES.items() if k == kind)} lines")
        return None
    if " " in sig or "\t" in sig:
        problems.add(ln, f"expected '<signal_type> <hash>' and nothing else, got {_shown(s)}")
        return None
    return _check_hash(sig, kind, ln, problems)


def _bare_line(s: str, kind: str, ln: int, problems: _Problems) -> str | None:
    """The hash of one non-blank line of a bare-hash file, or None (a problem recorded)."""
    if s.startswith("#"):
        problems.add(ln, "a bare-hash file has no comments (threatexchange would read the line as a signal)")
        return None
    if " " in s or "\t" in s:
        problems.add(ln, f"expected one hash and nothing else (a bare-hash file: its first line is a hash "
                         f"without a signal type), got {_shown(s)}")
        return None
    return _check_hash(s, kind, ln, problems)


def _parse_lines(text: str, kind: str, problems: _Problems, bare: bool) -> HashList:
    """A signal file (``<type> <hash>`` lines) or a bare-hash file, exact repeats dropped."""
    seen = _Seen()
    parse = _bare_line if bare else _signal_line
    for ln, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s:
            h = parse(s, kind, ln, problems)
            if h is not None:
                seen.add(HashEntry(h), ln, problems)
    return HashList(seen.entries, seen.duplicates, "bare" if bare else "signals")


def _csv_header(row: list[str], line: int, problems: _Problems) -> list[str] | None:
    """The lower-cased header, or None (problems recorded) when it is unusable."""
    header = [c.strip().lower() for c in row]
    bad = False
    for c in header:
        if c not in CSV_COLUMNS:
            problems.add(line, f"unknown CSV column {c!r} (known: {list(CSV_COLUMNS)})")
            bad = True
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        problems.add(line, f"duplicate CSV column(s) {dup}")
        bad = True
    if "hash" not in header:
        problems.add(line, "CSV header must name a 'hash' column")
        bad = True
    return None if bad else header


def _csv_entry_id(rec: dict[str, str], ln: int, problems: _Problems) -> tuple[str | None, bool]:
    """(entry_id or None, ok) of one record; an unprintable or overlong id is a problem."""
    eid = rec.get("entry_id", "").strip() or None
    if eid is None:
        return None, True
    if len(eid) > MAX_ENTRY_ID or not eid.isprintable():
        problems.add(ln, f"entry_id must be printable and at most {MAX_ENTRY_ID} characters")
        return eid, False
    return eid, True


def _csv_metadata(rec: dict[str, str], ln: int, problems: _Problems) -> tuple[str | None, bool]:
    """(canonical metadata JSON or None, ok) of one record: a JSON object or nothing."""
    meta_text = rec.get("metadata", "").strip()
    if not meta_text:
        return None, True
    try:
        obj = json.loads(meta_text)
    except json.JSONDecodeError as e:
        problems.add(ln, f"metadata is not valid JSON: {e.msg} at character {e.pos}")
        return None, False
    if not isinstance(obj, dict):
        problems.add(ln, f"metadata must be a JSON object, got {type(obj).__name__}")
        return None, False
    return canonical_metadata(obj), True


def _parse_csv(text: str, kind: str, problems: _Problems) -> HashList:
    seen = _Seen()
    rd = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    while True:
        start = rd.line_num + 1
        try:
            row = next(rd)
        except StopIteration:
            break
        except csv.Error as e:
            problems.add(start, f"CSV syntax: {e}")
            break
        # blank lines (possibly several before this record): the record starts where its text does
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = _csv_header(row, start, problems)
            if header is None:
                return HashList(format="csv")
            continue
        ln = start  # the record's first physical line (a quoted field may span several)
        if len(row) != len(header):
            problems.add(ln, f"expected {len(header)} field(s) ({', '.join(header)}), got {len(row)}")
            continue
        rec = dict(zip(header, row))
        h = _check_hash(rec["hash"].strip(), kind, ln, problems)
        eid, ok_id = _csv_entry_id(rec, ln, problems)
        meta, ok_meta = _csv_metadata(rec, ln, problems)
        if h is not None and ok_id and ok_meta:
            seen.add(HashEntry(h, eid, meta), ln, problems)
    if header is None:
        problems.add(1, "empty CSV: expected a header naming a 'hash' column")
    return HashList(seen.entries, seen.duplicates, "csv")


def parse_list(data: str | bytes, kind: str, path: str = "<list>", fmt: str = "auto",
               allow_empty: bool = False) -> HashList:
    """Parse and validate a list of ``kind`` (``pdq`` | ``md5``, the bank's signal type) in ``fmt``
    (``auto`` | ``signals`` | ``bare`` | ``csv``); entries in file order, exact repeats dropped and
    counted (:class:`HashList`). Raises :class:`HashListError` listing every problem with its line
    (an empty list is one, unless ``allow_empty``)."""
    _check_kind(kind)
    if fmt not in FORMATS:
        raise ValueError(f"list format must be one of {FORMATS}, got {fmt!r}")
    problems = _Problems()
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise HashListError(path, [(line, f"not UTF-8 text (byte {e.start}): a hash list is text")]) from None
    else:
        text = data[1:] if data.startswith("\ufeff") else data
    form = detect_format(text, path) if fmt == "auto" else fmt
    entries = _parse_csv(text, kind, problems) if form == "csv" else _parse_lines(text, kind, problems, form == "bare")
    if not entries and not problems.items and not allow_empty:
        problems.add(1, f"no {kind} hashes in the list")
    problems.raise_if_any(path)
    return entries


def read_list(uri: str, kind: str, fmt: str = "auto", allow_empty: bool = False) -> HashList:
    """Read a list file from a local path, ``file://`` or ``s3://`` URI (``split_uri`` /
    ``open_store``) and :func:`parse_list` it; errors name ``uri``. :class:`~pipeline.errors.MissingInput`
    when it does not exist."""
    _check_kind(kind)
    store, name = split_uri(uri)
    if not name or not store.exists(name):
        raise MissingInput(f"hash list not found: {uri}")
    return parse_list(store.read_bytes(name), kind, uri, fmt, allow_empty)


def _validated(entries: Iterable[HashEntry | str], kind: str) -> list[HashEntry]:
    _check_kind(kind)
    out = [e if isinstance(e, HashEntry) else HashEntry(str(e)) for e in entries]
    for i, e in enumerate(out):
        if not _HEX[kind].fullmatch(e.hash):
            raise ValueError(f"entry #{i}: not a {kind} hash: {e.hash!r}")
    return out


def format_signal_file(entries: Iterable[HashEntry | str], kind: str, signal_type: str | None = None) -> str:
    """The signal-file text of ``entries`` (or bare hex hashes): ``<type> <hash>\\n`` per entry,
    lower-case, in order, ``type`` ThreatExchange's name for ``kind`` (:data:`WRITE_TYPE`) unless
    given. Entry ids and metadata have no place in this format (use :func:`format_csv`).
    ValueError for a malformed hash."""
    _check_kind(kind)
    st = signal_type or WRITE_TYPE[kind]
    if SIGNAL_TYPES.get(str(st)) != kind:
        raise ValueError(f"signal type {st!r} does not name a {kind} hash")
    return "".join(f"{st} {e.hash.lower()}\n" for e in _validated(entries, kind))


def format_csv(entries: Sequence[HashEntry], kind: str) -> str:
    """The CSV text of ``entries`` (``hash,entry_id,metadata`` header; read back by
    :func:`parse_list` to the same entries)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for e in _validated(entries, kind):
        w.writerow([e.hash.lower(), e.entry_id or "", e.metadata or ""])
    return buf.getvalue()


def write_list(uri: str, entries: Sequence[HashEntry | str], kind: str, fmt: str = "signals") -> None:
    """Write ``entries`` to a local path or ``s3://`` URI in ``fmt`` (``signals`` | ``csv``);
    atomic for readers (:meth:`~pipeline.ingest.storage.Store.write_bytes`)."""
    if fmt not in ("signals", "csv"):
        raise ValueError(f"write format must be 'signals' or 'csv', got {fmt!r}")
    text = format_signal_file(entries, kind) if fmt == "signals" else format_csv(
        [e if isinstance(e, HashEntry) else HashEntry(str(e)) for e in entries], kind)
    store, name = split_uri(uri)
    store.write_text(name, text)
