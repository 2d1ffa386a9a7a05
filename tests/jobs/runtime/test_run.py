"""jobs/runtime/run.py and jobs/commands/moderate_cmd.py end to end on a real local Ray cluster against a real S3 endpoint (moto server).

A gallery of three banks is built from S3 with Ray actors; a day of uploads (edited copies of
gallery images, unrelated photos, every Pillow mode of the shared edge cases, broken files, odd
keys) is moderated into a Parquet partition on S3, read back with pandas and DuckDB.
"""

from __future__ import annotations

import io
import random
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, jpeg_bytes, photo, png_bytes, restart_ray
from PIL import Image
from s3server import moto_server

from models.augment import apply_named
from pipeline.moderation import flags as F

GALLERY = {"violence": ["astronaut", "rocket"], "spam": ["coffee", "chelsea"], "fp": ["camera"]}
ALSO_BLOCKED = {"camera": "violence"}  # camera is in an allow-list AND a blocking bank
COPY_EDITS = [["color"], ["rescale_jpeg"], ["text"], ["flip"], ["crop"], ["grayscale"], ["frame_caption"]]
UNRELATED = ["hubble_deep_field", "immunohistochemistry", "moon", "coins", "clock", "brick", "grass", "gravel",
             "page", "colorwheel"]
DAY = "2026-03-01"


