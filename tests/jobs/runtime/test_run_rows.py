"""jobs/runtime/run.py on a real local Ray cluster, on its inputs: every listed object a row (markers
excepted), the gallery version pinned for actors and the review page, a Moderator exception as
internal_error rows, a ModscanError from an actor as its own line, forbidden manifest keys never read,
a backfill over a missing day (committed Parquet read back with pandas). The checks that fail before
Ray starts: test_run_inputs.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import one_line, photo, procedural_jpeg, rocket_gallery, run_cli, save_jpeg

from pipeline.moderation.moderator import Moderator

DAY = "2026-02-05"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A gallery of one bank holding the rocket photo (entry id 0)."""
    return rocket_gallery(tmp_path_factory.mktemp("inputs-gallery"))


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

    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import execute_run, prepare_run
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("day")
    gal = tmp / "gal"
    shutil.copytree(gallery, gal)
    up = tmp / "up"
    for i, k in enumerate(DAY_KEYS):
        if k == "rocket.jpg":
            save_jpeg(photo("rocket"), up / k, quality=90)
        else:
            procedural_jpeg(up / k, i)
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
    from jobs.runtime.run import summary

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
    procedural_jpeg(up / "a.jpg")
    rc, _, err = run_cli(capsys, "moderate", "--input", str(up), "--gallery", str(gal), "--output", str(out),
                      "--date", DAY, "--config", str(tmp_path / "job.toml"))
    (line,) = [ln for ln in err.splitlines() if ln.startswith("modscan moderate:")]  # Ray may log above it
    assert rc == 1, err[-3000:]
    assert line.startswith("modscan moderate: error: checksum mismatch for ") and "shard-001.rerank.safetensors" in line
    assert line.endswith("refusing to load)"), line  # the error's own message: no Ray traceback or retry advice
    assert not (out / f"dt={DAY}").exists() and not list((out / "_staging").glob("**/data/*"))


def test_manifest_rows_forbidden_keys_are_never_read(ray_cluster, gallery, tmp_path) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    m, allowed, other = tmp_path / "m", tmp_path / "allowed", tmp_path / "other"
    for p, seed in ((m / "007.jpg", 1), (m / "sub" / "a.jpg", 2), (m / "100075", 3), (allowed / "b.jpg", 4),
                    (other / "c.jpg", 5), (tmp_path / "outside.jpg", 6)):
        procedural_jpeg(p, seed)
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
    procedural_jpeg(src / "2026-02-01" / "a.jpg", 1)
    args = ["backfill", "--input-template", str(src) + "/{date}", "--gallery", gallery, "--output", str(out),
            "--from", "2026-02-01", "--to", "2026-02-02", "--batch-size", "8"]
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 1 and "2026-02-02: missing: input folder" in stdout and "2026-02-01: done" in stdout
    assert "1 day(s) with missing input (2026-02-02)" in one_line(err)
    assert (out / "dt=2026-02-01" / "_SUCCESS").exists() and not (out / "dt=2026-02-02").exists()
    procedural_jpeg(src / "2026-02-02" / "b.jpg", 2)  # the uploads land late: the rerun moderates them
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert "2026-02-01: skipped (committed)" in stdout and "2026-02-02: done" in stdout
    df = pd.read_parquet(out)
    assert sorted(df["image_key"]) == ["a.jpg", "b.jpg"]
