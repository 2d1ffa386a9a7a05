"""Hash-list banks end to end (issue 20): a gallery with pdq and md5 banks on moto S3, a day of
uploads through the real job on local Ray, the committed Parquet partition read back."""

from __future__ import annotations

import json
import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, photo, restart_ray
from PIL import Image
from s3server import moto_server

from models.augment import apply_named

DAY = "2026-04-02"


def _img(name: str) -> Image.Image:
    return Image.fromarray(photo(name))


def _uploads() -> dict[str, bytes]:
    rng = random.Random(3)
    return {
        "md5/coffee.jpg": jpeg_bytes(_img("coffee")),                                       # the listed file itself
        "pdq/chelsea-color.jpg": jpeg_bytes(apply_named(_img("chelsea"), ["color"], rng)),  # a light edit of a listed picture
        "allow/camera.jpg": jpeg_bytes(_img("camera")),                                     # in a pdq block AND a pdq allow bank
        "strict/moon.jpg": jpeg_bytes(_img("moon")),                                        # listed, but below the bank's floor
        "export/astronaut.jpg": jpeg_bytes(_img("astronaut"), 95),                          # exact copy of an image reference
        "export/rocket-rescale.jpg": jpeg_bytes(apply_named(_img("rocket"), ["rescale_jpeg"], rng)),  # lightly edited
        "clean/brick.jpg": jpeg_bytes(_img("brick")),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, shipped_model_dir):
    import boto3
    import ray

    from pipeline.signals.hashes import md5_hex, pdq_from_bytes
    from pipeline.signals.lists import HashEntry, format_csv, format_signal_file

    tmp = tmp_path_factory.mktemp("hashbanks")
    up = _uploads()
    with moto_server() as endpoint:
        restart_ray()
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for b in ("refs-hb", "uploads-hb", "gallery-hb", "flags-hb"):
            s3.create_bucket(Bucket=b)
        for n in ("astronaut", "rocket"):
            s3.put_object(Bucket="refs-hb", Key=f"images/{n}.jpg", Body=jpeg_bytes(_img(n), 95))
        for k, data in up.items():
            s3.put_object(Bucket="uploads-hb", Key=f"{DAY}/{k}", Body=data)
        md5_list = format_csv([HashEntry(md5_hex(up["md5/coffee.jpg"]), "N-1", json.dumps({"ncmec_id": "N-1"}))], "md5")
        s3.put_object(Bucket="refs-hb", Key="lists/md5.csv", Body=md5_list.encode())
        chelsea = pdq_from_bytes(jpeg_bytes(_img("chelsea"), 95), min_side=None)[0]
        pdq_list = format_csv([HashEntry(chelsea, "TE-7", json.dumps({"program": "te", "label": "x"}))], "pdq")
        s3.put_object(Bucket="refs-hb", Key="lists/pdq.csv", Body=pdq_list.encode())
        clock = pdq_from_bytes(up["allow/camera.jpg"])[0]
        (tmp / "clock.txt").write_text(format_signal_file([clock], "pdq"))
        moon, moon_quality = pdq_from_bytes(up["strict/moon.jpg"])
        (tmp / "moon.txt").write_text(format_signal_file([moon], "pdq"))
        banks = tmp / "banks.toml"
        banks.write_text(
            '[[bank]]\nname = "refs"\nsource = "s3://refs-hb/images/"\ncategory = "sensitive/refs"\naction = "filter"\n'
            '[[bank]]\nname = "md5_list"\nkind = "md5"\nsource = "s3://refs-hb/lists/md5.csv"\n'
            'category = "sensitive/program"\naction = "filter"\n'
            '[[bank]]\nname = "pdq_list"\nkind = "pdq"\nsource = "s3://refs-hb/lists/pdq.csv"\n'
            'category = "sensitive/program"\naction = "downrank"\npdq_max_distance = 40\n'
            '[[bank]]\nname = "clock_block"\nkind = "pdq"\nsource = "clock.txt"\ncategory = "c/block"\naction = "filter"\n'
            '[[bank]]\nname = "clock_allow"\nkind = "pdq"\nsource = "clock.txt"\ncategory = "c/allow"\naction = "allow"\n'
            '[[bank]]\nname = "strict"\nkind = "pdq"\nsource = "moon.txt"\ncategory = "c/strict"\naction = "filter"\n'
            'pdq_min_quality = 100\n')
        yield {"tmp": tmp, "banks": banks, "uploads": up, "moon_quality": moon_quality}
        ray.shutdown()


