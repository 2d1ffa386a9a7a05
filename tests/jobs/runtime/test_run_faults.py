"""jobs/runtime/run.py under faults on real parts: a killed actor, a flaky S3 endpoint (reads and writes), a killed driver,
two concurrent runs of one date, a node lost mid-job."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, driver_env, kill_driver_when, photo, restart_ray, upload_folder
from flaky_proxy import FlakyProxy
from PIL import Image
from s3server import moto_server


@pytest.fixture(scope="module")
def local_gallery(tmp_path_factory, shipped_model_dir):
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("faults")
    refs = tmp / "refs"
    refs.mkdir()
    Image.fromarray(photo("rocket")).save(refs / "rocket.png")
    G.build(open_store(str(tmp / "gal"), create=True), [Bank("v", str(refs), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    return str(tmp / "gal"), tmp


def _kill_actor_when_busy(out: Path, run_id: str, stop: threading.Event, killed: list[int]) -> None:
    import psutil

    while not stop.is_set():
        if any(out.glob(f"_staging/*/{run_id}/timings/*")):  # the run's first timing record
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "Moderator" in cmd and "MapWorker" in cmd:
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
        time.sleep(0.05)


def test_actor_killed_mid_job_every_row_once(local_gallery, ray_cluster, tmp_path) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate, new_run_id

    gal, _ = local_gallery
    src = upload_folder(tmp_path / "up", 160)
    out = tmp_path / "flags"
    run_id = new_run_id("2026-05-01")
    stop, killed = threading.Event(), []
    # kill the Moderator actor as soon as it has finished its first batch (a timing record exists)
    th = threading.Thread(target=_kill_actor_when_busy, args=(out, run_id, stop, killed), daemon=True)
    th.start()
    try:
        info = moderate(str(src), gal, str(out), "2026-05-01", cfg=JobConfig(batch_size=8), run_id=run_id, review=False)
    finally:
        stop.set()
    assert killed, "the actor was never killed: the test did not exercise the fault"
    df = pd.read_parquet(out)
    assert len(df) == 161 == info["inputs"] and df["image_key"].is_unique
    assert df.set_index("image_key").loc["rocket.jpg", "status"] == "matched"


@pytest.fixture(scope="module")
def flaky_s3(local_gallery):
    import boto3
    import ray

    with moto_server() as endpoint:
        proxy = FlakyProxy(endpoint)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        os.environ["MODSCAN_S3_RETRIES"] = "10"
        restart_ray()
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="flaky-up")
        s3.create_bucket(Bucket="flaky-out")
        for i in range(20):
            b = io.BytesIO()
            Image.fromarray(photo("coins")).resize((100 + i, 100)).save(b, format="JPEG")
            s3.put_object(Bucket="flaky-up", Key=f"d/img-{i}.jpg", Body=b.getvalue())
            if i < 6:
                s3.put_object(Bucket="flaky-up", Key=f"small/img-{i}.jpg", Body=b.getvalue())
        yield proxy, s3
        os.environ.pop("MODSCAN_S3_RETRIES", None)
        ray.shutdown()


@pytest.mark.slow
def test_s3_errors_for_a_while_are_retried(flaky_s3, local_gallery) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate
    from pipeline.moderation.flags import read_flags

    proxy, _ = flaky_s3
    gal, _ = local_gallery
    # the next 2 requests fail (a 503, then a connection reset), then the endpoint recovers
    proxy.mode, proxy.failed = "mixed", 0
    proxy.fail = 2
    info = moderate("s3://flaky-up/d/", gal, "s3://flaky-out/ok-mixed", "2026-05-02", cfg=JobConfig(batch_size=8),
                    review=False)
    assert proxy.failed == 2
    df = read_flags("s3://flaky-out/ok-mixed")
    assert len(df) == 20 == info["inputs"] and (df["status"] == "clean").all()


@pytest.mark.slow
def test_s3_outage_fails_cleanly_without_a_partial_partition(flaky_s3, local_gallery) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    proxy, s3 = flaky_s3
    gal, _ = local_gallery
    os.environ["MODSCAN_S3_RETRIES"] = "2"
    proxy.mode, proxy.fail, proxy.failed = "503", -1, 0
    from pipeline.errors import InputError

    try:
        # the input is read first: the outage is reported as an unreadable input (not a missing
        # one, which a backfill would treat as a day without uploads), with the endpoint's answer
        with pytest.raises(InputError, match=r"^input s3://flaky-up/d/ cannot be read: .*HTTP status 503") as e:
            moderate("s3://flaky-up/d/", gal, "s3://flaky-out/down", "2026-05-03", cfg=JobConfig(batch_size=8),
                     review=False)
    finally:
        proxy.fail = 0
        os.environ["MODSCAN_S3_RETRIES"] = "10"
    assert type(e.value) is InputError and proxy.failed >= 2  # MissingInput would be a wrong diagnosis
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flaky-out", Prefix="down/").get("Contents", [])]
    assert not [k for k in keys if k.startswith("down/dt=")], keys


@pytest.mark.slow
def test_driver_killed_during_the_write_then_rerun(local_gallery, tmp_path) -> None:
    gal, _ = local_gallery
    src = upload_folder(tmp_path / "up", 47)
    out = tmp_path / "flags"
    cmd = [sys.executable, "-m", "jobs.cli", "moderate", "--input", str(src), "--gallery", gal, "--output", str(out),
           "--date", "2026-05-04", "--batch-size", "8"]
    killed = kill_driver_when(cmd, lambda: (out / "_staging").exists() and any((out / "_staging").glob("*/*/data/*.parquet")))
    assert killed, "the driver finished before any staged file appeared"
    assert not [f.name for f in out.iterdir() if not f.name.startswith("_")]  # the killed run published nothing
    r = subprocess.run(cmd, cwd=ROOT, env=driver_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == 48 and df["image_key"].is_unique
    assert (out / "dt=2026-05-04" / "_SUCCESS").exists()
    assert not (out / "_staging").exists()  # the rerun's commit removed the killed run's staging too


def _healthy(proxy: FlakyProxy) -> None:
    proxy.fail, proxy.failed, proxy.mode = 0, 0, "503"
    proxy.methods, proxy.path_filter, proxy.pass_first = ("GET", "HEAD"), "", 0


def _s3_keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="flaky-out", Prefix=prefix).get("Contents", [])]


@pytest.mark.slow
def test_s3_write_errors_for_a_while_are_retried(flaky_s3, local_gallery) -> None:
    """503s and connection resets on PUT/POST/DELETE (staged writes, commit copies and deletes)."""
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate
    from pipeline.moderation.flags import read_flags

    proxy, s3 = flaky_s3
    gal, _ = local_gallery
    _healthy(proxy)
    proxy.methods, proxy.mode, proxy.fail = ("PUT", "POST", "DELETE"), "mixed", 6
    try:
        info = moderate("s3://flaky-up/small/", gal, "s3://flaky-out/w-ok", "2026-05-05", cfg=JobConfig(batch_size=8),
                        review=False)
    finally:
        failed = proxy.failed
        _healthy(proxy)
    assert failed == 6  # the faults happened (3 answered 503, 3 reset)
    df = read_flags("s3://flaky-out/w-ok")
    assert len(df) == 6 == info["inputs"] and df["image_key"].is_unique and (df["run_id"] == info["run_id"]).all()
    assert "w-ok/dt=2026-05-05/_SUCCESS" in _s3_keys(s3, "w-ok/") and not _s3_keys(s3, "w-ok/_staging/")


@pytest.mark.slow
def test_s3_write_outage_mid_commit_publishes_nothing_then_a_rerun_repairs(flaky_s3, local_gallery, monkeypatch) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate
    from pipeline.moderation.flags import read_flags

    proxy, s3 = flaky_s3
    gal, _ = local_gallery
    _healthy(proxy)
    day, out, cfg = "2026-05-06", "s3://flaky-out/w-outage", JobConfig(batch_size=8)
    # the commit's first two writes into the partition work (removing _SUCCESS, copying a data
    # object in), then every write into it fails for good: the commit stops half-way
    os.environ["MODSCAN_S3_RETRIES"] = "2"
    proxy.methods, proxy.path_filter, proxy.pass_first, proxy.fail = ("PUT", "POST", "DELETE"), f"/w-outage/dt={day}/", 2, -1
    try:
        # the storage error of the write into the partition, not an error of an earlier step
        with pytest.raises(OSError, match=rf"key 'w-outage/dt={day}/[^']+' in bucket 'flaky-out'.*(SLOW_DOWN|HTTP status 503)"):
            moderate("s3://flaky-up/small/", gal, out, day, cfg=cfg, review=False)
        failed = proxy.failed
    finally:
        _healthy(proxy)
        os.environ["MODSCAN_S3_RETRIES"] = "10"
    assert failed >= 1
    keys = _s3_keys(s3, f"w-outage/dt={day}/")
    assert any(k.endswith(".parquet") for k in keys), keys  # the fault hit the commit, not an earlier step
    assert f"w-outage/dt={day}/_SUCCESS" not in keys  # half a partition is never a published one
    assert read_flags(out, day).empty
    # the outage also kept the failed run from clearing its committing heartbeat: the rerun cannot
    # tell it from a live commit and waits until the heartbeat is stale (short here)
    monkeypatch.setenv("MODSCAN_COMMIT_STALE_S", "4")
    rerun = moderate("s3://flaky-up/small/", gal, out, day, cfg=cfg, review=False)
    df = read_flags(out, day)
    # every chunk was staged and recorded before the commit failed: the rerun decodes nothing and
    # publishes those rows, which keep the run id of the run that read them
    (failed_run,) = rerun["resume"]["resumed_runs"]
    assert rerun["resume"]["chunks_done_before"] == rerun["resume"]["chunks_total"] == 1
    assert rerun["resume"]["images_decoded"] == 0 and failed_run != rerun["run_id"]
    assert len(df) == 6 and df["image_key"].is_unique and set(df["run_id"]) == {failed_run}
    parquet = [k for k in _s3_keys(s3, f"w-outage/dt={day}/") if k.endswith(".parquet")]
    assert parquet and all(rerun["run_id"] in k for k in parquet)  # nothing the failed commit copied is left
    assert not _s3_keys(s3, "w-outage/_staging/")


def test_two_concurrent_runs_of_one_date_one_wins_the_other_fails(local_gallery, ray_cluster, tmp_path) -> None:
    """Both runs read, decode and stage at the same time; the later one owns the date. The older
    one fails at commit with a clear error and publishes nothing: the partition is never mixed."""
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import execute_run, prepare_run
    from pipeline.moderation.flags import PartitionTakenError

    gal, _ = local_gallery
    src = upload_folder(tmp_path / "up", 24)
    out, day = tmp_path / "flags", "2026-05-07"
    cfg = JobConfig(batch_size=8, actors=1)
    older = prepare_run(str(src), gal, str(out), day, cfg=cfg)
    newer = prepare_run(str(src), gal, str(out), day, cfg=cfg)
    results: dict[str, object] = {}

    def run(name: str, plan) -> None:
        try:
            results[name] = execute_run(plan, review=False)
        except Exception as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in (("older", older), ("newer", newer))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert isinstance(results["older"], PartitionTakenError), results["older"]
    msg = str(results["older"])
    assert newer.run_id in msg and older.run_id in msg and "published nothing" in msg
    assert isinstance(results["newer"], dict) and results["newer"]["run_id"] == newer.run_id
    df = pd.read_parquet(out / f"dt={day}")
    assert len(df) == 25 and df["image_key"].is_unique and set(df["run_id"]) == {newer.run_id}
    assert (out / f"dt={day}" / "_SUCCESS").read_text().strip() == newer.run_id
    assert not (out / "_staging").exists()


@pytest.mark.slow
def test_node_lost_mid_job_every_upload_exactly_one_row(local_gallery, tmp_path) -> None:
    """A head and a second node (``ray.cluster_utils.Cluster``: two raylets, as two `ray start`);
    the second node is killed (no graceful shutdown) while it holds work."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate, new_run_id

    gal, _ = local_gallery
    src = upload_folder(tmp_path / "up", 23)
    out, day = tmp_path / "flags", "2026-05-08"
    run_id = new_run_id(day)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20})
    worker = cluster.add_node(num_cpus=2, object_store_memory=200 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    raylet = psutil.Process(worker.all_processes["raylet"][0].process.pid)
    lost: list[list[str]] = []

    def kill_worker_node_when_busy() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            # a Moderator actor on the second node that finished its __init__ (it holds batches)
            busy = []
            for c in raylet.children(recursive=True):
                try:
                    cmd = " ".join(c.cmdline()).strip()
                except psutil.Error:
                    continue
                if "Moderator" in cmd and "__init__" not in cmd:
                    busy.append(cmd)
            done = len(list(out.glob(f"_staging/*/{run_id}/timings/*.json")))
            if busy and done >= 2:
                cluster.remove_node(worker, allow_graceful=False)
                lost.append(busy)
                return
            time.sleep(0.1)

    th = threading.Thread(target=kill_worker_node_when_busy, daemon=True)
    th.start()
    try:
        info = moderate(str(src), gal, str(out), day, cfg=JobConfig(batch_size=4, actors=2), run_id=run_id,
                        review=False)
        th.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert lost, "the second node was never killed while it held work: the test did not exercise the fault"
    df = pd.read_parquet(out / f"dt={day}")
    assert len(df) == 24 == info["inputs"] and df["image_key"].is_unique
    assert df.set_index("image_key").loc["rocket.jpg", "status"] == "matched"

