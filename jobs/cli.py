"""``modscan``: one command line with sub-commands.

Each module of :mod:`jobs.commands` registers its sub-command (or group of them) with
``add_parser(subparsers)``, which sets ``fn`` to the function that runs it; this module holds only
the list of those modules, the global ``--debug`` option and :func:`main` (error handling and exit
codes). Ray and the optional extras (threatexchange, moto, ...) are imported inside the function
that runs a command, so a missing one only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol


class Command(Protocol):
    """A module of :mod:`jobs.commands`: registers its sub-parser(s), each with ``set_defaults(fn=...)``."""

    def add_parser(self, sub: argparse._SubParsersAction, /) -> None: ...


def commands() -> tuple[Command, ...]:
    """The command modules, in the order ``modscan --help`` lists their sub-commands."""
    from jobs.commands import (
        bench_cmd,
        card_cmd,
        demo,
        evaluate_cmd,
        gallery_cmd,
        gpu_check,
        hashes_cmd,
        lookup_cmd,
        moderate_cmd,
        retro_cmd,
        review_cmd,
        train_cmd,
        waves_cmd,
    )

    return (train_cmd, card_cmd, gallery_cmd, moderate_cmd, demo, evaluate_cmd, bench_cmd, lookup_cmd, review_cmd,
            gpu_check, retro_cmd, hashes_cmd, waves_cmd)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="modscan", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for command in commands():
        command.add_parser(sub)
    return ap


def _add_debug(p: argparse.ArgumentParser, top: bool) -> None:
    """``--debug`` on every (sub-)command; a sub-command's flag never resets the top-level one."""
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show the full traceback of a failure (also MODSCAN_DEBUG=1)")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _add_debug(sp, False)


class _CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record is emitted: a caller that
    runs ``main`` in-process (a test capturing output) may swap the stream and close the old one,
    and a handler holding the old one would fail every later record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run a command. A :class:`~pipeline.errors.ModscanError` prints one line and exits with its
    code (2 usage, 1 runtime); any other exception is a bug or an infrastructure failure: one line
    too, exit 1. ``--debug`` (or ``MODSCAN_DEBUG=1``) shows the traceback instead."""
    from pipeline.errors import ModscanError, plain_message

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ap = build_parser()
    _add_debug(ap, True)
    a = ap.parse_args(argv)
    debug = bool(a.debug) or os.environ.get("MODSCAN_DEBUG", "") not in ("", "0")
    if debug:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    fn: Callable[[argparse.Namespace], int] = a.fn
    prog = f"modscan {a.cmd}"
    try:
        return int(fn(a) or 0)
    except ModscanError as e:
        if debug:
            raise
        print(f"{prog}: error: {plain_message(str(e), 4000)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        from pipeline.ingest.storage import redact

        print(f"{prog}: unexpected error: {redact(plain_message(e, 2000))} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
