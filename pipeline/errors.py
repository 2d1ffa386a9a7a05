"""The one exception base for user-facing failures, and a message cleaner.

An operator reads one line: the CLI (``jobs/cli.py``) catches :class:`ModscanError`, prints its
message and exits with :attr:`ModscanError.exit_code` (2 for usage errors, 1 for runtime ones);
``--debug`` shows the traceback instead. Anything that is not a ``ModscanError`` is a bug.

Library code raises a subclass where a user can act on the message (a bad flag, a missing input,
a corrupted gallery, a commit refused); it never prints or exits itself.
"""

from __future__ import annotations

import re

# Defined at the bottom layer so that models/ raises them too (models/ may not import pipeline/);
# these are the names everyone uses. UsageError: a bad command line or configuration value, exit 2.
from models.errors import ModscanError as ModscanError
from models.errors import UsageError as UsageError


class ConfigFileError(UsageError):
    """All problems of one configuration file, each as ``file:line: message`` (bank files, job
    configs): a user fixes them all in one pass. Subclasses name the kind of file in ``what``."""

    what = "config file"

    def __init__(self, path: str, errors: list[tuple[int, str]]) -> None:
        self.path, self.errors = path, list(errors)
        lines = [f"{path}:{ln}: {msg}" for ln, msg in self.errors]
        super().__init__(f"{len(self.errors)} error(s) in {self.what}:\n" + "\n".join(lines))


def toml_error_line(e: Exception, default: int) -> int:
    """The line a ``tomllib.TOMLDecodeError`` names in its message (``default`` if none)."""
    m = re.search(r"line (\d+)", str(e))
    return int(m.group(1)) if m else default


def _toml_path(raw: str) -> str:
    return ".".join(p.strip().strip("\"'") for p in raw.split("."))


def toml_key_lines(text: str) -> dict[str, int]:
    """First line (1-based) of each table header and key of a TOML text, by dotted path (``"job"``,
    ``"job.decode"``, ``"job.decode.min_side"``), for :class:`ConfigFileError` messages. The n-th
    table of an array (``[[bank]]``) is also ``"bank[n]"``, with its keys (``"bank[n].name"``);
    ``"bank"`` and ``"bank.name"`` are the first ones. Knows ``[table]`` and ``[[array]]`` headers
    and bare, quoted and dotted keys; lines inside multi-line values that look like ``key = ...``
    may be taken for keys (only a line number can be off, never a value)."""
    where: dict[str, int] = {}
    tables: list[str] = [""]   # the current table, by each name it has: "bank" and "bank[2]"
    arrays: dict[str, int] = {}  # tables seen so far in each array
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        head = re.match(r"^(\[\[?)([^\[\]]+)\]\]?", s)
        key = re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", s)
        if head:
            name = _toml_path(head.group(2))
            tables = [name]
            if head.group(1) == "[[":
                arrays[name] = arrays.get(name, 0) + 1
                tables.append(f"{name}[{arrays[name] - 1}]")
            for t in tables:
                where.setdefault(t, i)
        elif key:
            for t in tables:
                parts = (t.split(".") if t else []) + _toml_path(key.group(1)).split(".")
                for n in range(1, len(parts) + 1):
                    where.setdefault(".".join(parts[:n]), i)
    return where


class InputError(ModscanError):
    """The job's input is missing, empty or malformed (a manifest with bad keys). Exit code 1."""


class MissingInput(InputError):
    """The input folder, S3 prefix, bucket or manifest does not exist (a backfill lists such days)."""


_REPR = re.compile(r"<(?:[\w.]+\.)?(\w+) object at 0x[0-9a-fA-F]+>")
_ADDR = re.compile(r"\s+at 0x[0-9a-fA-F]+")


def plain_message(e: BaseException | str, limit: int = 500) -> str:
    """``"TypeName: message"`` on one line, without object reprs (``<pkg.Cls object at 0x..>``
    becomes ``<Cls>``) and at most ``limit`` characters: safe for rows, pages and logs."""
    text = e if isinstance(e, str) else (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    text = _ADDR.sub("", _REPR.sub(r"<\1>", text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
