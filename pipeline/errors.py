"""The one exception base for user-facing failures, and a message cleaner.

An operator reads one line: the CLI (``jobs/cli.py``) catches :class:`ModscanError`, prints its
message and exits with :attr:`ModscanError.exit_code` (2 for usage errors, 1 for runtime ones);
``--debug`` shows the traceback instead. Anything that is not a ``ModscanError`` is a bug.

Library code raises a subclass where a user can act on the message (a bad flag, a missing input,
a corrupted gallery, a commit refused); it never prints or exits itself.
"""

from __future__ import annotations

import re

# Defined at the bottom layer so that models/ raises it too (models/ may not import pipeline/);
# this is the name everyone uses.
from models.errors import ModscanError as ModscanError


class UsageError(ModscanError):
    """A bad command line or configuration value (a date, a flag, a config key). Exit code 2."""

    exit_code = 2


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
