"""The exception base of every user-facing failure, and its usage kind, at the bottom layer so
that ``models/`` can raise them too (imports run ``models`` <- ``pipeline`` <- ``jobs``; ``models``
imports neither).

Everyone else names them :class:`pipeline.errors.ModscanError` and
:class:`pipeline.errors.UsageError`, which are these classes re-exported: the CLI
(``jobs/cli.py``) prints the message on one line and exits with :attr:`~ModscanError.exit_code`.
"""

from __future__ import annotations


class ModscanError(Exception):
    """A failure the user can act on; ``str(e)`` is the whole message, on one line."""

    exit_code = 1


class UsageError(ModscanError):
    """A bad command line or configuration value (a date, a flag, a config key). Exit code 2."""

    exit_code = 2


class PathNotFound(UsageError, FileNotFoundError):
    """A folder or file a flag names is missing or holds nothing to use (``--model DIR`` without a
    model card, ``train --images DIR`` without images): a usage error (exit 2), and still a
    ``FileNotFoundError`` for code that catches one."""
