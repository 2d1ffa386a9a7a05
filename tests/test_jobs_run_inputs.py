"""jobs/run.py and the CLI on their inputs (with pipeline/ingest/plan.py): nothing silently lost,
nothing read that shouldn't be: inputs, dates, manifests,
pinned gallery versions and operator errors.

Checks that need no cluster call the CLI in-process (or as a subprocess, where the exact output
an operator sees matters) and must fail before Ray starts. The rest run the real job on a local
Ray cluster and read the committed Parquet back with pandas.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import ROOT, photo
from PIL import Image
from s3server import moto_server

from pipeline.evaluation.samples import procedural
from pipeline.moderation.moderator import Moderator

pytestmark = pytest.mark.slow

DAY = "2026-02-05"


def _jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    procedural(random.Random(seed), (160, 120)).save(path, format="JPEG", quality=85)
    return path


def _rocket(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo("rocket")).save(path, format="JPEG", quality=90)
    return path


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``modscan ARGV`` in-process -> (exit code, stdout, stderr)."""
    from jobs.cli import main

    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A gallery of one bank holding the rocket photo (entry id 0)."""
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("inputs-gallery")
    _rocket(tmp / "refs" / "rocket.jpg")
    G.build(open_store(str(tmp / "gal"), create=True), [Bank("v", str(tmp / "refs"), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    return str(tmp / "gal")




# --------------------------------------------------------------------------------------------
# Dates (finding 5)
# --------------------------------------------------------------------------------------------
def test_one_strict_date_validator_names_the_flag(capsys, tmp_path, gallery) -> None:
    from pipeline.errors import UsageError
    from pipeline.moderation.flags import partition_key, valid_date

    assert valid_date("2026-02-05") == "2026-02-05" and partition_key("2028-02-29") == "dt=2028-02-29"
    for bad in ("20260205", "2026-W05-4", "2026-02-30", "2026-2-5", "2026-02-05T00:00", " 2026-02-05", "2026-02-05\n",
                "\u0662\u0660\u0662\u0666-02-05"):  # Arabic-Indic digits match \d, not a date
        with pytest.raises(UsageError, match="--date"):
            valid_date(bad, "--date")
    up = tmp_path / "up"
    _jpeg(up / "a.jpg")
    out = tmp_path / "flags"
    common = ["--gallery", gallery, "--output", str(out)]
    for argv, flag in ((["moderate", "--input", str(up), "--date", "20260205"], "--date"),
                       (["nightly", "--input-template", str(up) + "/{date}", "--date", "2026-W05-4"], "--date"),
                       (["backfill", "--input-template", str(up) + "/{date}", "--from", "2026-02-01",
                         "--to", "2026-02-30"], "--to"),
                       (["backfill", "--input-template", str(up) + "/{date}", "--from", "2026-02-1",
                         "--to", "2026-02-03"], "--from")):
        rc, _, err = _cli(capsys, *argv, *common)
        line = _one_line(err)
        assert rc == 2 and flag in line and ("YYYY-MM-DD" in line or "calendar date" in line), line
    assert not out.exists()  # no dt=20260205 partition beside dt=2026-02-05, not even the root


# --------------------------------------------------------------------------------------------
# Input existence and empty inputs (finding 1)
# --------------------------------------------------------------------------------------------
def test_missing_input_exits_1_with_one_line_and_no_partition(tmp_path, gallery) -> None:
    """What an operator sees: a separate process, exit 1, one line on stderr, nothing written."""
    out = tmp_path / "flags"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "moderate", "--input", str(tmp_path / "2026-02-05"),
                        "--gallery", gallery, "--output", str(out), "--date", DAY],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "does not exist" in _one_line(r.stderr) and r.stdout == ""
    assert not out.exists()


def test_missing_s3_bucket_or_prefix_fails_before_ray(capsys, tmp_path, gallery) -> None:
    import boto3

    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="up-in")
        s3.create_bucket(Bucket="flags-out")
        s3.put_object(Bucket="up-in", Key="2026-02-04/a.jpg", Body=b"x")
        for inp, want in (("s3://no-such-bucket/2026-02-05/", "bucket s3://no-such-bucket does not exist"),
                          (f"s3://up-in/{DAY}/", "does not exist")):
            rc, _, err = _cli(capsys, "moderate", "--input", inp, "--gallery", gallery, "--output", "s3://flags-out/f",
                              "--date", DAY)
            assert rc == 1 and want in _one_line(err), err
        rc, _, err = _cli(capsys, "moderate", "--input", "s3://up-in/2026-02-04/", "--gallery", gallery,
                          "--output", "s3://no-out-bucket/f", "--date", DAY)
        assert rc == 1 and "output bucket s3://no-out-bucket does not exist" in _one_line(err)
        assert "Contents" not in s3.list_objects_v2(Bucket="flags-out")


def test_empty_input_fails_unless_allowed_and_the_readme_reader_works(capsys, tmp_path, gallery) -> None:
    up = tmp_path / "up"
    up.mkdir()
    (up / "_SUCCESS").write_text("")  # an upstream job's marker: listed, but nothing to moderate
    out = tmp_path / "flags"
    args = ["moderate", "--input", str(up), "--gallery", gallery, "--output", str(out), "--date", DAY]
    rc, _, err = _cli(capsys, *args)
    line = _one_line(err)
    assert rc == 1 and "nothing to moderate" in line and "--allow-empty" in line and '"marker": 1' in line
    assert not (out / f"dt={DAY}").exists()

    rc, stdout, err = _cli(capsys, *args, "--allow-empty")
    assert rc == 0, err
    assert (out / f"dt={DAY}" / "_SUCCESS").exists() and "listed but given no row" in stdout
    run = json.loads((out / f"dt={DAY}" / "_run.json").read_text())
    assert run["inputs"] == 0 and run["counts"]["rows"] == 0 and run["skipped"] == {"marker": 1}
    # the README's reader example, verbatim, on a day with no rows
    flags = pd.read_parquet(str(out), filters=[("dt", "=", DAY)])
    hide = set(flags.loc[flags.action == "filter", "image_key"])
    demote = set(flags.loc[flags.action == "downrank", "image_key"])
    assert flags.empty and hide == set() and demote == set()

    cfg = tmp_path / "job.toml"
    cfg.write_text("[job]\nallow_empty_input = true\n")
    rc, _, err = _cli(capsys, *args, "--config", str(cfg))
    assert rc == 0, err


# --------------------------------------------------------------------------------------------
# Manifests (findings 2 and 4)
# --------------------------------------------------------------------------------------------
def test_manifest_keys_are_strings_and_bad_lines_are_numbered(capsys, tmp_path, gallery) -> None:
    from pipeline.errors import InputError
    from pipeline.ingest.plan import read_manifest_keys

    m = tmp_path / "numeric.csv"
    m.write_text("key\n100075\n100076\n007\n")
    assert read_manifest_keys(str(m)) == ["100075", "100076", "007"]
    pq_m = tmp_path / "ints.parquet"
    pd.DataFrame({"key": [100075, 7]}).to_parquet(pq_m)
    assert read_manifest_keys(str(pq_m)) == ["100075", "7"]

    bad = tmp_path / "bad.csv"
    bad.write_text("key,note\na.jpg,x\n,blank\n  ,spaces\nb.jpg ,padded\na.jpg,again\n\nc.jpg,ok\n")
    with pytest.raises(InputError) as e:
        read_manifest_keys(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and "5 bad keys" in msg
    assert "blank key at lines 3, 4, 7" in msg and "whitespace at line 5" in msg and "duplicate of line 2 at line 6" in msg
    nulls = tmp_path / "nulls.parquet"
    pd.DataFrame({"key": ["a.jpg", None, "b.jpg", ""]}).to_parquet(nulls)
    with pytest.raises(InputError, match=r"blank key at rows 2, 4"):
        read_manifest_keys(str(nulls))

    out = tmp_path / "flags"
    rc, _, err = _cli(capsys, "moderate", "--input", str(bad), "--gallery", gallery, "--output", str(out), "--date", DAY)
    assert rc == 1 and "blank key at lines 3, 4, 7" in _one_line(err) and not out.exists()


def test_key_policy(tmp_path) -> None:
    from jobs.job_config import JobConfig
    from pipeline.errors import UsageError
    from pipeline.ingest.storage import ForbiddenKey, KeyPolicy

    base, allowed = tmp_path / "m", tmp_path / "allowed"
    base.mkdir()
    allowed.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    (base / "link.jpg").symlink_to(outside)
    pol = KeyPolicy.for_manifest(str(base / "m.csv"), [str(allowed)])
    real = os.path.realpath
    assert pol.resolve("a.jpg") == real(base / "a.jpg") and pol.resolve("s/007") == real(base / "s" / "007")
    assert pol.resolve(str(allowed / "x.jpg")) == real(allowed / "x.jpg")
    assert pol.resolve("file://" + str(allowed / "x.jpg")) == real(allowed / "x.jpg")
    for key in ("../outside.jpg", "s/../../outside.jpg", "s/../a.jpg", str(outside), "file://" + str(outside),
                "link.jpg", "/etc/hostname", str(allowed) + "/../outside.jpg", str(allowed) + "-other/x.jpg",
                "s3://bucket/x.jpg", "http://example.com/x.jpg"):
        with pytest.raises(ForbiddenKey):
            pol.resolve(key)

    s3 = KeyPolicy.for_manifest("s3://b/manifests/m.parquet", ["s3://b/uploads/"])
    assert s3.resolve("d/x.jpg") == "s3://b/manifests/d/x.jpg"
    assert s3.resolve("s3://b/uploads/d/x.jpg") == "s3://b/uploads/d/x.jpg"
    assert s3.resolve("s3://b/manifests/x.jpg") == "s3://b/manifests/x.jpg"
    for key in ("s3://b/uploads2/x.jpg", "s3://b/uploads/../secrets/x", "s3://b/uploads//x", "/etc/hostname",
                "../x.jpg", "s3://other/uploads/x.jpg"):
        with pytest.raises(ForbiddenKey):
            s3.resolve(key)
    for prefix in ("relative/dir", "http://x/y", "s3://b/../c"):
        with pytest.raises(UsageError, match="allowed input prefix"):
            JobConfig(allowed_input_prefixes=(prefix,))


# --------------------------------------------------------------------------------------------
# Clean operator errors (finding 7)
# --------------------------------------------------------------------------------------------
def test_config_values_are_checked_before_ray(capsys, tmp_path, gallery) -> None:
    up = tmp_path / "up"
    _jpeg(up / "a.jpg")
    out = tmp_path / "flags"
    for text, want in (('[job]\nbatch_size = "64"\n', "job.toml:2: [job] batch_size must be an integer"),
                       ("[job]\nactors = -1\n", "job.toml:2: [job] actors must be an integer >= 0"),
                       ("[job]\nbatchsize = 64\n", "job.toml:2: [job] unknown key 'batchsize'"),
                       ('[job]\ntest_fail_keys = ["a.jpg"]\n', "job.toml:2: [job] unknown key 'test_fail_keys'"),
                       ("[job]\ncoarse_threshold = 3.0\n", "job.toml:2: [job] coarse_threshold must be a cosine"),
                       ("[job.decode]\nmax_pixel = 5\n", "job.toml:2: [job.decode] unknown key 'max_pixel'"),
                       ("[job.decode]\nhigh_res = 224\n", "job.toml:2: [job.decode] high_res cannot be set"),
                       ("[job\n", "job.toml:1: TOML syntax")):
        cfg = tmp_path / "job.toml"
        cfg.write_text(text)
        rc, _, err = _cli(capsys, "moderate", "--input", str(up), "--gallery", gallery, "--output", str(out),
                          "--date", DAY, "--config", str(cfg))
        assert rc == 2 and want in _one_line(err), (text, err)
    rc, _, err = _cli(capsys, "moderate", "--input", str(up), "--gallery", gallery, "--output", str(out),
                      "--date", DAY, "--config", str(tmp_path / "missing.toml"))
    assert rc == 2 and "no such file" in _one_line(err)
    assert not out.exists()


def test_corrupted_gallery_output_file_and_debug(capsys, tmp_path, gallery) -> None:
    from pipeline.errors import ModscanError

    gal = tmp_path / "gal"
    shutil.copytree(gallery, gal)
    rc, stdout, err = _cli(capsys, "gallery", "info", str(gal), "--verify")
    assert rc == 0 and json.loads(stdout)["verify"]["problems"] == [], err
    shard = next((gal / "versions" / "v000001").glob("shard-001.rerank.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, stdout, err = _cli(capsys, "gallery", "info", str(gal))
    assert rc == 0  # plain info reads the manifest only
    rc, stdout, err = _cli(capsys, "gallery", "info", str(gal), "--verify")
    line = _one_line(err)
    assert rc == 1 and "shard-001.rerank.safetensors" in line and "1 of 6 files fail verification" in line
    assert [p["file"] for p in json.loads(stdout)["verify"]["problems"]] == ["shard-001.rerank.safetensors"]

    up = tmp_path / "up"
    _jpeg(up / "a.jpg")
    out = tmp_path / "flags"
    args = ["moderate", "--input", str(up), "--output", str(out), "--date", DAY]
    rc, _, err = _cli(capsys, *args, "--gallery", str(gal))
    assert rc == 1 and "fail verification" in _one_line(err) and not out.exists()
    with pytest.raises(ModscanError, match="fail verification"):
        _cli(capsys, *args, "--gallery", str(gal), "--debug")  # --debug: the exception, traceback and all

    afile = tmp_path / "a-file"
    afile.write_text("")
    rc, _, err = _cli(capsys, "moderate", "--input", str(up), "--gallery", gallery, "--output", str(afile), "--date", DAY)
    assert rc == 1 and "is a file, not a folder" in _one_line(err)
    # a model folder without a card is the user's mistake: one line, exit 2
    rc, _, err = _cli(capsys, "card", "--model", str(tmp_path / "no-model"))
    assert rc == 2 and "no model card" in _one_line(err)


def test_bomb_message_names_the_configured_max_pixels() -> None:
    """Pillow's own bomb check fires before ours for huge headers; the row must still say which
    limit the operator configured."""
    import struct
    import zlib

    from pipeline.ingest.decode import DecodeConfig, Decoder

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 90000, 90000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    for max_pixels in (1_000_000, 64_000_000):
        row = Decoder(DecodeConfig(max_pixels=max_pixels)).decode_one(bomb)
        assert row["error_code"] == "decompression_bomb" and f"max_pixels={max_pixels}" in row["error_message"]


# --------------------------------------------------------------------------------------------
# On a real Ray cluster: every object a row, pinned version, internal errors (3, 6, 8)
# --------------------------------------------------------------------------------------------
class FailingModerator(Moderator):
    """The job's Moderator, failing inside its search on a batch that holds ``boom.jpg``: fault
    injection through ``execute_run(moderator=...)``."""

    def search_rows(self, batch: dict[str, Any], rows: Any) -> Any:
        if "boom.jpg" in {str(k) for k in batch["image_key"]}:
            raise RuntimeError(f"fault injected for a key of this batch in {self!r}")
        return super().search_rows(batch, rows)


DAY_KEYS = ["_DSC0001.JPG", ".hidden.jpg", "sub/_x.jpg", "100075.jpg", "boom.jpg", "rocket.jpg",
            "img-0.jpg", "img-1.jpg", "img-2.jpg"]


@pytest.fixture(scope="module")
def day_run(gallery, ray_cluster, tmp_path_factory):
    """One day with camera names, hidden names and markers; a new gallery version is published
    between the driver's resolve and the actors' start; one batch fails inside the Moderator."""
    from ray import cloudpickle

    from jobs.job_config import JobConfig
    from jobs.run import execute_run, prepare_run
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("day")
    gal = tmp / "gal"
    shutil.copytree(gallery, gal)
    up = tmp / "up"
    for i, k in enumerate(DAY_KEYS):
        if k == "rocket.jpg":
            _rocket(up / k)
        else:
            _jpeg(up / k, i)
    (up / "_SUCCESS").write_text("")
    (up / "_run.json").write_text("{}")
    out = tmp / "flags"
    plan = prepare_run(str(up), str(gal), str(out), DAY, cfg=JobConfig(batch_size=1))
    assert plan.gallery_version == "v000001"
    # publish v2 without the rocket: actors starting now must still load v1
    v2, _ = G.remove(open_store(str(gal)), read_card(None), ids=[0])
    assert v2 == "v000002" == G.current_version(open_store(str(gal)))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests
    try:
        info = execute_run(plan, review=True, moderator=FailingModerator)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return {"info": info, "out": out, "gal": gal,
            "df": pd.read_parquet(out / f"dt={DAY}").set_index("image_key")}


def test_every_listed_object_gets_a_row_except_markers(day_run) -> None:
    from jobs.run import summary

    df, info = day_run["df"], day_run["info"]
    assert sorted(df.index) == sorted(DAY_KEYS) and df.index.is_unique
    for k in ("_DSC0001.JPG", ".hidden.jpg", "sub/_x.jpg", "100075.jpg"):
        assert df.loc[k, "status"] == "clean", (k, df.loc[k].to_dict())
    run = json.loads((day_run["out"] / f"dt={DAY}" / "_run.json").read_text())
    assert run["inputs"] == len(DAY_KEYS) == run["counts"]["rows"]
    assert run["skipped"] == {"marker": 2} and sorted(run["skipped_examples"]["marker"]) == ["_SUCCESS", "_run.json"]
    assert '{"marker": 2}' in summary(info)


def test_gallery_version_is_pinned_for_actors_and_review(day_run) -> None:
    df, info = day_run["df"], day_run["info"]
    assert info["gallery_version"] == "v000001"
    assert set(df["gallery_version"]) == {"v000001"}  # although CURRENT was v000002 before any actor started
    assert (df.loc["rocket.jpg", "status"], df.loc["rocket.jpg", "reference_id"]) == ("matched", 0)  # v2 has no rocket
    page = Path(info["review"]).read_text()
    assert "gallery <code>v000001</code>" in page
    assert "ref #0<" in page and not re.search(r"ref #\d+\.\d", page)  # integer reference ids


def test_a_moderator_exception_becomes_internal_error_rows(day_run) -> None:
    df, info = day_run["df"], day_run["info"]
    row = df.loc["boom.jpg"]
    assert (row["status"], row["error_code"], row["action"]) == ("error", "internal_error", "none")
    assert "fault injected" in row["error_message"] and "object at 0x" not in row["error_message"]
    assert re.search(r" in <\w+>$", row["error_message"])  # the object repr the injected fault carries, cleaned
    assert info["counts"]["by_error_code"] == {"internal_error": 1}  # batch_size 1: only that upload
    assert (day_run["out"] / f"dt={DAY}" / "_SUCCESS").exists()
    page = Path(info["review"]).read_text()
    assert "fault injected" in page and "object at 0x" not in page


def test_a_modscan_error_raised_in_an_actor_reaches_the_cli_as_its_own_line(capsys, ray_cluster, gallery,
                                                                             tmp_path) -> None:
    """Without ``verify_gallery`` the driver reads the manifest only, so a corrupted shard is found
    by the Moderator actors while they load it (in ``__init__``). The operator reads that error
    (recovered from Ray's exception, not its traceback text), on one line, exit 1; nothing is
    committed."""
    gal = tmp_path / "gal"
    shutil.copytree(gallery, gal)
    shard = gal / "versions" / "v000001" / "shard-001.rerank.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "job.toml").write_text("[job]\nverify_gallery = false\n")
    up, out = tmp_path / "up", tmp_path / "flags"
    _jpeg(up / "a.jpg")
    rc, _, err = _cli(capsys, "moderate", "--input", str(up), "--gallery", str(gal), "--output", str(out),
                      "--date", DAY, "--config", str(tmp_path / "job.toml"))
    (line,) = [ln for ln in err.splitlines() if ln.startswith("modscan moderate:")]  # Ray may log above it
    assert rc == 1, err[-3000:]
    assert line.startswith("modscan moderate: error: checksum mismatch for ") and "shard-001.rerank.safetensors" in line
    assert line.endswith("refusing to load)"), line  # the error's own message: no Ray traceback or retry advice
    assert not (out / f"dt={DAY}").exists() and not list((out / "_staging").glob("**/data/*"))


def test_manifest_rows_forbidden_keys_are_never_read(ray_cluster, gallery, tmp_path) -> None:
    from jobs.job_config import JobConfig
    from jobs.run import moderate

    m, allowed, other = tmp_path / "m", tmp_path / "allowed", tmp_path / "other"
    for p, seed in ((m / "007.jpg", 1), (m / "sub" / "a.jpg", 2), (m / "100075", 3), (allowed / "b.jpg", 4),
                    (other / "c.jpg", 5), (tmp_path / "outside.jpg", 6)):
        _jpeg(p, seed)
    (m / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    readable = ["007.jpg", "sub/a.jpg", "100075", str(allowed / "b.jpg")]
    forbidden = ["../outside.jpg", str(tmp_path / "outside.jpg"), str(other / "c.jpg"), "link.jpg", "/etc/hostname",
                 "s3://elsewhere/x.jpg"]
    keys = readable + forbidden + ["sub/missing.jpg"]
    (m / "manifest.csv").write_text("key\n" + "\n".join(keys) + "\n")
    out = tmp_path / "flags"
    info = moderate(str(m / "manifest.csv"), gallery, str(out), DAY,
                    cfg=JobConfig(batch_size=8, allowed_input_prefixes=(str(allowed),)), review=False)
    df = pd.read_parquet(out / f"dt={DAY}").set_index("image_key")
    assert sorted(df.index) == sorted(keys) and info["inputs"] == len(keys)
    for k in readable:
        assert df.loc[k, "status"] == "clean", (k, df.loc[k].to_dict())
    for k in forbidden:
        r = df.loc[k]
        assert (r["status"], r["error_code"]) == ("error", "forbidden_key"), (k, r.to_dict())
        assert pd.isna(r["image_sha256"]) and r["gallery_version"] == "v000001"  # never read
    assert df.loc["sub/missing.jpg", "error_code"] == "read_error"
    assert info["counts"]["by_error_code"] == {"forbidden_key": len(forbidden), "read_error": 1}


def test_backfill_never_commits_a_missing_day_and_exits_non_zero(capsys, ray_cluster, gallery, tmp_path) -> None:
    src, out = tmp_path / "uploads", tmp_path / "flags"
    _jpeg(src / "2026-02-01" / "a.jpg", 1)
    args = ["backfill", "--input-template", str(src) + "/{date}", "--gallery", gallery, "--output", str(out),
            "--from", "2026-02-01", "--to", "2026-02-02", "--batch-size", "8"]
    rc, stdout, err = _cli(capsys, *args)
    assert rc == 1 and "2026-02-02: missing: input folder" in stdout and "2026-02-01: done" in stdout
    assert "1 day(s) with missing input (2026-02-02)" in _one_line(err)
    assert (out / "dt=2026-02-01" / "_SUCCESS").exists() and not (out / "dt=2026-02-02").exists()
    _jpeg(src / "2026-02-02" / "b.jpg", 2)  # the uploads land late: the rerun moderates them
    rc, stdout, err = _cli(capsys, *args)
    assert rc == 0, err
    assert "2026-02-01: skipped (committed)" in stdout and "2026-02-02: done" in stdout
    df = pd.read_parquet(out)
    assert sorted(df["image_key"]) == ["a.jpg", "b.jpg"]
