"""`modscan hashes fetch` through threatexchange's local-file exchange (no network, no credentials)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from jobs.commands.hashes_cmd import add_parser, fetch_entries, parse_collab, write_fetched
from pipeline.errors import ModscanError, UsageError
from pipeline.signals.lists import HashEntry, format_signal_file, read_list

pytest.importorskip("threatexchange", reason="needs the optional 'exchange' extra (threatexchange)")

P1 = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
P2 = "d8f8f0cec0f4a84f0637022a278f67f0b36e2ed596621e1d33e6339c4e9c9b22"
M1 = "cab08b36195edb1a1231d2d09fa450e0"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="modscan")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    return ap


@pytest.fixture()
def program_file(tmp_path: Path) -> Path:
    p = tmp_path / "program.txt"
    # what a program's local export looks like to threatexchange: our writer's format, types mixed
    p.write_text(format_signal_file([P2, P1], "pdq") + format_signal_file([M1], "md5") + f"url https://example.org\npdq {P1[:-2]}\n")
    return p


def test_fetch_keeps_the_banks_kind_only(program_file: Path) -> None:
    assert fetch_entries("local_file", "pdq", {"filename": str(program_file)}) == [HashEntry(P2), HashEntry(P1)]
    assert fetch_entries("local_file", "md5", {"filename": str(program_file)}) == [HashEntry(M1)]


def test_cli_writes_a_list_the_job_reads(program_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lists" / "program-pdq.txt"
    a = _parser().parse_args(["hashes", "fetch", "--exchange", "local_file", "--kind", "pdq",
                              "--collab", f"filename={program_file}", "--out", str(out)])
    assert a.fn(a) == 0
    assert read_list(str(out), "pdq") == [HashEntry(P2), HashEntry(P1)]
    assert "2 pdq hash(es) from local_file" in capsys.readouterr().out
    a = _parser().parse_args(["hashes", "fetch", "--exchange", "local_file", "--kind", "md5", "--format", "csv",
                              "--collab", f"filename={program_file}", "--out", str(tmp_path / "m.csv")])
    assert a.fn(a) == 0
    assert read_list(str(tmp_path / "m.csv"), "md5") == [HashEntry(M1)]


def test_fetch_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown collaboration setting"):
        fetch_entries("local_file", "pdq", {"filename": "x", "colour": "red"})
    with pytest.raises(UsageError, match="unknown exchange"):
        fetch_entries("carrier_pigeon", "pdq", {})
    with pytest.raises(ModscanError, match="fetch failed"):
        fetch_entries("local_file", "pdq", {"filename": str(tmp_path / "absent.txt")})
    (tmp_path / "empty.txt").write_text("\n")
    a = _parser().parse_args(["hashes", "fetch", "--exchange", "local_file", "--kind", "pdq",
                              "--collab", f"filename={tmp_path / 'empty.txt'}", "--out", str(tmp_path / "o.txt")])
    with pytest.raises(ModscanError, match="no pdq signals"):
        a.fn(a)
    assert not (tmp_path / "o.txt").exists()
    assert write_fetched([], "pdq", str(tmp_path / "o.txt")) == 0 and (tmp_path / "o.txt").read_text() == ""


def test_parse_collab() -> None:
    assert parse_collab(["filename=/a b", "n=3", "ids=[1, 2]", "flag=true"]) == {"filename": "/a b", "n": 3, "ids": [1, 2], "flag": True}
    with pytest.raises(UsageError):
        parse_collab(["novalue"])