@pytest.fixture(scope="module")
def run(world):
    """Build (images + hash lists), export the image bank, import it as a pdq bank, moderate a day."""
    from jobs.commands.gallery_cmd import ray_extractor
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank, load_banks
    from pipeline.ingest.storage import open_store
    from pipeline.signals.lists import write_list

    store = open_store("s3://gallery-hb/main")
    v1, stats = G.build(store, load_banks(world["banks"]), read_card(None), ray_extractor(None), n_shards=2)
    assert stats["md5_list"] == {"list_entries": 1, "duplicates_dropped": 0} and stats["refs"]["added"] == 2
    exported = world["tmp"] / "exported.pdq.txt"
    entries = G.export_hashes(store, "refs", "pdq")
    write_list(str(exported), entries, "pdq")
    v2, st2 = G.replace_list(store, "exported", str(exported),
                             Bank("exported", str(exported), "sensitive/exported", "filter", kind="pdq"))
    assert st2["added"] == 2
    moderate(f"s3://uploads-hb/{DAY}/", "s3://gallery-hb/main", "s3://flags-hb/flags", DAY, cfg=JobConfig(batch_size=8))
    from pipeline.moderation.flags import read_flags

    df = read_flags("s3://flags-hb/flags", DAY).set_index("image_key")
    return {"df": df, "v1": v1, "v2": v2, "store": store, "exported": exported}


def test_hash_matches_carry_signal_entry_metadata_and_distance(run) -> None:
    df = run["df"]
    r = df.loc["md5/coffee.jpg"]
    assert (r.status, r.action, r.bank, r.signal) == ("matched", "filter", "md5_list", "md5")
    assert r.list_entry_id == "N-1" and json.loads(r.list_metadata) == {"ncmec_id": "N-1"} and pd.isna(r.pdq_distance)
    r = df.loc["pdq/chelsea-color.jpg"]
    assert (r.status, r.action, r.bank, r.signal) == ("matched", "downrank", "pdq_list", "pdq")
    assert 0 <= r.pdq_distance <= 40 and r.list_entry_id == "TE-7"
    assert json.loads(r.list_metadata) == {"label": "x", "program": "te"}
    assert pd.isna(r.reference_id)


def test_every_decoded_row_keeps_its_own_pdq(run, world) -> None:
    from pipeline.signals.hashes import SignalDecoder

    df = run["df"]
    assert df["pdq_hash"].str.fullmatch(r"[0-9a-f]{64}").all() and df["pdq_quality"].between(0, 100).all()
    one = SignalDecoder().decode_one(world["uploads"]["clean/brick.jpg"])
    assert df.loc["clean/brick.jpg", "pdq_hash"] == one["pdq_hash"]
    assert df.loc["clean/brick.jpg", "status"] == "clean" and pd.isna(df.loc["clean/brick.jpg", "signal"])


def test_allow_bank_beats_an_equally_strong_pdq_match(run) -> None:
    r = run["df"].loc["allow/camera.jpg"]
    assert (r.status, r.action, r.bank, r.signal, r.pdq_distance) == ("clean", "none", "clock_allow", "pdq", 0)


def test_low_quality_query_hash_is_not_matched_and_the_row_says_so(run, world) -> None:
    assert world["moon_quality"] < 100
    r = run["df"].loc["strict/moon.jpg"]
    assert r.status == "clean" and r.bank != "strict" and r.pdq_quality == world["moon_quality"]
    assert "strict" in r.reason and "quality" in r.reason


