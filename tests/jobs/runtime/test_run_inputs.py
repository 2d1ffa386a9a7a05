"""jobs/runtime/run.py and the CLI on their inputs, before Ray starts (with pipeline/ingest/plan.py): nothing
silently lost, nothing read that shouldn't be: dates, missing and empty inputs, manifests and the key
policy, and operator errors (config values, a corrupted gallery, an output that is a file, --debug).

The CLI runs in-process (or as a subprocess, where the exact output an operator sees matters); every
case must fail before Ray starts. The same inputs on a real Ray cluster: test_run_rows.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT, driver_env, one_line, procedural_jpeg, rocket_gallery, run_cli
from s3server import moto_server

DAY = "2026-02-05"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A gallery of one bank holding the rocket photo (entry id 0)."""
    return rocket_gallery(tmp_path_factory.mktemp("inputs-gallery"))


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
    procedural_jpeg(up / "a.jpg")
    out = tmp_path / "flags"
    common = ["--gallery", gallery, "--output", str(out)]
    for argv, flag in ((["moderate", "--input", str(up), "--date", "20260205"], "--date"),
                       (["nightly", "--input-template", str(up) + "/{date}", "--date", "2026-W05-4"], "--date"),
                       (["backfill", "--input-template", str(up) + "/{date}", "--from", "2026-02-01",
                         "--to", "2026-02-30"], "--to"),
                       (["backfill", "--input-template", str(up) + "/{date}", "--from", "2026-02-1",
                         "--to", "2026-02-03"], "--from")):
        rc, _, err = run_cli(capsys, *argv, *common)
        line = one_line(err)
        assert rc == 2 and flag in line and ("YYYY-MM-DD" in line or "calendar date" in line), line
    assert not out.exists()  # no dt=20260205 partition beside dt=2026-02-05, not even the root


# --------------------------------------------------------------------------------------------
# Input existence and empty inputs (finding 1)
# --------------------------------------------------------------------------------------------
def test_missing_input_exits_1_with_one_line_and_no_partition(tmp_path, gallery) -> None:
    """What an operator sees: a separate process, exit 1, one line on stderr, nothing written."""
    out = tmp_path / "flags"
    env = {**driver_env(), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "moderate", "--input", str(tmp_path / "2026-02-05"),
                        "--gallery", gallery, "--output", str(out), "--date", DAY],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "does not exist" in one_line(r.stderr) and r.stdout == ""
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
            rc, _, err = run_cli(capsys, "moderate", "--input", inp, "--gallery", gallery, "--output", "s3://flags-out/f",
                              "--date", DAY)
            assert rc == 1 and want in one_line(err), err
        rc, _, err = run_cli(capsys, "moderate", "--input", "s3://up-in/2026-02-04/", "--gallery", gallery,
                          "--output", "s3://no-out-bucket/f", "--date", DAY)
        assert rc == 1 and "output bucket s3://no-out-bucket does not exist" in one_line(err)
        assert "Contents" not in s3.list_objects_v2(Bucket="flags-out")


def test_empty_input_fails_unless_allowed_and_the_readme_reader_works(capsys, tmp_path, gallery) -> None:
    up = tmp_path / "up"
    up.mkdir()
    (up / "_SUCCESS").write_text("")  # an upstream job's marker: listed, but nothing to moderate
    out = tmp_path / "flags"
    args = ["moderate", "--input", str(up), "--gallery", gallery, "--output", str(out), "--date", DAY]
    rc, _, err = run_cli(capsys, *args)
    line = one_line(err)
    assert rc == 1 and "nothing to moderate" in line and "--allow-empty" in line and '"marker": 1' in line
    assert not (out / f"dt={DAY}").exists()

    rc, stdout, err = run_cli(capsys, *args, "--allow-empty")
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
    rc, _, err = run_cli(capsys, *args, "--config", str(cfg))
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
    rc, _, err = run_cli(capsys, "moderate", "--input", str(bad), "--gallery", gallery, "--output", str(out), "--date", DAY)
    assert rc == 1 and "blank key at lines 3, 4, 7" in one_line(err) and not out.exists()


def test_key_policy(tmp_path) -> None:
    from jobs.runtime.job_config import JobConfig
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
    procedural_jpeg(up / "a.jpg")
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
        rc, _, err = run_cli(capsys, "moderate", "--input", str(up), "--gallery", gallery, "--output", str(out),
                          "--date", DAY, "--config", str(cfg))
        assert rc == 2 and want in one_line(err), (text, err)
    rc, _, err = run_cli(capsys, "moderate", "--input", str(up), "--gallery", gallery, "--output", str(out),
                      "--date", DAY, "--config", str(tmp_path / "missing.toml"))
    assert rc == 2 and "no such file" in one_line(err)
    assert not out.exists()


def test_corrupted_gallery_output_file_and_debug(capsys, tmp_path, gallery) -> None:
    from pipeline.errors import ModscanError

    gal = tmp_path / "gal"
    shutil.copytree(gallery, gal)
    rc, stdout, err = run_cli(capsys, "gallery", "info", str(gal), "--verify")
    assert rc == 0 and json.loads(stdout)["verify"]["problems"] == [], err
    shard = next((gal / "versions" / "v000001").glob("shard-001.rerank.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, stdout, err = run_cli(capsys, "gallery", "info", str(gal))
    assert rc == 0  # plain info reads the manifest only
    rc, stdout, err = run_cli(capsys, "gallery", "info", str(gal), "--verify")
    line = one_line(err)
    assert rc == 1 and "shard-001.rerank.safetensors" in line and "1 of 6 files fail verification" in line
    assert [p["file"] for p in json.loads(stdout)["verify"]["problems"]] == ["shard-001.rerank.safetensors"]

    up = tmp_path / "up"
    procedural_jpeg(up / "a.jpg")
    out = tmp_path / "flags"
    args = ["moderate", "--input", str(up), "--output", str(out), "--date", DAY]
    rc, _, err = run_cli(capsys, *args, "--gallery", str(gal))
    assert rc == 1 and "fail verification" in one_line(err) and not out.exists()
    with pytest.raises(ModscanError, match="fail verification"):
        run_cli(capsys, *args, "--gallery", str(gal), "--debug")  # --debug: the exception, traceback and all

    afile = tmp_path / "a-file"
    afile.write_text("")
    rc, _, err = run_cli(capsys, "moderate", "--input", str(up), "--gallery", gallery, "--output", str(afile), "--date", DAY)
    assert rc == 1 and "is a file, not a folder" in one_line(err)
    # a model folder without a card is the user's mistake: one line, exit 2
    rc, _, err = run_cli(capsys, "card", "--model", str(tmp_path / "no-model"))
    assert rc == 2 and "no model card" in one_line(err)


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
