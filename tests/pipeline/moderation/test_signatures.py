"""Signatures: the features a run keeps per upload for ``modscan retro``.

Unit parts without Ray (encoding, deterministic side-file names, verification, old partitions
read back with the new flag columns null), and one moderation run on a real local Ray cluster:
signatures written by the actors, verified and committed with ``_SUCCESS``, read back with
pandas and DuckDB and equal (to float16) to the features the model computes; with
``write_signatures = false`` none are written.
"""

from __future__ import annotations

import random

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import photo
from PIL import Image

from pipeline.ingest.storage import open_store
from pipeline.moderation import flags as F
from pipeline.moderation import signatures as S
from pipeline.schemas import FILE_SCHEMA, SIGNATURE_SCHEMA

DAY = "2026-04-02"


def test_features_round_trip_as_float16_bytes() -> None:
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    enc = S.encode_features(x)
    assert all(len(b) == 256 for b in enc)
    back = S.decode_features(pa.array(enc, pa.binary(256)))
    np.testing.assert_allclose(back, x.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError):
        S.encode_features(x[:, :64])


def test_a_retried_batch_overwrites_its_file_and_verification_is_exact(tmp_path) -> None:
    sig = open_store(str(tmp_path / "sig"), create=True)
    w = S.SignatureWriter(S.staging_data_uri(sig, "20260402T000000-aaaa"), "20260402T000000-aaaa", "m1")
    batch = {"image_key": np.array(["a", "b", "c"], object), "image_sha256": np.array(["1", "2", "3"], object),
             "image_uri": np.array(["s3://u/a", "s3://u/b", "s3://u/c"], object)}
    feats = np.ones((2, 128), np.float32) / np.sqrt(128)
    n1 = w.write(batch, np.array([0, 2]), feats)
    n2 = w.write(batch, np.array([0, 2]), feats)  # a Ray retry of the same batch
    assert n1 == n2 and n1 == S.batch_file_name(["a", "c"])
    counts = S.verify_signatures(sig, "20260402T000000-aaaa", {"a", "c"})
    assert counts["rows"] == 2 and counts["files"] == 1
    with pytest.raises(F.CommitError, match="without one"):
        S.verify_signatures(sig, "20260402T000000-aaaa", {"a", "b", "c"})
    t = pq.read_table(sig.path(f"_staging/20260402T000000-aaaa/data/{n1}"))
    assert t.schema.equals(SIGNATURE_SCHEMA) and t.column("image_uri").to_pylist() == ["s3://u/a", "s3://u/c"]


