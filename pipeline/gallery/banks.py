"""Bank declarations: a TOML file validated with every error reported at its line.

Example (see ``configs/banks.example.toml``)::

    [[bank]]
    name = "violence"
    source = "s3://refs/violence/"      # or a local folder, relative to this file
    category = "sensitive/violence"
    action = "filter"                    # filter | downrank | allow
    fine_threshold = 0.72                # optional, default: the model card's
    enabled = true                       # optional

An ``allow`` bank is an allow-list of known false positives: when an upload matches it at least
as well as any blocking bank, no flag is written.

A bank's ``kind`` is ``"images"`` (the default: ``source`` is a folder or prefix of reference
images) or a hash list: ``"pdq"`` or ``"md5"``, whose ``source`` is one list file (local or S3;
:mod:`pipeline.signals.lists` formats). A ``pdq`` bank takes ``pdq_max_distance`` (Hamming,
0-256, default 31) and ``pdq_min_quality`` (0-100, default 50: a query hash of lower PDQ quality
is not matched against it); ``fine_threshold`` is for image banks only. Hash banks follow the
same rules as image banks (action, allow banks, enabled, flood guard)::

    [[bank]]
    name = "ncmec_pdq"
    kind = "pdq"
    source = "lists/ncmec.pdq.txt"
    category = "sensitive/csam"
    action = "filter"
    pdq_max_distance = 31
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigFileError, toml_error_line

ACTIONS = ("filter", "downrank", "allow")
KINDS = ("images", "pdq", "md5")
HASH_KINDS = ("pdq", "md5")
DEFAULT_PDQ_MAX_DISTANCE = 31   # = pipeline.signals.hashes.PDQ_MATCH_DISTANCE (HMA's default)
DEFAULT_PDQ_MIN_QUALITY = 50    # = pipeline.signals.hashes.PDQ_QUALITY_FLOOR (PDQ's authors')
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_KNOWN = {"name", "source", "category", "action", "fine_threshold", "enabled", "kind", "pdq_max_distance",
          "pdq_min_quality"}


@dataclass(frozen=True)
class Bank:
    name: str
    source: str
    category: str
    action: str
    fine_threshold: float | None = None
    enabled: bool = True
    kind: str = "images"
    pdq_max_distance: int = DEFAULT_PDQ_MAX_DISTANCE
    pdq_min_quality: int = DEFAULT_PDQ_MIN_QUALITY

    @property
    def is_hash(self) -> bool:
        return self.kind in HASH_KINDS

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record; an image bank's has exactly the keys it always had (so a gallery
        without hash banks writes the same manifest JSON as before they existed)."""
        d = {"name": self.name, "source": self.source, "category": self.category, "action": self.action,
             "fine_threshold": self.fine_threshold, "enabled": self.enabled}
        if self.is_hash:
            d["kind"] = self.kind
            if self.kind == "pdq":
                d.update(pdq_max_distance=self.pdq_max_distance, pdq_min_quality=self.pdq_min_quality)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bank:
        return cls(d["name"], d["source"], d["category"], d["action"], d.get("fine_threshold"),
                   bool(d.get("enabled", True)), d.get("kind", "images"),
                   int(d.get("pdq_max_distance", DEFAULT_PDQ_MAX_DISTANCE)),
                   int(d.get("pdq_min_quality", DEFAULT_PDQ_MIN_QUALITY)))


class BankFileError(ConfigFileError, ValueError):
    """All problems of a bank file, each as ``file:line: message``."""

    what = "bank file"


def _locate(text: str) -> list[tuple[int, dict[str, int]]]:
    """Line of each ``[[bank]]`` header and of each key inside it (1-based), from the one TOML
    line lookup that job configs use too."""
    from pipeline.errors import toml_key_lines

    where = toml_key_lines(text)
    blocks: list[tuple[int, dict[str, int]]] = []
    while (head := where.get(f"bank[{len(blocks)}]")) is not None:
        prefix = f"bank[{len(blocks)}]."
        blocks.append((head, {k[len(prefix):]: line for k, line in where.items() if k.startswith(prefix)}))
    return blocks