def test_export_import_round_trip_flags_through_pdq(run) -> None:
    from pipeline.signals.lists import read_list

    assert len(read_list(str(run["exported"]), "pdq")) == 2
    df = run["df"]
    for k in ("export/astronaut.jpg", "export/rocket-rescale.jpg"):
        r = df.loc[k]
        # the descriptor matches them too (bank refs): pdq is the stronger signal and decides
        assert (r.status, r.bank, r.signal) == ("matched", "exported", "pdq"), (k, r.bank, r.signal)
        assert r.pdq_distance <= 31
    assert df.loc["export/astronaut.jpg", "pdq_distance"] == 0


def test_lookup_explains_hash_matches(run, world) -> None:
    from pipeline.features import FeatureExtractor
    from pipeline.gallery import open_gallery
    from pipeline.ops.explain import explain, render_table

    p = world["tmp"] / "chelsea-color.jpg"
    p.write_bytes(world["uploads"]["pdq/chelsea-color.jpg"])
    q = world["tmp"] / "moon.jpg"
    q.write_bytes(world["uploads"]["strict/moon.jpg"])
    fx = FeatureExtractor(None)
    rep = explain([str(p), str(q)], open_gallery(run["store"], fx), fx)
    h = rep.explanations[0].hashes
    hit = next(x for x in h.hits if x.bank == "pdq_list")
    assert (h.signal, h.bank, hit.max_distance, hit.list_entry_id) == ("pdq", "pdq_list", 40, "TE-7")
    assert hit.distance == run["df"].loc["pdq/chelsea-color.jpg", "pdq_distance"] and hit.list_metadata["program"] == "te"
    assert rep.explanations[1].hashes.below_quality == ("strict",)
    text = render_table(rep)
    assert "pdq match in pdq_list" in text and "distance" in text and "<= 40" in text and "quality below" in text


def test_gallery_holds_lists_sha256_checked_counted_and_updatable(run) -> None:
    from pipeline import gallery as G

    store = run["store"]
    m = G.read_manifest(store)
    assert {h.bank for h in m.hash_lists} == {"md5_list", "pdq_list", "clock_block", "clock_allow", "strict", "exported"}
    info = G.info(store)
    assert info["hash_lists"]["exported"]["entries"] == 2 and info["banks"]["pdq_list"]["kind"] == "pdq"
    assert G.verify(store)["problems"] == []
    v, st = G.remove(store, bank="exported", entry_ids=[], hashes=[G.export_hashes(store, "refs")[0].hash])
    assert st == {"list_entries_removed": 1, "list_entries": 1}
    assert G.read_manifest(store).banks["exported"].count == 1
    h = next(h for h in G.read_manifest(store).hash_lists if h.bank == "pdq_list")
    vstore = store.child(f"versions/{v}")
    vstore.write_bytes(h.file, vstore.read_bytes(h.file) + b"x")
    with pytest.raises(G.GalleryIntegrityError):
        G.open_gallery(store, None)


def test_older_partitions_read_back_with_the_new_fields_null(tmp_path) -> None:
    import duckdb

    from pipeline.moderation.flags import read_flags
    from pipeline.schemas import FILE_SCHEMA

    new = {"signal", "pdq_distance", "list_entry_id", "list_metadata", "pdq_hash", "pdq_quality"}
    old = pa.schema([f for f in FILE_SCHEMA if f.name not in new | {"decided_by_run", "previous_action"}])
    row = {f.name: None for f in old}
    row.update(image_key="a.jpg", status="clean", action="none", model_version="m", gallery_version="v1",
               run_id="r", processed_at=pd.Timestamp("2025-01-01", tz="UTC"))
    part = tmp_path / "flags" / "dt=2025-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=old), part / "part-0.parquet")
    (part / "_SUCCESS").write_text("{}")
    df = read_flags(str(tmp_path / "flags"), "2025-01-01")
    assert len(df) == 1 and all(df[c].isna().all() for c in new)
    pdf = pd.read_parquet(tmp_path / "flags", filters=[("dt", "=", "2025-01-01")])
    assert len(pdf) == 1 and not (new & set(pdf.columns))  # plain pandas: the columns the file has
    got = duckdb.sql(f"select image_key from read_parquet('{tmp_path}/flags/*/*.parquet', hive_partitioning=true)")
    assert got.fetchall() == [("a.jpg",)]
