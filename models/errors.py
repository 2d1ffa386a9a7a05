"""The exception base of every user-facing failure, at the bottom layer so that ``models/`` can
raise it too (imports run ``models`` <- ``pipeline`` <- ``jobs``; ``models`` imports neither).

Everyone else names it :class:`pipeline.errors.ModscanError`, which is this class re-exported:
the CLI (``jobs/cli.py``) prints its message on one line and exits with :attr:`exit_code`.
"""

from __future__ import annotations


class ModscanError(Exception):
    """A failure the user can act on; ``str(e)`` is the whole message, on one line."""

    exit_code = 1