def _uploads() -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, expectation) with expectation 'bank:<name>', 'clean', 'allow', 'ok' or an error code."""
    rng = random.Random(7)
    up: dict[str, tuple[bytes, str]] = {}
    for bank, names in GALLERY.items():
        for n in names:
            for j, edits in enumerate(COPY_EDITS):
                im = apply_named(Image.fromarray(photo(n)), edits, rng)
                exp = "allow" if bank == "fp" else f"bank:{bank}"
                up[f"copies/{n}-{j}-{'+'.join(edits)}.jpg"] = (jpeg_bytes(im), exp)
    for n in UNRELATED:
        up[f"other/{n}.jpg"] = (jpeg_bytes(Image.fromarray(photo(n))), "clean")
    good = jpeg_bytes(Image.fromarray(photo("astronaut")))
    up["broken/truncated.jpg"] = (good[: len(good) // 3], "truncated")
    up["broken/zero.jpg"] = (b"", "empty_file")
    up["broken/not-an-image.jpg"] = (b"%PDF-1.4 not really", "not_an_image")
    up["broken/random.jpg"] = (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image")
    up["broken/one-pixel.png"] = (png_bytes(Image.new("RGB", (1, 1))), "image_too_small")
    frames = [Image.fromarray(photo("horse")), Image.new("RGB", (400, 328), (0, 0, 0))]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    up["odd/animated.gif"] = (b.getvalue(), "ok")
    up["odd/with space ü 图片.jpg"] = (jpeg_bytes(Image.fromarray(photo("moon"))), "clean")
    up["odd/<img src=x onerror=alert(1)>.jpg"] = (jpeg_bytes(apply_named(Image.fromarray(photo("rocket")), ["color"], rng)),
                                                 "bank:violence")
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 90000, 90000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    up["broken/bomb.png"] = (bomb, "decompression_bomb")
    modes = SHARED / "edge-cases" / "image-modes"
    if modes.is_dir():
        for f in sorted(modes.iterdir()):
            up[f"modes/{f.name}"] = (f.read_bytes(), "not_an_image" if f.suffix == ".md" else "ok")
    return up


@pytest.fixture(scope="module")
def world(tmp_path_factory, shipped_model_dir):
    import boto3
    import ray

    tmp = tmp_path_factory.mktemp("e2e")
    with moto_server() as endpoint:
        restart_ray()
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for b in ("refs-e2e", "uploads-e2e", "gallery-e2e", "flags-e2e"):
            s3.create_bucket(Bucket=b)
        for bank, names in GALLERY.items():
            for n in names:
                s3.put_object(Bucket="refs-e2e", Key=f"{bank}/{n}.jpg", Body=jpeg_bytes(Image.fromarray(photo(n)), 95))
        for n, bank in ALSO_BLOCKED.items():
            s3.put_object(Bucket="refs-e2e", Key=f"{bank}/{n}.jpg", Body=jpeg_bytes(Image.fromarray(photo(n)), 95))
        up = _uploads()
        # include_paths keys are listed by the job: put objects with keys that need no escaping tricks
        for k, (data, _) in up.items():
            s3.put_object(Bucket="uploads-e2e", Key=f"{DAY}/{k}", Body=data)
        banks = tmp / "banks.toml"
        banks.write_text("\n".join(
            f'[[bank]]\nname = "{b}"\nsource = "s3://refs-e2e/{b}/"\ncategory = "{c}"\naction = "{a}"\n'
            for b, c, a in (("violence", "sensitive/violence", "filter"), ("spam", "low_quality/spam", "downrank"),
                            ("fp", "allow/known_fp", "allow"))))
        yield {"endpoint": endpoint, "s3": s3, "uploads": up, "banks": banks, "tmp": tmp}
        ray.shutdown()


@pytest.fixture(scope="module")
def gallery(world):
    from jobs.commands.gallery_cmd import ray_extractor
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import load_banks
    from pipeline.ingest.storage import open_store

    v, stats = G.build(open_store("s3://gallery-e2e/main"), load_banks(world["banks"]), read_card(None),
                       ray_extractor(None), n_shards=3)
    assert stats["violence"]["added"] == 3 and stats["fp"]["new_membership"] == 1
    return "s3://gallery-e2e/main"


@pytest.fixture(scope="module")
def first_run(world, gallery):
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    info = moderate(f"s3://uploads-e2e/{DAY}/", gallery, "s3://flags-e2e/flags", DAY, cfg=JobConfig(batch_size=16))
    return info


def _read_partition(dt: str) -> pd.DataFrame:
    from pipeline.ingest.storage import open_store

    st = open_store("s3://flags-e2e/flags")
    t = pq.read_table(st.path(f"dt={dt}"), filesystem=st.fs)
    return t.to_pandas()


def test_one_row_per_upload_with_the_right_decisions(world, first_run) -> None:
    up = world["uploads"]
    df = _read_partition(DAY)
    assert len(df) == len(up) and df["image_key"].is_unique
    assert set(df["image_key"]) == set(up)
    by = df.set_index("image_key")
    wrong = []
    for k, (_, exp) in up.items():
        r = by.loc[k]
        if exp.startswith("bank:"):
            bank = exp[5:]
            action = {"violence": "filter", "spam": "downrank"}[bank]
            if not (r.status == "matched" and r.bank == bank and r.action == action):
                wrong.append((k, exp, r.status, r.bank, r.fine_score))
        elif exp == "allow":
            if not (r.status == "clean" and r.action == "none"):
                wrong.append((k, exp, r.status, r.bank, r.fine_score))
        elif exp == "clean":
            if r.status != "clean":
                wrong.append((k, exp, r.status, r.bank, r.fine_score))
        elif exp == "ok":
            if r.status == "error":
                wrong.append((k, exp, r.error_code, r.error_message))
        else:
            if not (r.status == "error" and r.error_code == exp and r.action == "none"):
                wrong.append((k, exp, r.status, r.error_code))
    copies = [k for k, (_, e) in up.items() if e.startswith("bank:")]
    copy_misses = [w for w in wrong if w[0] in copies]
    other = [w for w in wrong if w[0] not in copies]
    assert not other, other
    # edited copies: the evaluation measures recall at the operating threshold per edit (README,
    # coco256): 0.85-0.89 for rescale+JPEG/flip, 0.82 frame+caption, 0.63 text, ~0.5 for colour,
    # crop and grayscale. Over these seven edits that is ~0.7: at least 60 % must be flagged
    assert len(copy_misses) <= int(0.4 * len(copies)), copy_misses
    assert (df["model_version"] == first_run["model_version"]).all()
    assert (df["gallery_version"] == "v000001").all()


def test_run_json_success_marker_and_counts(world, gallery, first_run) -> None:
    import json

    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

    s3 = world["s3"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="flags-e2e", Prefix=f"flags/dt={DAY}/")["Contents"]}
    assert f"flags/dt={DAY}/_SUCCESS" in keys and f"flags/dt={DAY}/_run.json" in keys
    run = json.loads(s3.get_object(Bucket="flags-e2e", Key=f"flags/dt={DAY}/_run.json")["Body"].read())
    assert run["inputs"] == len(world["uploads"]) == run["counts"]["rows"]
    assert sum(run["counts"]["by_status"].values()) == run["inputs"]
    assert run["counts"]["by_error_code"]["not_an_image"] >= 2
    # survivors: exactly the uploads with a coarse candidate at or above the gallery's coarse
    # threshold (their rows carry that coarse score; every other row has none); fewer than decoded
    df = _read_partition(DAY)
    thr = G.read_manifest(open_store(gallery), run["gallery_version"]).model.coarse_threshold
    scored = df["coarse_score"].dropna()
    assert (scored >= thr).all(), scored[scored < thr]
    assert run["survivors"] == int((df["coarse_score"] >= thr).sum()) == len(scored)
    assert run["decoded"] == int((df["status"] != "error").sum())
    assert 0 < run["survivors"] < run["decoded"]
    text = json.dumps(run)
    assert "testing-secret-value-xyz" not in text and "testing-key-id" not in text
    staged = [o["Key"] for o in s3.list_objects_v2(Bucket="flags-e2e", Prefix="flags/_staging/").get("Contents", [])]
    assert staged == [], staged


def test_pandas_and_duckdb_read_the_hive_partition(world, first_run) -> None:
    from pipeline.moderation.flags import read_flags

    df = read_flags("s3://flags-e2e/flags")
    assert set(df["dt"]) == {DAY} and len(df) == len(world["uploads"])
    review = first_run.get("review")
    assert review and review.startswith(f"s3://flags-e2e/flags/_reviews/dt={DAY}/review-")
    page = world["s3"].get_object(Bucket="flags-e2e", Key=review[len("s3://flags-e2e/"):])["Body"].read().decode()
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page and "<img src=x" not in page
    assert page.count("data:image/jpeg;base64,") >= 2 and "testing-secret-value-xyz" not in page


def test_rerun_of_the_same_date_replaces_the_partition(world, gallery, first_run) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    before = _read_partition(DAY).sort_values("image_key").reset_index(drop=True)
    info = moderate(f"s3://uploads-e2e/{DAY}/", gallery, "s3://flags-e2e/flags", DAY, cfg=JobConfig(batch_size=16),
                    review=False)
    after = _read_partition(DAY).sort_values("image_key").reset_index(drop=True)
    assert len(after) == len(before) and after["image_key"].is_unique
    assert (after["run_id"] == info["run_id"]).all() and info["run_id"] != first_run["run_id"]
    cols = ["image_key", "status", "action", "bank", "reference_id", "error_code"]
    pd.testing.assert_frame_equal(before[cols], after[cols])


def test_manifest_input_with_a_missing_key(world, gallery) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    s3 = world["s3"]
    keys = [f"s3://uploads-e2e/{DAY}/other/moon.jpg", f"s3://uploads-e2e/{DAY}/copies/astronaut-3-flip.jpg",
            f"s3://uploads-e2e/{DAY}/gone/deleted.jpg", "s3://uploads-e2e/private/secret.jpg", "local.jpg"]
    s3.put_object(Bucket="uploads-e2e", Key="private/secret.jpg", Body=world["uploads"]["other/moon.jpg"][0])
    s3.put_object(Bucket="uploads-e2e", Key="manifests/local.jpg", Body=world["uploads"]["other/moon.jpg"][0])
    b = io.BytesIO()
    pd.DataFrame({"key": keys}).to_parquet(b)
    s3.put_object(Bucket="uploads-e2e", Key="manifests/m.parquet", Body=b.getvalue())
    # full URIs outside the manifest's prefix are read only under allowed_input_prefixes
    moderate("s3://uploads-e2e/manifests/m.parquet", gallery, "s3://flags-e2e/manifest-run", "2026-03-02",
             cfg=JobConfig(batch_size=16, allowed_input_prefixes=(f"s3://uploads-e2e/{DAY}/",)), review=False)
    from pipeline.moderation.flags import read_flags

    df = read_flags("s3://flags-e2e/manifest-run").set_index("image_key")
    assert len(df) == 5
    assert df.loc[keys[2], "status"] == "error" and df.loc[keys[2], "error_code"] == "read_error"
    assert df.loc[keys[0], "status"] == "clean" and df.loc["local.jpg", "status"] == "clean"
    assert df.loc[keys[1], "status"] == "matched" and df.loc[keys[1], "bank"] == "violence"
    assert df.loc[keys[3], "error_code"] == "forbidden_key" and pd.isna(df.loc[keys[3], "image_sha256"])


@pytest.mark.slow
def test_backfill_three_days_and_resume_after_a_deleted_partition(world, gallery) -> None:
    from jobs.commands.moderate_cmd import backfill
    from jobs.runtime.job_config import JobConfig
    from pipeline.ingest.storage import open_store

    tmp = world["tmp"]
    src = tmp / "uploads"
    for i, d in enumerate(("2026-04-01", "2026-04-02", "2026-04-03")):
        (src / d).mkdir(parents=True)
        for n in UNRELATED[i * 3:(i + 1) * 3]:
            (src / d / f"{n}.jpg").write_bytes(jpeg_bytes(Image.fromarray(photo(n))))
        (src / d / "copy.jpg").write_bytes(jpeg_bytes(apply_named(Image.fromarray(photo("rocket")), ["flip"], random.Random(i))))
    out = str(tmp / "flags")
    cfg = JobConfig(batch_size=16)
    res = backfill(str(src) + "/{date}", gallery, out, "2026-04-01", "2026-04-03", cfg=cfg)
    assert list(res.values()) == ["done"] * 3
    st = open_store(out)
    runs = {d: F.read_run(st, d)["run_id"] for d in res}
    shutil.rmtree(tmp / "flags" / "dt=2026-04-02")
    res2 = backfill(str(src) + "/{date}", gallery, out, "2026-04-01", "2026-04-03", cfg=cfg)
    assert res2 == {"2026-04-01": "skipped (committed)", "2026-04-02": "done", "2026-04-03": "skipped (committed)"}
    assert F.read_run(st, "2026-04-01")["run_id"] == runs["2026-04-01"]
    df = pd.read_parquet(out)
    assert sorted(df["dt"].astype(str).unique()) == ["2026-04-01", "2026-04-02", "2026-04-03"]
    assert len(df) == 12 and df.groupby("dt", observed=True)["image_key"].apply(lambda s: s.is_unique).all()
    assert (df[df["image_key"] == "copy.jpg"]["bank"] == "violence").all()
    import duckdb

    n = duckdb.sql(f"select count(*) from read_parquet('{out}/dt=*/*.parquet', hive_partitioning=true) "
                   "where action = 'filter'").fetchall()[0][0]
    assert n == 3
