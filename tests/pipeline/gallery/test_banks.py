"""pipeline/gallery/banks.py: bank files, their errors at their lines, relative sources."""

from __future__ import annotations

import textwrap

import pytest
from conftest import ROOT

from pipeline.gallery.banks import BankFileError, load_banks, parse_banks


def test_bank_file_errors_are_reported_with_their_lines() -> None:
    text = textwrap.dedent("""\
        [[bank]]
        name = "violence"
        source = "s3://refs/violence/"
        category = "sensitive/violence"
        action = "filter"

        [[bank]]
        name = "violence"
        source = "refs/spam"
        category = "low_quality/spam"
        action = "delete"
        fine_threshold = 7
        colour = "red"

        [[bank]]
        name = "Bad Name"
        category = "x"
        action = "allow"
        enabled = "yes"
        """)
    with pytest.raises(BankFileError) as e:
        parse_banks(text, "banks.toml")
    msg = str(e.value)
    assert "banks.toml:8: duplicate bank name 'violence' (first at line 2)" in msg
    assert "banks.toml:11:" in msg and "'delete'" in msg
    assert "banks.toml:12:" in msg and "fine_threshold" in msg
    assert "banks.toml:13: bank #2: unknown key 'colour'" in msg
    assert "banks.toml:15: bank #3: missing required key 'source'" in msg
    assert "banks.toml:16:" in msg and "Bad Name" in msg
    assert "banks.toml:19:" in msg and "enabled" in msg
    with pytest.raises(BankFileError, match=r"banks.toml:2: TOML syntax"):
        parse_banks('[[bank]]\nname = "x\n', "banks.toml")


def test_relative_sources_resolve_against_the_bank_file(tmp_path) -> None:
    from pipeline.gallery.banks import load_banks

    p = tmp_path / "conf" / "banks.toml"
    p.parent.mkdir()
    p.write_text('[[bank]]\nname = "a"\nsource = "../refs"\ncategory = "c"\naction = "downrank"\n')
    assert load_banks(p)[0].source == str(tmp_path / "refs")


def _write(tmp_path, text: str, name: str = "job.toml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def test_the_shipped_bank_example_parses() -> None:
    path = ROOT / "configs" / "banks.example.toml"
    banks = load_banks(path)
    assert [(b.name, b.action, b.fine_threshold, b.enabled) for b in banks] == [
        ("violence", "filter", 0.80, True), ("spam_templates", "downrank", None, True),
        ("known_false_positives", "allow", None, True)]
    assert banks[0].source == "s3://moderation-refs/violence/" and banks[2].category == "allow/known_false_positive"


_BAD_ACTION_BANK = """
        [[bank]]
        name = "ok"
        source = "refs"
        category = "sensitive/x"
        action = "block"
        """


def test_bank_file_errors_name_file_and_line(tmp_path) -> None:
    path = _write(tmp_path, _BAD_ACTION_BANK, "banks.toml")
    with pytest.raises(BankFileError) as e:
        load_banks(path)
    assert str(e.value).splitlines()[1:] == [f"{path}:5: bank 'ok': action 'block' must be one of "
                                             "['filter', 'downrank', 'allow']"]


def test_bad_bank_file_through_the_cli_is_a_usage_error(tmp_path, capsys) -> None:
    """A bad bank file is the user's to fix: exit 2 and the FILE:LINE message, not 'unexpected error'."""
    from jobs.cli import main

    path = _write(tmp_path, _BAD_ACTION_BANK, "banks.toml")
    rc = main(["gallery", "build", "--banks", str(path), "--out", str(tmp_path / "gallery")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:5: bank 'ok': action 'block'" in err and "unexpected" not in err
