"""``modscan retro`` on a real local Ray cluster against a real S3 endpoint (moto server).

Day 1 is moderated against a gallery of two references; a third reference, of which day 1 holds
copies, is then added as a new version. The tests run in file order on that one world: a killed
retro run leaves the partition as it was; ``modscan retro`` then flags exactly what a fresh run of
day 1 against the new gallery flags and changes nothing else; its rerun changes nothing; removing
a reference clears its past flags. A model change is refused.
"""

from __future__ import annotations

import json
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, kill_driver_when, photo, restart_ray
from PIL import Image
from s3server import moto_server

from pipeline.errors import ModscanError

DAY = "2026-04-01"
BASE = {"coffee": "filter", "chelsea": "filter"}
ADDED = "astronaut"
FLAGS, FRESH, GAL = "s3://flags-retro/flags", "s3://flags-retro/fresh", "s3://gallery-retro/main"
KEY_COLS = ["image_key", "status", "action", "bank", "reference_id"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, shipped_model_dir):
    import boto3
    import ray

    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.evaluation.samples import procedural
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("retro")
    with moto_server() as endpoint:
        restart_ray()
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for b in ("refs-retro", "uploads-retro", "gallery-retro", "flags-retro"):
            s3.create_bucket(Bucket=b)
        for n in [*BASE, ADDED]:
            s3.put_object(Bucket="refs-retro", Key=f"{'added' if n == ADDED else 'base'}/{n}.jpg",
                          Body=jpeg_bytes(Image.fromarray(photo(n)), 95))
        import random

        rng = random.Random(3)
        for i in range(12):
            s3.put_object(Bucket="uploads-retro", Key=f"{DAY}/other-{i}.jpg", Body=jpeg_bytes(procedural(rng, (240, 180)), 85))
        for n in [*BASE, ADDED]:
            im = Image.fromarray(photo(n))
            s3.put_object(Bucket="uploads-retro", Key=f"{DAY}/copy-{n}.jpg", Body=jpeg_bytes(im, 85))
            s3.put_object(Bucket="uploads-retro", Key=f"{DAY}/small-{n}.jpg",
                          Body=jpeg_bytes(im.resize((im.width // 2, im.height // 2)), 75))
        card, extract = read_card(None), local_extractor(None)
        gal = open_store(GAL)
        G.build(gal, [Bank("banned", "s3://refs-retro/base/", "sensitive/x", "filter")], card, extract, n_shards=2)
        cfg = JobConfig(batch_size=8)
        first = moderate(f"s3://uploads-retro/{DAY}/", GAL, FLAGS, DAY, cfg=cfg, review=False)
        v2 = G.add(gal, "banned", ["s3://refs-retro/added/astronaut.jpg"], card, extract).version
        yield {"s3": s3, "endpoint": endpoint, "tmp": tmp, "cfg": cfg, "first": first, "v1": first["gallery_version"],
               "v2": v2, "gal": gal, "card": card, "extract": extract}
        ray.shutdown()


def _partition(root: str, dt: str = DAY) -> pd.DataFrame:
    from pipeline.moderation.flags import read_flags

    return read_flags(root, dt).sort_values("image_key").reset_index(drop=True)


def _objects(s3, prefix: str) -> dict[str, str]:
    return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket="flags-retro", Prefix=prefix).get("Contents", [])}


def test_a_killed_retro_run_leaves_the_partition_as_it_was(world) -> None:
    s3 = world["s3"]
    before = _objects(s3, f"flags/dt={DAY}/")
    cmd = [sys.executable, "-m", "jobs.cli", "retro", "--gallery", GAL, "--since", world["v1"], "--from", DAY,
           "--to", DAY, "--output", FLAGS, "--batch-size", "8"]
    # killed 2 s after it starts: in the Ray part, the coarse pass or the re-decision
    killed = kill_driver_when(cmd, lambda: any(k.endswith(".started.json") for k in _objects(s3, "flags/_retro/")),
                              wait=2.0)
    assert killed, "the retro run finished before it could be killed"
    assert _objects(s3, f"flags/dt={DAY}/") == before  # every object as it was, _SUCCESS included
    assert (_partition(FLAGS)["run_id"] == world["first"]["run_id"]).all()


def test_retro_flags_exactly_what_a_fresh_run_flags(world) -> None:
    from jobs.runtime.retro import retro
    from jobs.runtime.run import moderate

    before = _partition(FLAGS)
    rep = retro(GAL, world["v1"], DAY, DAY, FLAGS, cfg=world["cfg"])
    fresh = moderate(f"s3://uploads-retro/{DAY}/", GAL, FRESH, DAY, cfg=world["cfg"], review=False)
    after, new = _partition(FLAGS), _partition(FRESH)
    assert fresh["gallery_version"] == world["v2"]
    assert len(after) == len(before) and after["image_key"].is_unique
    pd.testing.assert_frame_equal(after[KEY_COLS], new[KEY_COLS])
    changed = set(after.loc[after["decided_by_run"].notna(), "image_key"])
    assert changed and all(ADDED in k for k in changed), changed  # only the added reference's copies moved
    assert changed == set(before.loc[before["action"] != after["action"], "image_key"])
    rest = after[~after["image_key"].isin(changed)]
    pd.testing.assert_frame_equal(rest.drop(columns=["dt"]).reset_index(drop=True),
                                  before[~before["image_key"].isin(changed)].drop(columns=["dt"]).reset_index(drop=True))
    moved = after[after["image_key"].isin(changed)]
    assert (moved["previous_action"] == "none").all() and (moved["action"] == "filter").all()
    assert (moved["run_id"] == world["first"]["run_id"]).all() and (moved["gallery_version"] == world["v2"]).all()
    assert rep["totals"]["newly_flagged"] == len(changed) and rep["decoded"] < len(before)
    assert rep["references_added"] and rep["per_day"][DAY]["committed"]
    run = json.loads(world["s3"].get_object(Bucket="flags-retro", Key=f"flags/dt={DAY}/_run.json")["Body"].read())
    assert run["kind"] == "retro" and run["gallery_versions_compared"] == {"since": world["v1"], "current": world["v2"]}
    assert run["retro_counts"]["newly_flagged"] == len(changed) and run["days"] == [DAY]
    assert (moved["decided_by_run"] == run["run_id"]).all()
    # pandas over the root, with the dt filter, and DuckDB over the hive layout: one row per upload
    from pipeline.ingest.storage import open_store

    st = open_store(FLAGS)
    pdf = pd.read_parquet(st.path(""), filesystem=st.fs, filters=[("dt", "=", DAY)])
    assert len(pdf) == len(before) and pdf["image_key"].is_unique
    local = world["tmp"] / "mirror"
    for k in _objects(world["s3"], f"flags/dt={DAY}/"):
        if k.endswith(".parquet"):
            (local / k).parent.mkdir(parents=True, exist_ok=True)
            (local / k).write_bytes(world["s3"].get_object(Bucket="flags-retro", Key=k)["Body"].read())
    n, flagged = duckdb.sql(f"SELECT count(*), count(*) FILTER (WHERE decided_by_run IS NOT NULL) FROM read_parquet("
                            f"'{local}/flags/*/*.parquet', hive_partitioning = true)").fetchall()[0]
    assert (n, flagged) == (len(before), len(changed))


def test_a_rerun_of_the_retro_run_changes_nothing(world) -> None:
    from jobs.runtime.retro import retro

    before = _objects(world["s3"], f"flags/dt={DAY}/")
    rep = retro(GAL, world["v1"], DAY, DAY, FLAGS, cfg=world["cfg"])
    assert rep["days"] == [] and DAY in rep["days_skipped"] and rep["totals"]["changed"] == 0
    assert _objects(world["s3"], f"flags/dt={DAY}/") == before  # no new commit


def test_removing_a_reference_clears_its_past_flags(world) -> None:
    from jobs.runtime.retro import retro
    from pipeline import gallery as G

    before = _partition(FLAGS)
    m = G.read_manifest(world["gal"])
    ent = G.read_content(world["gal"]).content.entries
    coffee = int(ent.loc[ent["source_uri"].str.endswith("coffee.jpg"), "id"].iloc[0])
    hit = before["reference_id"] == coffee
    assert hit.any() and (before.loc[hit, "action"] == "filter").all()
    G.remove(world["gal"], ids=[coffee])
    rep = retro(GAL, m.version, DAY, DAY, FLAGS, cfg=world["cfg"])
    after = _partition(FLAGS)
    cleared = after[before["reference_id"] == coffee]
    assert (cleared["action"] == "none").all() and (cleared["previous_action"] == "filter").all()
    assert rep["totals"]["cleared"] == int(hit.sum()) and rep["totals"]["newly_flagged"] == 0
    pd.testing.assert_frame_equal(after.loc[~hit, KEY_COLS], before.loc[~hit, KEY_COLS])
    assert any(c["id"] == coffee and c["why"] == "removed" for c in rep["references_removed_or_changed"])


def test_a_model_change_is_refused(world, tmp_path) -> None:
    from jobs.runtime.retro import retro
    from pipeline.ingest.storage import open_store
    from pipeline.schemas import SIGNATURE_SCHEMA

    out = open_store(str(tmp_path / "flags"), create=True)
    v = world["v1"]  # a version older than CURRENT: the day is one to re-check
    for st, info in ((out, {"gallery_version": v}), (out.child("_signatures"), {"model_version": "another-model"})):
        st.write_text(f"dt={DAY}/_run.json", json.dumps(info))
        st.write_text(f"dt={DAY}/_SUCCESS", "r\n")
    t = pa.Table.from_pydict({"image_key": ["a"], "image_uri": ["x"], "image_sha256": ["s"],
                              "coarse_feature": pa.array([np.zeros(128, "<f2").tobytes()], pa.binary(256)),
                              "pdq_hash": [None], "model_version": ["another-model"], "run_id": ["r"]},
                             schema=SIGNATURE_SCHEMA)
    pq.write_table(t, str(tmp_path / "flags" / "_signatures" / f"dt={DAY}" / "part-0.parquet"))
    with pytest.raises(ModscanError, match="a model change needs a full backfill: modscan backfill"):
        retro(GAL, v, DAY, DAY, str(tmp_path / "flags"), cfg=world["cfg"])


@pytest.mark.slow
def test_nightly_with_retro_days_rechecks_days_decided_against_an_older_gallery(world) -> None:
    """The nightly trigger: yesterday's partition was decided against an older version than tonight's
    run, so ``retro_days = 1`` re-checks it; once it is at the current version nothing runs."""
    from dataclasses import replace

    from jobs.runtime.retro import nightly_retro
    from jobs.runtime.run import moderate
    from pipeline import gallery as G

    nightly_out = "s3://flags-retro/nightly"
    # yesterday is decided against a gallery without coffee (removed here unless an earlier test did)
    ent = G.read_content(world["gal"]).content.entries
    if ids := [int(i) for i in ent.loc[ent["source_uri"].str.endswith("base/coffee.jpg"), "id"]]:
        G.remove(world["gal"], ids=ids)
    first = moderate(f"s3://uploads-retro/{DAY}/", GAL, nightly_out, DAY, cfg=world["cfg"], review=False)
    before = _partition(nightly_out)
    assert (before.loc[before["image_key"].str.contains("coffee"), "action"] == "none").all()
    newer = G.add(world["gal"], "banned", ["s3://refs-retro/base/coffee.jpg"], world["card"], world["extract"]).version
    tonight = "2026-04-02"
    cfg = replace(world["cfg"], retro_days=1)
    assert nightly_retro(GAL, nightly_out, tonight, newer, replace(cfg, retro_days=0)) == []  # off by default
    (rep,) = nightly_retro(GAL, nightly_out, tonight, newer, cfg)
    assert rep["days"] == [DAY] and rep["gallery_versions_compared"] == {"since": first["gallery_version"], "current": newer}
    after = _partition(nightly_out)
    coffee = after["image_key"].str.contains("coffee")
    assert coffee.any() and (after.loc[coffee, "action"] == "filter").all()
    assert rep["totals"]["newly_flagged"] == int(coffee.sum())
    assert nightly_retro(GAL, nightly_out, tonight, newer, cfg) == []  # yesterday is at the current version now


@pytest.mark.slow
def test_retro_re_decides_each_hour_of_an_hourly_day(world) -> None:
    """A day moderated hour by hour (``dt=D/hour=HH``): ``retro --from D --to D`` re-checks every
    committed hour of D and re-commits the hours whose decisions changed."""
    import random

    from jobs.runtime.retro import retro
    from jobs.runtime.run import moderate
    from pipeline import gallery as G
    from pipeline.evaluation.samples import procedural

    s3, out, day = world["s3"], "s3://flags-retro/hourly", "2026-04-03"
    rng = random.Random(9)
    for h in ("10", "11"):
        for i in range(3):
            s3.put_object(Bucket="uploads-retro", Key=f"{day}/{h}/other-{h}-{i}.jpg", Body=jpeg_bytes(procedural(rng, (240, 180)), 85))
    s3.put_object(Bucket="uploads-retro", Key=f"{day}/10/copy-rocket.jpg", Body=jpeg_bytes(Image.fromarray(photo("rocket")), 85))
    since = [moderate(f"s3://uploads-retro/{day}/{h}/", GAL, out, f"{day}T{h}", cfg=world["cfg"], review=False)
             for h in ("10", "11")][0]["gallery_version"]
    s3.put_object(Bucket="refs-retro", Key="hourly/rocket.jpg", Body=jpeg_bytes(Image.fromarray(photo("rocket")), 95))
    G.add(world["gal"], "banned", ["s3://refs-retro/hourly/rocket.jpg"], world["card"], world["extract"])
    rep = retro(GAL, since, day, day, out, cfg=world["cfg"])
    assert rep["days"] == [f"{day}T10", f"{day}T11"]
    assert rep["per_day"][f"{day}T10"]["committed"] and not rep["per_day"][f"{day}T11"]["committed"]
    df = _partition(out, day)  # the day: both hours
    assert len(df) == 7 and df["image_key"].is_unique and sorted(df["hour"].unique()) == [10, 11]
    row = df.set_index("image_key").loc["copy-rocket.jpg"]
    assert row["action"] == "filter" and row["hour"] == 10 and row["previous_action"] == "none"
    info = json.loads(s3.get_object(Bucket="flags-retro", Key=f"hourly/dt={day}/hour=10/_run.json")["Body"].read())
    assert info["kind"] == "retro" and (info["dt"], info["hour"], info["partition"]) == (day, 10, f"dt={day}/hour=10")
