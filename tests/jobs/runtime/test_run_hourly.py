"""Hourly partitions end to end (jobs/commands/moderate_cmd.py, jobs/runtime/run.py, pipeline/moderation/flags.py) on a
real local Ray cluster: ``modscan moderate --hour``, ``modscan hourly``, ``backfill`` over hours,
read back by ``read_flags``, pandas and DuckDB next to a day partition of another date; a day that
would hold both forms is refused, and with ``--allow-mixed-day`` every reader sees both.

The tests run in file order on one output root."""

from __future__ import annotations

import json
import random
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from conftest import photo, run_cli
from PIL import Image

from pipeline.evaluation.samples import procedural

DAY, OTHER = "2026-09-02", "2026-09-01"
# DuckDB refuses one glob over files at two depths ("Hive partition mismatch"): days and hours are
# read with one glob each, unioned by name (hour is NULL on the rows of day partitions); it reads
# hour=05 as text unless told its type (the README's query)
DUCKDB_DAYS_AND_HOURS = """
SELECT * FROM read_parquet('{root}/dt=*/*.parquet', hive_partitioning = true)
UNION ALL BY NAME
SELECT * FROM read_parquet('{root}/dt=*/hour=*/*.parquet', hive_partitioning = true, hive_types = {{'hour': INTEGER}})"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, shipped_model_dir, ray_cluster):
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    tmp = tmp_path_factory.mktemp("hourly")
    (tmp / "refs").mkdir()
    Image.fromarray(photo("rocket")).save(tmp / "refs" / "rocket.png")
    G.build(open_store(str(tmp / "gal"), create=True), [Bank("v", str(tmp / "refs"), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    rng = random.Random(5)
    for folder, n in ((f"{OTHER}", 3), (f"{DAY}/05", 4), (f"{DAY}/06", 2), (f"{DAY}/07", 1), (f"{DAY}/08", 2)):
        d = tmp / "up" / folder
        d.mkdir(parents=True)
        for i in range(n):
            procedural(rng, (200, 150)).save(d / f"{folder.replace('/', '-')}-{i}.jpg", quality=85)
    Image.fromarray(photo("rocket")).save(tmp / "up" / f"{DAY}/05" / "rocket.jpg")
    return {"tmp": tmp, "gal": str(tmp / "gal"), "out": tmp / "flags", "up": tmp / "up"}


def _job(w: dict) -> list[str]:
    return ["--gallery", w["gal"], "--output", str(w["out"]), "--batch-size", "4"]


def test_moderate_hour_and_hourly_write_hour_partitions_next_to_a_day(world, capsys) -> None:
    w, out = world, world["out"]
    rc, stdout, err = run_cli(capsys, "moderate", "--input", str(w["up"] / OTHER), "--date", OTHER, *_job(w))
    assert rc == 0, err
    rc, stdout, err = run_cli(capsys, "moderate", "--input", str(w["up"] / DAY / "05"), "--date", DAY, "--hour", "5",
                           *_job(w))
    assert rc == 0, err
    assert stdout.startswith(f"modscan: dt={DAY}/hour=05 run=")
    rc, stdout, err = run_cli(capsys, "hourly", "--input-template", str(w["up"]) + "/{date}/{hour}", "--at", f"{DAY}T06",
                           *_job(w))
    assert rc == 0, err
    for hour, n in (("05", 5), ("06", 2)):
        part = out / f"dt={DAY}" / f"hour={hour}"
        info = json.loads((part / "_run.json").read_text())
        assert (part / "_SUCCESS").exists() and (info["dt"], info["hour"], info["inputs"]) == (DAY, int(hour), n)
        assert info["partition"] == f"dt={DAY}/hour={hour}" and info["run_id"].startswith(f"20260902h{hour}T")
    assert not list((out / f"dt={DAY}").glob("*.parquet"))  # the day folder holds only its hours
    assert (out / "_signatures" / f"dt={DAY}" / "hour=05" / "_SUCCESS").exists()


def test_read_flags_pandas_and_duckdb_read_hours_and_days(world) -> None:
    from pipeline.moderation.flags import read_flags

    root = str(world["out"])
    everything = read_flags(root)
    assert len(everything) == 3 + 5 + 2 and everything["image_key"].is_unique
    assert everything.groupby("dt")["hour"].apply(lambda s: sorted(s.dropna().astype(int).unique())).to_dict() == {
        OTHER: [], DAY: [5, 6]}
    assert everything.loc[everything["dt"] == OTHER, "hour"].isna().all()
    day = read_flags(root, DAY)
    assert len(day) == 7 and set(day["hour"]) == {5, 6}
    hour = read_flags(root, f"{DAY}T05").set_index("image_key")
    assert len(hour) == 5 and hour.loc["rocket.jpg", "action"] == "filter"
    # pandas: a filter on dt reads the whole day, across its hours
    pdf = pd.read_parquet(root, filters=[("dt", "=", DAY)])
    assert len(pdf) == 7 and sorted(pdf["hour"].astype(int).unique()) == [5, 6]
    assert len(pd.read_parquet(root, filters=[("dt", "=", OTHER)])) == 3
    assert len(pd.read_parquet(root, filters=[("dt", "=", DAY), ("hour", "=", 6)])) == 2
    # DuckDB: days and hours, one glob each
    rows = duckdb.sql(f"SELECT CAST(dt AS VARCHAR) AS dt, hour, count(*) AS n FROM ({DUCKDB_DAYS_AND_HOURS.format(root=root)}) "
                      "GROUP BY ALL ORDER BY ALL").fetchall()
    assert rows == [(OTHER, None, 3), (DAY, 5, 5), (DAY, 6, 2)]
    n = duckdb.sql(f"SELECT count(*) FROM ({DUCKDB_DAYS_AND_HOURS.format(root=root)}) WHERE dt = '{DAY}' "
                   "AND action = 'filter'").fetchall()[0][0]
    assert n == 1


def test_backfill_over_hours_and_a_missing_hour(world, capsys) -> None:
    w = world
    template = str(w["up"]) + "/{date}/{hour}"
    rc, stdout, err = run_cli(capsys, "backfill", "--input-template", template, "--from", f"{DAY}T06", "--to",
                           f"{DAY}T09", *_job(w))
    assert rc == 1 and "1 hour(s) with missing input" in err
    assert f"{DAY}T06: skipped (committed)" in stdout and f"{DAY}T07: done" in stdout and f"{DAY}T08: done" in stdout
    assert f"{DAY}T09: missing: " in stdout
    from pipeline.moderation.flags import read_flags

    assert sorted(read_flags(str(w["out"]), DAY)["hour"].unique()) == [5, 6, 7, 8]
    rc, _, err = run_cli(capsys, "backfill", "--input-template", template, "--from", f"{DAY}T06", "--to", DAY, *_job(w))
    assert rc == 2 and "give two days (YYYY-MM-DD) or two hours (YYYY-MM-DDTHH)" in err


def test_hourly_defaults_to_the_last_full_hour(world, capsys, monkeypatch) -> None:
    from pipeline.moderation import flags as F  # what moderate_cmd.cli_hourly calls when it runs

    w = world
    monkeypatch.setattr(F, "previous_hour", lambda: f"{DAY}T08")
    rc, stdout, err = run_cli(capsys, "hourly", "--input-template", str(w["up"]) + "/{date}/{hour}", *_job(w))
    assert rc == 0, err
    assert stdout.startswith(f"modscan: dt={DAY}/hour=08 ")  # the last full hour, replaced
    rc, _, err = run_cli(capsys, "hourly", "--input-template", str(w["up"]) + "/{date}", "--at", DAY, *_job(w))
    assert rc == 2 and "--at '2026-09-02' is not an hour" in err
    assert Path(w["out"] / f"dt={DAY}" / "hour=08" / "_run.json").exists()


def test_a_day_next_to_its_hours_is_refused_unless_asked(world, capsys) -> None:
    from pipeline.moderation.flags import read_flags

    w, out, root = world, world["out"], str(world["out"])
    day_input = str(w["up"] / OTHER)  # any folder: the refusal comes before anything is read
    rc, _, err = run_cli(capsys, "moderate", "--input", day_input, "--date", DAY, *_job(w))
    assert rc == 2 and f"dt={DAY} already holds hourly partitions" in err and "--allow-mixed-day" in err
    rc, _, err = run_cli(capsys, "moderate", "--input", str(w["up"] / DAY / "07"), "--date", OTHER, "--hour", "7", *_job(w))
    assert rc == 2 and f"dt={OTHER} already holds a day partition" in err
    assert not (out / f"dt={OTHER}" / "hour=07").exists() and not (out / f"dt={DAY}" / "_SUCCESS").exists()
    # asked: the day partition is written next to the hours, which stay as they were
    before = read_flags(root, DAY)
    rc, _, err = run_cli(capsys, "moderate", "--input", day_input, "--date", DAY, "--allow-mixed-day", *_job(w))
    assert rc == 0, err
    assert (out / f"dt={DAY}" / "_SUCCESS").exists() and (out / f"dt={DAY}" / "hour=05" / "_SUCCESS").exists()
    # what a day-level reader of a mixed day sees: the rows of both forms (hour null on the day's)
    mixed = read_flags(root, DAY)
    assert len(mixed) == len(before) + 3 and mixed["hour"].isna().sum() == 3
    assert len(pd.read_parquet(root, filters=[("dt", "=", DAY)])) == len(before) + 3
    # rerunning the day replaces only the day's own files
    rc, _, err = run_cli(capsys, "moderate", "--input", day_input, "--date", DAY, "--allow-mixed-day", *_job(w))
    assert rc == 0, err
    assert len(read_flags(root, DAY)) == len(before) + 3 and len(read_flags(root, f"{DAY}T05")) == 5
