"""jobs/cli.py: every sub-command comes from a module of jobs/commands/ through its ``add_parser``,
runs a function of that module (or, under ``bench``, of its benchmark module), and answers ``--help``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from jobs import cli

COMMANDS_DIR = Path(cli.__file__).resolve().parent / "commands"


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
