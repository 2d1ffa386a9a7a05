"""jobs/cli.py: every sub-command comes from a module of jobs/commands/ through its ``add_parser``,
runs a function of that module (or, under ``bench``, of its benchmark module), and answers ``--help``
without importing the heavy libraries (those load when a command runs)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli

COMMANDS_DIR = Path(cli.__file__).resolve().parent / "commands"
ROOT = Path(cli.__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "ray", "pandas", "pyarrow", "cv2")


def leaves(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(sub-command path, its parser) of every runnable sub-command."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, p)]
    return [leaf for name, sp in subs[0].choices.items() for leaf in leaves(sp, (*path, name))]


def test_every_command_module_is_listed_once() -> None:
    listed = [m.__name__ for m in cli.commands()]
    on_disk = {f"jobs.commands.{p.stem}" for p in COMMANDS_DIR.glob("*.py") if p.stem != "__init__"}
    assert len(listed) == len(set(listed)) and set(listed) == on_disk


def test_every_sub_command_runs_a_function_of_its_own_module() -> None:
    found = leaves(cli.build_parser())
    assert {path[0] for path, _ in found} >= {"moderate", "nightly", "hourly", "backfill", "gallery", "card", "bench"}
    for path, p in found:
        fn = p.get_default("fn")
        assert callable(fn), path
        expected = "jobs.bench." if path[0] == "bench" else "jobs.commands."
        assert fn.__module__.startswith(expected), (path, fn.__module__)


def test_help_of_every_sub_command(capsys: pytest.CaptureFixture) -> None:
    paths = [()] + sorted({path[:k] for path, _ in leaves(cli.build_parser()) for k in range(1, len(path) + 1)})
    for path in paths:
        with pytest.raises(SystemExit) as e:
            cli.main([*path, "--help"])
        assert e.value.code == 0, path
        assert capsys.readouterr().out.startswith(f"usage: {' '.join(('modscan', *path))}"), path


def test_building_the_parser_imports_no_heavy_library() -> None:
    """``modscan --help`` is instant: the parser of every command (and of every benchmark) is built,
    and the top-level help printed, in a fresh interpreter without importing any of :data:`HEAVY`."""
    code = ("import contextlib, io, sys\n"
            "from jobs.cli import build_parser, main\n"
            "build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"building the parser imported: {r.stdout.strip()}"


def test_parser_constants_agree_with_their_sources() -> None:
    """A parser's choices kept in its command module (so that building it imports nothing heavy)
    are those of the module they come from."""
    from jobs.commands import hashes_cmd
    from pipeline.signals.lists import KINDS

    assert hashes_cmd.KINDS == KINDS
    fetch = next(p for path, p in leaves(cli.build_parser()) if path == ("hashes", "fetch"))
    assert [tuple(a.choices or ()) for a in fetch._actions if "--kind" in a.option_strings] == [KINDS]
