"""jobs/runtime/run.py's chunked runs on real parts: a driver SIGKILLed mid-run and its rerun (local disk and
a moto S3 server), a run that failed and its rerun, a rerun after a gallery change.

The rerun must decode only the uploads of the chunks the killed run had not finished (counted by
the decode tasks themselves, in ``_run.json``'s ``resume``), and publish the partition an
uninterrupted run publishes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, driver_env, kill_driver_when, photo, upload_folder
from PIL import Image
from s3server import moto_server

from pipeline.moderation.resume import Chunks

DAY = "2026-08-01"
COMPARED = ["image_key", "status", "action", "reference_id", "coarse_score", "fine_score", "fine_score_raw"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, shipped_model_dir) -> str:
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "refs").mkdir()
    Image.fromarray(photo("rocket")).save(tmp / "refs" / "rocket.png")
    G.build(open_store(str(tmp / "gal"), create=True), [Bank("v", str(tmp / "refs"), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    return str(tmp / "gal")


def _config(tmp: Path, chunk_size: int, batch_size: int) -> Path:
    p = tmp / "job.toml"
    p.write_text(f"[job]\nchunk_size = {chunk_size}\nbatch_size = {batch_size}\nactors = 1\n")
    return p


def _kill_after_chunks(cmd: list[str], recorded: Callable[[], int], at_least: int, total: int) -> int:
    """Start the job's driver and SIGKILL it (its whole process group: the driver's local Ray
    too) once ``at_least`` chunks are recorded. -> chunks recorded when it was killed."""
    n = 0

    def ready() -> bool:
        nonlocal n
        n = recorded()
        return n >= at_least

    kill_driver_when(cmd, ready, timeout=300)
    assert at_least <= n < total, f"the driver was not killed mid-run ({n} of {total} chunks recorded)"
    return n


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("image_key").reset_index(drop=True)[COMPARED]


@pytest.mark.slow
def test_driver_killed_mid_run_the_rerun_decodes_only_the_chunks_not_done(gallery, ray_cluster, tmp_path) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    src = upload_folder(tmp_path / "up", 47)
    keys = sorted(p.name for p in src.iterdir())
    chunks = Chunks.of_keys(keys, 6)
    assert len(chunks) == 8
    reference = moderate(str(src), gallery, str(tmp_path / "ref"), DAY, cfg=JobConfig(batch_size=3, chunk_size=6),
                         review=False)
    assert reference["resume"]["chunks_done_before"] == 0 and reference["resume"]["images_decoded"] == 48
    out = tmp_path / "flags"
    cmd = [sys.executable, "-m", "jobs.cli", "moderate", "--input", str(src), "--gallery", gallery, "--output", str(out),
           "--date", DAY, "--config", str(_config(tmp_path, 6, 3))]
    _kill_after_chunks(cmd, lambda: len(list(out.glob("_staging/*/chunks/*.json"))), 3, len(chunks))
    done = {json.loads(p.read_text())["chunk"] for p in out.glob("_staging/*/chunks/*.json")}
    assert not (out / f"dt={DAY}").exists()  # the killed run published nothing
    r = subprocess.run(cmd, cwd=ROOT, env=driver_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / f"dt={DAY}" / "_run.json").read_text())
    res = info["resume"]
    assert (res["chunks_total"], res["chunks_done_before"], res["chunks_run"]) == (8, len(done), 8 - len(done))
    # the decode tasks of the rerun read exactly the uploads of the chunks the killed run had not finished
    assert res["images_decoded"] == sum(n for c, n in enumerate(chunks.counts) if c not in done) < 48
    assert f"resumed: {len(done)} of 8 chunks were done by" in r.stdout
    resumed = pd.read_parquet(out / f"dt={DAY}")
    assert len(resumed) == 48 and resumed["image_key"].is_unique
    assert set(resumed["run_id"]) == {info["run_id"], *res["resumed_runs"]} and len(res["resumed_runs"]) == 1
    pd.testing.assert_frame_equal(_sorted(resumed), _sorted(pd.read_parquet(tmp_path / "ref" / f"dt={DAY}")))
    sig = pd.read_parquet(out / "_signatures" / f"dt={DAY}")
    assert sig["image_key"].is_unique and set(sig["image_key"]) == set(resumed.loc[resumed.status.isin(["matched", "clean"]), "image_key"])
    assert not (out / "_staging").exists() and not (out / "_signatures" / "_staging").exists()


@pytest.mark.slow
def test_s3_driver_killed_mid_run_the_rerun_resumes(gallery, tmp_path) -> None:
    import boto3

    from pipeline.moderation.flags import read_flags

    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for b in ("resume-up", "resume-out"):
            s3.create_bucket(Bucket=b)
        for p in sorted(upload_folder(tmp_path / "up", 29).iterdir()):
            s3.put_object(Bucket="resume-up", Key=f"d/{p.name}", Body=p.read_bytes())
        cmd = [sys.executable, "-m", "jobs.cli", "moderate", "--input", "s3://resume-up/d/", "--gallery", gallery,
               "--output", "s3://resume-out/flags", "--date", DAY, "--config", str(_config(tmp_path, 5, 5))]

        def keys(prefix: str) -> list[str]:
            return [o["Key"] for o in s3.list_objects_v2(Bucket="resume-out", Prefix=prefix).get("Contents", [])]

        _kill_after_chunks(cmd, lambda: sum("/chunks/" in k for k in keys("flags/_staging/")), 2, 6)
        done = len([k for k in keys("flags/_staging/") if "/chunks/" in k])
        r = subprocess.run(cmd, cwd=ROOT, env=driver_env(), capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads(s3.get_object(Bucket="resume-out", Key=f"flags/dt={DAY}/_run.json")["Body"].read())
        res = info["resume"]
        assert (res["chunks_total"], res["chunks_done_before"]) == (6, done)
        assert res["images_decoded"] == 30 - 5 * done  # six chunks of 5 uploads
        df = read_flags("s3://resume-out/flags", DAY)
        assert len(df) == 30 and df["image_key"].is_unique
        assert df.set_index("image_key").loc["rocket.jpg", "action"] == "filter"
        assert not keys("flags/_staging/") and not keys("flags/_signatures/_staging/")


class _FailsOnRocket:
    """Builds a Moderator subclass (in the test, where the Moderator's import is allowed) that
    fails the run on the batch holding rocket.jpg: the last chunk of the sorted keys."""

    @staticmethod
    def cls() -> type:
        from pipeline.errors import ModscanError
        from pipeline.moderation.moderator import Moderator

        class FailsOnRocket(Moderator):
            def __call__(self, batch):
                if "rocket.jpg" in [str(k) for k in batch["image_key"]]:
                    raise ModscanError("injected failure on the last chunk")
                return super().__call__(batch)

        return FailsOnRocket


def test_a_failed_run_is_resumed_and_a_gallery_change_starts_over(gallery, ray_cluster, tmp_path) -> None:
    import shutil

    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate, summary
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.errors import ModscanError
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    src, out = upload_folder(tmp_path / "up", 23), str(tmp_path / "flags")
    cfg = JobConfig(batch_size=4, chunk_size=4, actors=1)
    with pytest.raises(ModscanError, match="injected failure on the last chunk"):
        moderate(str(src), gallery, out, DAY, cfg=cfg, review=False, moderator=_FailsOnRocket.cls())
    stage = next((tmp_path / "flags" / "_staging").iterdir())
    done = len(list((stage / "chunks").glob("*.json")))
    assert 1 <= done < 6  # the failed run still owns the date: its finished chunks are kept
    info = moderate(str(src), gallery, out, DAY, cfg=cfg, review=False)
    assert info["resume"]["chunks_done_before"] == done and info["resume"]["images_decoded"] == 24 - 4 * done
    assert info["counts"]["rows"] == 24
    # a killed run's chunks are resumed only against the gallery version they were decided with
    with pytest.raises(ModscanError):
        moderate(str(src), gallery, out, "2026-08-02", cfg=cfg, review=False, moderator=_FailsOnRocket.cls())
    gal = tmp_path / "gal2"
    shutil.copytree(gallery, gal)
    (tmp_path / "more").mkdir()
    Image.fromarray(photo("coffee")).save(tmp_path / "more" / "coffee.png")
    G.add(open_store(str(gal)), "v", G.list_source(str(tmp_path / "more")), read_card(None), local_extractor(None))
    again = moderate(str(src), str(gal), out, "2026-08-02", cfg=cfg, review=False)
    assert again["gallery_version"] == "v000002" and again["resume"]["chunks_done_before"] == 0
    assert again["resume"]["started_over"] == "the pinned gallery version changed (v000002, was v000001)"
    assert again["resume"]["images_decoded"] == 24
    assert "started over, not resumed: the pinned gallery version changed (v000002, was v000001)" in summary(again)
    assert not (tmp_path / "flags" / "_staging").exists()