def _bank_errors(n: int, b: dict[str, Any], head: int, keys: dict[str, int], seen: dict[str, int]
                 ) -> list[tuple[int, str]]:
    """Every problem of the ``n``-th ``[[bank]]`` table ``b`` (header at line ``head``, its keys at
    ``keys``), in file order; a valid name is recorded in ``seen`` (name -> line)."""
    line = lambda k: keys.get(k, head)
    errors: list[tuple[int, str]] = []
    for k in sorted(set(b) - _KNOWN):
        errors.append((line(k), f"bank #{n + 1}: unknown key {k!r} (known: {sorted(_KNOWN)})"))
    for k in ("name", "source", "category", "action"):
        if k not in b:
            errors.append((head, f"bank #{n + 1}: missing required key {k!r}"))
        elif not isinstance(b[k], str) or not b[k].strip():
            errors.append((line(k), f"bank #{n + 1}: {k!r} must be a non-empty string"))
    name = b.get("name")
    if isinstance(name, str):
        if not _NAME.match(name):
            errors.append((line("name"), f"bank name {name!r} must match {_NAME.pattern}"))
        elif name in seen:
            errors.append((line("name"), f"duplicate bank name {name!r} (first at line {seen[name]})"))
        else:
            seen[name] = line("name")
    if isinstance(b.get("action"), str) and b["action"] not in ACTIONS:
        errors.append((line("action"), f"bank {name!r}: action {b['action']!r} must be one of {list(ACTIONS)}"))
    thr = b.get("fine_threshold")
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not -1.0 <= thr <= 1.0):
        errors.append((line("fine_threshold"), f"bank {name!r}: fine_threshold must be a number in [-1, 1], got {thr!r}"))
    if "enabled" in b and not isinstance(b["enabled"], bool):
        errors.append((line("enabled"), f"bank {name!r}: enabled must be true or false"))
    return errors + _kind_errors(b, name, line)


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _kind_errors(b: dict[str, Any], name: Any, line: Any) -> list[tuple[int, str]]:
    """Problems of a bank's ``kind`` and of the settings that belong to one kind only."""
    kind = b.get("kind", "images")
    if kind not in KINDS:
        return [(line("kind"), f"bank {name!r}: kind {kind!r} must be one of {list(KINDS)}")]
    errors: list[tuple[int, str]] = []
    if kind in HASH_KINDS and "fine_threshold" in b:
        errors.append((line("fine_threshold"), f"bank {name!r}: fine_threshold is for image banks, not kind {kind!r}"))
    for k, lo, hi in (("pdq_max_distance", 0, 256), ("pdq_min_quality", 0, 100)):
        if k not in b:
            continue
        if kind != "pdq":
            errors.append((line(k), f"bank {name!r}: {k} is for kind = \"pdq\" banks, not {kind!r}"))
        elif not _int_in(b[k], lo, hi):
            errors.append((line(k), f"bank {name!r}: {k} must be an integer in [{lo}, {hi}], got {b[k]!r}"))
    return errors


def parse_banks(text: str, path: str = "<banks>", base_dir: str | None = None) -> list[Bank]:
    """Parse and validate; raises :class:`BankFileError` listing every error with its line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BankFileError(path, [(toml_error_line(e, 0), f"TOML syntax: {e}")]) from None
    errors: list[tuple[int, str]] = []
    top_unknown = set(doc) - {"bank"}
    for k in sorted(top_unknown):
        errors.append((1, f"unknown top-level key {k!r} (expected [[bank]] tables)"))
    raw = doc.get("bank", [])
    if not isinstance(raw, list) or not raw:
        errors.append((1, "no [[bank]] tables declared"))
        raise BankFileError(path, errors)
    where = _locate(text)
    banks: list[Bank] = []
    seen: dict[str, int] = {}
    for n, b in enumerate(raw):
        head, keys = where[n] if n < len(where) else (0, {})
        bank_errors = _bank_errors(n, b, head, keys, seen)
        errors += bank_errors
        if bank_errors:
            continue
        src, thr = b["source"], b.get("fine_threshold")
        if base_dir and not src.startswith("s3://") and not os.path.isabs(src):
            src = os.path.normpath(os.path.join(base_dir, src))
        banks.append(Bank(b["name"], src, b["category"], b["action"],
                          float(thr) if thr is not None else None, b.get("enabled", True), b.get("kind", "images"),
                          b.get("pdq_max_distance", DEFAULT_PDQ_MAX_DISTANCE),
                          b.get("pdq_min_quality", DEFAULT_PDQ_MIN_QUALITY)))
    if errors:
        raise BankFileError(path, errors)
    return banks


def load_banks(path: str | os.PathLike[str]) -> list[Bank]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"bank file not found: {p}")
    return parse_banks(p.read_text(), str(p), base_dir=str(p.resolve().parent))