def test_older_partitions_read_back_with_the_new_columns_null(tmp_path) -> None:
    old_schema = pa.schema([f for f in FILE_SCHEMA if f.name not in ("decided_by_run", "previous_action")])
    root = tmp_path / "flags"
    for dt, schema in (("2026-01-01", old_schema), ("2026-01-02", FILE_SCHEMA)):
        n = 3
        cols = {f.name: [None] * n for f in schema}
        cols.update(image_key=[f"k{i}" for i in range(n)], status=["clean"] * n, action=["none"] * n,
                    model_version=["m"] * n, gallery_version=["v1"] * n, run_id=["r"] * n,
                    processed_at=[pd.Timestamp("2026-01-01", tz="UTC")] * n)
        if "decided_by_run" in cols:
            cols.update(decided_by_run=["retro-1", None, None], previous_action=["filter", None, None])
        (root / f"dt={dt}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pydict(cols, schema=schema), root / f"dt={dt}" / "part-0.parquet")
        (root / f"dt={dt}" / "_SUCCESS").write_text("r\n")
    df = F.read_flags(str(root))
    assert len(df) == 6 and df["decided_by_run"].notna().sum() == 1
    for dt in ("2026-01-01", "2026-01-02"):
        assert len(pd.read_parquet(root, filters=[("dt", "=", dt)])) == 3
    # the README's DuckDB query, as it is (the first file's columns), and the new columns with union_by_name
    rows = duckdb.sql(f"SELECT image_key, action, bank, fine_score FROM read_parquet('{root}/dt=*/*.parquet', "
                      f"hive_partitioning = true)").fetchall()
    assert len(rows) == 6
    n, retro = duckdb.sql(f"SELECT count(*), count(decided_by_run) FROM read_parquet('{root}/dt=*/*.parquet', "
                          f"hive_partitioning = true, union_by_name = true)").fetchall()[0]
    assert (n, retro) == (6, 1)


@pytest.fixture(scope="module")
def day(tmp_path_factory, shipped_model_dir):
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.evaluation.samples import procedural
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor

    tmp = tmp_path_factory.mktemp("sig")
    (tmp / "refs").mkdir()
    Image.fromarray(photo("rocket")).save(tmp / "refs" / "rocket.jpg")
    up = tmp / "up"
    up.mkdir()
    rng = random.Random(1)
    for i in range(10):
        procedural(rng, (200, 150)).save(up / f"img-{i}.jpg", quality=85)
    Image.fromarray(photo("rocket")).save(up / "rocket-copy.jpg", quality=80)
    Image.new("RGB", (200, 150), (128, 128, 128)).save(up / "flat.png")   # low content: no signature
    (up / "broken.jpg").write_bytes(b"not an image")                       # error: no signature
    G.build(open_store(str(tmp / "gal"), create=True), [Bank("v", str(tmp / "refs"), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    return tmp


def test_signatures_written_committed_and_verified(day, ray_cluster) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate
    from pipeline.features import FeatureExtractor
    from pipeline.ingest.decode import DecodeConfig, Decoder

    info = moderate(str(day / "up"), str(day / "gal"), str(day / "flags"), DAY, cfg=JobConfig(batch_size=4),
                    review=False)
    part = day / "flags" / "_signatures" / f"dt={DAY}"
    assert (part / "_SUCCESS").read_text().strip() == info["run_id"] and (part / "_run.json").exists()
    flags = F.read_flags(str(day / "flags"), DAY)
    searched = set(flags.loc[flags["status"].isin(["matched", "clean"]), "image_key"])
    sig = pd.read_parquet(day / "flags" / "_signatures", filters=[("dt", "=", DAY)])
    assert set(sig["image_key"]) == searched and sig["image_key"].is_unique and len(searched) == 11
    assert {"flat.png", "broken.jpg"}.isdisjoint(set(sig["image_key"]))
    assert (sig["run_id"] == info["run_id"]).all() and (sig["model_version"] == info["model_version"]).all()
    assert set(sig["image_uri"]) == {str(day / "up" / k) for k in searched}
    assert info["signatures"]["rows"] == 11 and 256 < info["signatures"]["bytes_per_upload"] < 2000
    n = duckdb.sql(f"SELECT count(*), min(octet_length(coarse_feature)) FROM read_parquet("
                   f"'{day}/flags/_signatures/*/*.parquet', hive_partitioning = true)").fetchall()[0]
    assert n == (11, 256)
    # the stored feature is the model's low-res query feature of the same bytes, to float16
    fx = FeatureExtractor(None)
    row = sig.set_index("image_key").loc["rocket-copy.jpg"]
    dec = Decoder(DecodeConfig.for_model(fx.config))({"image_key": np.array(["k"], object),
                                                      "bytes": np.array([(day / "up" / "rocket-copy.jpg").read_bytes()],
                                                                        object)})
    np.testing.assert_allclose(S.decode_features([row["coarse_feature"]])[0], fx.query_coarse(dec["low"])[0], atol=2e-3)
    assert not (day / "flags" / "_signatures" / "_staging").exists()


def test_write_signatures_false_writes_none(day, ray_cluster) -> None:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate

    info = moderate(str(day / "up"), str(day / "gal"), str(day / "flags-off"), DAY,
                    cfg=JobConfig(batch_size=8, write_signatures=False), review=False)
    assert "signatures" not in info and (day / "flags-off" / f"dt={DAY}" / "_SUCCESS").exists()
    assert not (day / "flags-off" / "_signatures").exists()
