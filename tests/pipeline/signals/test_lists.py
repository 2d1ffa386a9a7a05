"""Hash lists: ThreatExchange's signal file, bare-hash files and CSV, every problem at its line, all
at once; exact duplicates dropped and counted, conflicting ones refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigFileError, MissingInput
from pipeline.signals.lists import (
    MAX_REPORTED,
    HashEntry,
    HashList,
    HashListError,
    detect_format,
    format_csv,
    format_signal_file,
    parse_list,
    read_list,
    write_list,
)

P1 = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
P2 = "f8f8f0cee0f4a84f06370a2a038f63f0b36e26d596621e1d33e6b39c4e9c9b22"
P3 = "d8f8f0cec0f4a84f0637022a278f67f0b36e2ed596621e1d33e6339c4e9c9b22"
M1 = "cab08b36195edb1a1231d2d09fa450e0"
M2 = "d41d8cd98f00b204e9800998ecf8427e"


def errors_of(text: str | bytes, kind: str, path: str = "list.txt", fmt: str = "auto") -> list[tuple[int, str]]:
    with pytest.raises(HashListError) as ei:
        parse_list(text, kind, path, fmt)
    return ei.value.errors


def te_file_reader(text: str) -> dict[tuple[str, str], None]:
    """ThreatExchange's LocalFileSignalExchangeAPI.fetch_iter (exchanges/impl/file_api.py) line loop, as written
    there (signal_type None): what `threatexchange` takes out of a signal file."""
    updates = {}
    for line in text.splitlines(keepends=True):
        signal_type = None
        signal = line.strip()
        if signal_type is None:
            signal_type, _, signal = signal.partition(" ")
        if signal_type and signal:
            updates[signal_type, signal] = None
    return updates


# ---------------------------------------------------------------------------------------------
# signal files
# ---------------------------------------------------------------------------------------------
def test_signal_file_reads_in_order_with_blank_lines_crlf_bom_and_case() -> None:
    text = f"\ufeffpdq {P1}\r\n\r\n   \npdq {P2.upper()}\r\nPDQ {P3}\n"
    assert parse_list(text, "pdq") == [HashEntry(P1), HashEntry(P2), HashEntry(P3)]
    assert parse_list(text.encode("utf-8"), "pdq") == [HashEntry(P1), HashEntry(P2), HashEntry(P3)]


def test_md5_list_takes_threatexchange_video_md5_and_md5() -> None:
    assert parse_list(f"video_md5 {M1}\nmd5 {M2.upper()}\n", "md5") == [HashEntry(M1), HashEntry(M2)]


def test_malformed_signal_file_reports_every_problem_at_its_line() -> None:
    text = "\n".join([
        f"pdq {P1}",                 # 1 ok
        f"pdq {P1[:-1]}",            # 2 63 digits
        f"pdq {P2[:-1]}z",           # 3 not hex
        f"pdq {P1}",                 # 4 exact duplicate of line 1: dropped, counted
        f"photo_hash {P2}",          # 5 unknown type
        f"video_md5 {M1}",           # 6 md5 in a pdq bank
        "# exported 2024-01-01",     # 7 comment: not in the format
        "pdq",                       # 8 no hash
        f"pdq {P2} extra",           # 9 trailing field
        f"url {P3}",                 # 10 a ThreatExchange type modscan does not match
        f"pdq {P1.upper()}",         # 11 exact duplicate after case folding: dropped, counted
        f"pdq {P3}",                 # 12 ok
        P2,                          # 13 a bare hash among typed lines
    ])
    errs = errors_of(text, "pdq", "s3://lists/ncmec.txt")
    assert [ln for ln, _ in errs] == [2, 3, 5, 6, 7, 8, 9, 10, 13]
    msg = dict(errs)
    assert "64 hex digits, got 63" in msg[2]
    assert "64 hex digits" in msg[3]
    assert "a bare hash" in msg[13]
    assert "unknown signal type 'photo_hash'" in msg[5]
    assert "md5" in msg[6] and "pdq bank takes only pdq" in msg[6]
    assert "no comments" in msg[7]
    assert "<signal_type> <hash>" in msg[8]
    assert "nothing else" in msg[9]
    assert "'url' is not an image hash" in msg[10]
    with pytest.raises(ConfigFileError) as ei:
        parse_list(text, "pdq", "s3://lists/ncmec.txt")
    e = ei.value
    assert e.exit_code == 2
    assert "9 error(s) in hash list" in str(e)
    assert "s3://lists/ncmec.txt:2: PDQ hash must be 64 hex digits" in str(e)
    assert str(e).count("\ns3://lists/ncmec.txt:") == 9


def test_a_pdq_line_in_an_md5_list_is_refused() -> None:
    errs = errors_of(f"video_md5 {M1}\npdq {P1}\nvideo_md5 {M1[:-2]}\n", "md5")
    assert [ln for ln, _ in errs] == [2, 3]
    assert "md5 bank takes only" in errs[0][1] and "32 hex digits" in errs[1][1]


def test_our_comments_rule_matches_what_threatexchange_would_read() -> None:
    # A '#' line would be a signal of type '#' to threatexchange: the two readers would disagree.
    assert ("#", "note") in te_file_reader("# note\n")


def test_empty_lists_and_non_utf8() -> None:
    assert errors_of("\n\n", "pdq") == [(1, "no pdq hashes in the list")]
    assert parse_list("\n", "pdq", allow_empty=True) == []
    errs = errors_of(f"pdq {P1}\npdq \xff\n".encode("latin-1"), "pdq")
    assert errs[0][0] == 2 and "UTF-8" in errs[0][1]


def test_reported_problems_are_capped_but_counted() -> None:
    text = "\n".join(f"pdq {i:063x}" for i in range(MAX_REPORTED + 50))
    errs = errors_of(text, "pdq")
    assert len(errs) == MAX_REPORTED + 1
    assert errs[-1] == (MAX_REPORTED + 50, "... and 50 more problem(s) not listed")


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
def test_csv_with_entry_ids_and_metadata() -> None:
    text = ("hash,entry_id,metadata\n"
            f'{P1},ncmec-1,"{{""program"": ""ncmec"", ""labels"": [""A1""]}}"\n'
            f"{P2},,\n"
            f'{P3.upper()},ncmec-3,"{{}}"\n')
    got = parse_list(text, "pdq", "list.csv")
    assert got[0] == HashEntry(P1, "ncmec-1", '{"labels":["A1"],"program":"ncmec"}')
    assert got[0].meta() == {"program": "ncmec", "labels": ["A1"]}
    assert got[1] == HashEntry(P2, None, None) and got[1].meta() is None
    assert got[2] == HashEntry(P3, "ncmec-3", "{}")


def test_csv_columns_are_optional_and_in_any_order() -> None:
    assert parse_list(f"entry_id,hash\nx,{M1}\n", "md5", "l.csv") == [HashEntry(M1, "x")]
    assert parse_list(f"hash\n{M1}\n{M2}\n", "md5", "l.csv") == [HashEntry(M1), HashEntry(M2)]


def test_malformed_csv_reports_every_problem_at_its_line() -> None:
    text = "\n".join([
        "hash,entry_id,metadata",     # 1
        f"{P1},a,",                   # 2 ok
        f"{P1},b,",                   # 3 the hash of line 2 with another entry id: a conflict
        f"{P2},a,",                   # 4 the entry id of line 2 on another hash: a conflict
        f"{P3},c,{{not json",         # 5 bad JSON
        f'{P3[:-2]}00,d,"[1, 2]"',    # 6 JSON, but not an object
        f"{P2[:-1]},e,",              # 7 short hash
        f"{P2},f",                    # 8 missing field
        "",                           # 9 blank: skipped
        f'{"0" * 64},g,"{{""multi"":', # 10 a quoted field spanning lines 10-11
        '""line""}"',                 # 11
        f"{P2}x,h,",                  # 12 after the multi-line record: the line numbers still hold
    ])
    errs = errors_of(text, "pdq", "l.csv")
    assert [ln for ln, _ in errs] == [3, 4, 5, 6, 7, 8, 12]
    msg = dict(errs)
    assert f"duplicate hash {P1} with another entry_id than at line 2" in msg[3]
    assert f"duplicate entry_id 'a' (first at line 2, with hash {P1})" in msg[4]
    assert "not valid JSON" in msg[5]
    assert "must be a JSON object, got list" in msg[6]
    assert "64 hex digits, got 63" in msg[7]
    assert "expected 3 field(s)" in msg[8]
    assert "64 hex digits, got 65" in msg[12]


def test_csv_header_problems() -> None:
    errs = errors_of(f"hash,entryid\n{P1},x\n", "pdq", "l.csv")
    assert errs == [(1, "unknown CSV column 'entryid' (known: ['hash', 'entry_id', 'metadata'])")]
    errs = errors_of("entry_id,metadata\nx,{}\n", "pdq", "l.csv")
    assert errs == [(1, "CSV header must name a 'hash' column")]
    errs = errors_of(f"\n\nhash,hash\n{P1},{P1}\n", "pdq", "l.csv")
    assert errs == [(3, "duplicate CSV column(s) ['hash']")]
    assert errors_of("", "pdq", "l.csv") == [(1, "empty CSV: expected a header naming a 'hash' column")]


def test_format_detection() -> None:
    assert detect_format(f"pdq {P1}\n") == "signals"
    assert detect_format(f"\nhash,entry_id\n{P1},x\n") == "csv"
    assert detect_format(f"pdq {P1}\n", "x.CSV") == "csv"
    assert detect_format("") == "signals"
    assert detect_format(f"\n{P1.upper()}\r\n") == "bare" and detect_format(f"{M1}\n") == "bare"
    assert detect_format("pdq\n") == "signals"
    # explicit format wins: a signal file read as CSV fails on its header
    assert errors_of(f"pdq {P1}\n", "pdq", fmt="csv")[0][1].startswith("unknown CSV column")
    with pytest.raises(ValueError):
        parse_list(f"pdq {P1}\n", "pdq", fmt="xml")
    with pytest.raises(ValueError):
        parse_list(f"pdq {P1}\n", "sha1")


# ---------------------------------------------------------------------------------------------
# duplicates and bare-hash files
# ---------------------------------------------------------------------------------------------
def test_exact_duplicate_lines_are_dropped_and_counted_in_every_format() -> None:
    sig = parse_list(f"pdq {P1}\npdq {P2}\nPDQ {P1.upper()}\npdq {P1}\n", "pdq")
    assert isinstance(sig, HashList) and sig == [HashEntry(P1), HashEntry(P2)]
    assert (sig.duplicates, sig.format) == (2, "signals")
    bare = parse_list(f"{M1}\n{M2}\n\n{M1.upper()}\n", "md5")
    assert bare == [HashEntry(M1), HashEntry(M2)] and (bare.duplicates, bare.format) == (1, "bare")
    # CSV: the same hash, id and metadata (as JSON: key order and spacing do not count) is a repeat
    csv_text = ("hash,entry_id,metadata\n"
                f'{P1},n-1,"{{""a"": 1, ""b"": [2]}}"\n'
                f"{P2},,\n"
                f'{P1.upper()},n-1,"{{""b"":[2],""a"":1}}"\n'
                f"{P2},,\n")
    got = parse_list(csv_text, "pdq", "l.csv")
    assert got == [HashEntry(P1, "n-1", '{"a":1,"b":[2]}'), HashEntry(P2)]
    assert (got.duplicates, got.format) == (2, "csv")
    assert parse_list(f"pdq {P1}\n", "pdq").duplicates == 0


def test_conflicting_duplicates_are_refused_with_both_lines() -> None:
    text = "\n".join([
        "hash,entry_id,metadata",     # 1
        f'{P1},n-1,"{{""a"": 1}}"',   # 2
        f'{P1},n-1,"{{""a"": 2}}"',   # 3 same hash and id, other metadata
        f"{P1},n-9,",                 # 4 same hash, other id and metadata
        f"{P2},n-1,",                 # 5 the id of line 2 on another hash
        f'{P1},n-1,"{{""a"": 1}}"',   # 6 an exact repeat of line 2: not a problem
    ])
    errs = errors_of(text, "pdq", "l.csv")
    assert [ln for ln, _ in errs] == [3, 4, 5]
    msg = dict(errs)
    assert f"duplicate hash {P1} with another metadata than at line 2" in msg[3]
    assert f"duplicate hash {P1} with another entry_id and metadata than at line 2" in msg[4]
    assert f"duplicate entry_id 'n-1' (first at line 2, with hash {P1})" in msg[5]


def test_a_program_scale_list_with_repeated_lines_is_read() -> None:
    """Every third line a repeat of an earlier one: 150,000 lines, 100,000 entries kept, in order."""
    hs = [f"{i:064x}" for i in range(100_000)]
    lines = [f"pdq {h}" for h in hs]
    for i in range(0, 100_000, 2):
        lines.insert(i + i // 2 + 1, f"pdq {hs[i // 2]}")
    got = parse_list("\n".join(lines), "pdq")
    assert len(lines) == 150_000 and len(got) == 100_000 and got.duplicates == 50_000
    assert [e.hash for e in got] == hs


def test_bare_hash_files_read_as_threatexchange_does_with_a_signal_type() -> None:
    text = f"{P1}\r\n\n {P2.upper()} \n{P3}\n"
    got = parse_list(text, "pdq", "ncmec.txt")
    assert got == [HashEntry(P1), HashEntry(P2), HashEntry(P3)] and got.format == "bare"
    # threatexchange's file reader with `signal_type` set takes each stripped line as the signal
    te = {("pdq", line.strip()) for line in text.splitlines() if line.strip()}
    assert {("pdq", e.hash) for e in got} == {(t, h.lower()) for t, h in te}
    assert parse_list(f"{M1}\n{M2}\n", "md5") == [HashEntry(M1), HashEntry(M2)]


def test_bare_hash_file_problems_at_their_lines() -> None:
    text = "\n".join([
        P1,                # 1 ok: the file is bare
        f"pdq {P2}",       # 2 a typed line in a bare file
        M1,                # 3 an MD5 in a pdq bank's list
        P3[:-1],           # 4 63 digits
        "# note",          # 5 no comments
        P3,                # 6 ok
    ])
    errs = errors_of(text, "pdq", "ncmec.txt")
    assert [ln for ln, _ in errs] == [2, 3, 4, 5]
    msg = dict(errs)
    assert "expected one hash and nothing else" in msg[2]
    assert "an md5 hash? this list is for a kind = 'pdq' bank" in msg[3]
    assert "64 hex digits, got 63" in msg[4]
    assert "no comments" in msg[5]
    assert [ln for ln, _ in errors_of(f"pdq {P1}\n", "pdq", fmt="bare")] == [1]
    assert "a bare hash" in errors_of(f"{P1}\n", "pdq", fmt="signals")[0][1]


# ---------------------------------------------------------------------------------------------
# writing, round trips, sources
# ---------------------------------------------------------------------------------------------
def test_signal_file_writer_round_trips_and_threatexchange_reads_it() -> None:
    text = format_signal_file([HashEntry(P1), P2.upper(), HashEntry(P3, "id", "{}")], "pdq")
    assert text == f"pdq {P1}\npdq {P2}\npdq {P3}\n"
    assert [e.hash for e in parse_list(text, "pdq")] == [P1, P2, P3]
    assert set(te_file_reader(text)) == {("pdq", P1), ("pdq", P2), ("pdq", P3)}
    md5 = format_signal_file([M1, M2], "md5")
    assert md5 == f"video_md5 {M1}\nvideo_md5 {M2}\n"  # ThreatExchange's name for file MD5s
    assert set(te_file_reader(md5)) == {("video_md5", M1), ("video_md5", M2)}
    assert format_signal_file([], "pdq") == ""
    with pytest.raises(ValueError):
        format_signal_file([M1], "pdq")
    with pytest.raises(ValueError):
        format_signal_file([P1], "pdq", signal_type="video_md5")


def test_csv_writer_round_trips() -> None:
    entries = [HashEntry(P1, "a,b", '{"k":"v, \\"quoted\\""}'), HashEntry(P2), HashEntry(P3, "c")]
    text = format_csv(entries, "pdq")
    assert parse_list(text, "pdq") == entries


def test_read_and_write_local(tmp_path: Path) -> None:
    write_list(str(tmp_path / "sub" / "pdq.txt"), [HashEntry(P1), HashEntry(P2)], "pdq")
    assert (tmp_path / "sub" / "pdq.txt").read_text() == f"pdq {P1}\npdq {P2}\n"
    assert read_list(str(tmp_path / "sub" / "pdq.txt"), "pdq") == [HashEntry(P1), HashEntry(P2)]
    write_list(f"file://{tmp_path}/l.csv", [HashEntry(M1, "x", json.dumps({"a": 1}))], "md5", fmt="csv")
    assert read_list(str(tmp_path / "l.csv"), "md5") == [HashEntry(M1, "x", '{"a":1}')]  # canonical JSON
    with pytest.raises(MissingInput):
        read_list(str(tmp_path / "absent.txt"), "pdq")
    (tmp_path / "bad.txt").write_text(f"pdq {P1}\npdq nope\n")
    with pytest.raises(HashListError, match=r"bad\.txt:2: PDQ hash"):
        read_list(str(tmp_path / "bad.txt"), "pdq")


def test_read_and_write_s3(s3_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="lists")
    s3.put_object(Bucket="lists", Key="programs/ncmec.csv", Body=f"hash,entry_id\n{P1},n1\n{P2},n2\n".encode())
    assert read_list("s3://lists/programs/ncmec.csv", "pdq") == [HashEntry(P1, "n1"), HashEntry(P2, "n2")]
    write_list("s3://lists/out/pdq.txt", [HashEntry(P3)], "pdq")
    assert s3.get_object(Bucket="lists", Key="out/pdq.txt")["Body"].read() == f"pdq {P3}\n".encode()
    s3.put_object(Bucket="lists", Key="bad.txt", Body=f"pdq {P1}\nmd5 {M1}\n".encode())
    with pytest.raises(HashListError, match=r"s3://lists/bad\.txt:2: a md5 signal"):
        read_list("s3://lists/bad.txt", "pdq")
    with pytest.raises(MissingInput):
        read_list("s3://lists/nothing.txt", "pdq")
