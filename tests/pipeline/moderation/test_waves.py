"""pipeline/moderation/waves.py and wave_output.py, jobs/runtime/waves.py and waves_cmd.py (``modscan waves``),
the review page's Waves section and ``gallery add --from-wave``.

Unit tests of the parts (no Ray), then one module-scoped world on a real local Ray cluster: a day
with two planted waves (edited copies of two photos) among unrelated pictures, an unreadable and a
flat upload, moderated by ``modscan moderate``'s own run; the waves pass then runs twice on it,
its Parquet is read back with pandas and DuckDB, its review page is rendered by headless
Chromium, and ``gallery add --from-wave`` followed by ``modscan retro`` flags the wave's members.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from chromium import CHROMIUM, screenshot
from conftest import photo, save_jpeg
from PIL import Image
from planted_waves import DAY, UNRELATED_PHOTOS, WAVES

from models.augment import apply_named
from pipeline.moderation import flags as F
from pipeline.moderation import wave_output as O
from pipeline.moderation import waves as W


# ---------------------------------------------------------------------------------------------
# the parts, without Ray
# ---------------------------------------------------------------------------------------------
def test_clusters_are_components_with_stable_ids_and_ranks_by_upload_time() -> None:
    keys = ["a", "b", "c", "d", "e"]
    edges = [O.Edge(0, 2, 0.4, W.SURE), O.Edge(2, 4, 0.2, W.VERIFIED), O.Edge(1, 3, None, W.SAME_BYTES)]
    t = {0: 30.0, 2: 10.0, 4: 20.0, 1: float("nan")}  # "b" (NaN) and "d" (absent) have no known time
    c = O.assign("2026-01-01", keys, edges, t)
    assert list(c["size"]) == [3, 2, 3, 2, 3]
    assert c["cluster_id"][0] == c["cluster_id"][2] == c["cluster_id"][4] == W.cluster_id("2026-01-01", "a")
    assert c["cluster_id"][1] == c["cluster_id"][3] == W.cluster_id("2026-01-01", "b") != c["cluster_id"][0]
    assert list(c["rank"][[2, 4, 0]]) == [1, 2, 3]          # by upload time
    assert list(c["rank"][[1, 3]]) == [1, 2]                 # both unknown: by key
    assert c["rule"][2] == W.SURE and c["score"][4] == pytest.approx(0.2) and c["rule"][1] == W.SAME_BYTES
    again = O.assign("2026-01-01", keys, list(reversed(edges)), t)  # order of edges does not matter
    assert list(again["cluster_id"]) == list(c["cluster_id"]) and list(again["rank"]) == list(c["rank"])
    assert W.cluster_id("2026-01-02", "a") != W.cluster_id("2026-01-01", "a")  # ids are per partition
    # a partition where nothing was searched (every upload an error or low content): one row each, on its own
    nothing = O.PartitionSignatures([], [], [], np.zeros((0, 128), np.float32))
    t = O.wave_table("2026-01-01", ["b.jpg", "a.jpg"], nothing, O.assign("2026-01-01", [], [], {}), {}, set(), 5, "r", "f")
    assert t.column("image_key").to_pylist() == ["a.jpg", "b.jpg"] and t.column("dup_basis").to_pylist() == [W.NOT_SEARCHED] * 2
    assert t.column("dup_cluster_size").to_pylist() == [1, 1] and not any(t.column("wave").to_pylist())
    O.verify_rows(t, {"a.jpg", "b.jpg"}, "r")
    with pytest.raises(F.CommitError, match="1 unknown"):
        O.verify_rows(t, {"a.jpg"}, "r")


def test_neighbour_search_finds_what_exhaustive_search_finds() -> None:
    import faiss

    g = np.random.default_rng(0)
    x = g.normal(size=(300, 128)).astype(np.float32)
    x[100:110] = x[100] + 0.2 * g.normal(size=(10, 128))  # a family of near-duplicates
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    st = W.NeighbourSearch(faiss.serialize_index(W.feature_index(x)), k=16, threshold=0.5)
    out = st({"id": np.arange(300)})
    a, b, s = W.unique_pairs(out["a"], out["b"], out["coarse"])
    S = x @ x.T
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if S[i, j] >= 0.5}
    assert set(zip(a.tolist(), b.tolist())) == want and len(want) == 45
    assert np.allclose(s, [S[i, j] for i, j in zip(a, b)], atol=1e-5) and (a < b).all()
    assert st({"id": np.zeros(0, np.int64)})["a"].shape == (0,)


def test_the_ivf_index_of_big_partitions_finds_the_families_exact_search_finds_and_reruns_alike() -> None:
    import faiss

    g = np.random.default_rng(1)
    x = g.normal(size=(6000, 128)).astype(np.float32)
    for f in range(20):  # 20 families of 8 near-duplicates
        x[f * 8:(f + 1) * 8] = x[f * 8] + 0.25 * g.normal(size=(8, 128))
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def pairs(flat_max: int) -> set[tuple[int, int]]:
        st = W.NeighbourSearch(faiss.serialize_index(W.feature_index(x, flat_max=flat_max)), k=16, threshold=0.6)
        out = st({"id": np.arange(len(x))})
        a, b, _ = W.unique_pairs(out["a"], out["b"], out["coarse"])
        return set(zip(a.tolist(), b.tolist()))

    exact, ivf = pairs(10_000), pairs(1_000)  # 6,000 uploads: exact, then IVF (309 lists, nprobe 16)
    assert len(exact) == 20 * 28 and exact <= {(i, j) for i in range(160) for j in range(i + 1, 160)}
    assert len(ivf & exact) >= 0.95 * len(exact) and not ivf - exact   # approximate: finds, never invents
    assert pairs(1_000) == ivf                                           # the same on a rerun


def test_sure_threshold_is_sized_for_the_partition_and_params_are_checked() -> None:
    from models.card import read_card
    from pipeline.errors import UsageError
    from pipeline.gallery.calibration import ScoreTails

    card = read_card(None)
    tails = ScoreTails.from_dict(card.scale_tails)
    fine = float(card.thresholds["fine"])
    small, day, big = (W.sure_for_size(tails, n, fine, 0.0005) for n in (100, 10_000, 1_000_000))
    assert fine <= small <= day <= big and big > fine + 0.05
    assert W.sure_for_size(None, 10_000, fine, 0.0005) == fine
    assert W.same_bytes_pairs(["x", None, "y", "x", "x"]) == [(0, 3), (0, 4)]
    with pytest.raises(UsageError, match="wave_min_size"):
        W.WaveParams(wave_min_size=1)
    with pytest.raises(UsageError, match="wave_k"):
        W.WaveParams(k=0)


def test_an_upload_that_cannot_be_read_again_is_a_row_with_its_error_not_a_failure(tmp_path, shipped_model_dir) -> None:
    good = save_jpeg(Image.fromarray(photo("astronaut")), tmp_path / "a.jpg")
    flip = save_jpeg(Image.fromarray(photo("astronaut")[:, ::-1]), tmp_path / "b.jpg")
    gone = str(tmp_path / "deleted-since.jpg")
    out = W.NodeDescriber()({"node": np.asarray([3, 7]), "image_uri": np.asarray([str(good), gone], object)})
    assert out["ok"].tolist() == [True, False] and out["error"].tolist() == ["", "read_error"]
    assert np.linalg.norm(out["fine"][0]) == pytest.approx(1.0, abs=1e-3) and not out["fine"][1].any()
    assert out["uploaded_at"][0] == pytest.approx(good.stat().st_mtime) and np.isnan(out["uploaded_at"][1])
    inl = W.EdgeVerifier()({"a": [0, 0], "b": [1, 2], "uri_a": [str(good)] * 2, "uri_b": [str(flip), gone]})["inliers"]
    assert inl[0] >= 25 and inl[1] == 0  # a mirrored copy is confirmed; a picture that is gone has no keypoints


def test_wave_keys_in_a_job_config_file_are_checked_at_their_line(tmp_path) -> None:
    from jobs.runtime.job_config import JobConfig, JobConfigError

    p = tmp_path / "job.toml"
    p.write_text("[job]\nwaves = true\nwave_min_size = 1\nwave_fine_threshold = 2.0\n")
    with pytest.raises(JobConfigError) as e:
        JobConfig.from_toml(str(p))
    assert f"{p}:3: [job] wave_min_size must be an integer >= 2" in str(e.value)
    assert f"{p}:4: [job] wave_fine_threshold must be a score in [-1, 1]" in str(e.value)
    p.write_text("[job]\nwaves = true\nwave_min_size = 3\n")
    assert JobConfig.from_toml(str(p)).wave_min_size == 3


def test_hourly_partitions_are_clustered_hour_by_hour_and_missing_parts_are_named(tmp_path) -> None:
    from jobs.commands.waves_cmd import partition_arg
    from jobs.runtime.waves import prepare_waves
    from pipeline.errors import ModscanError

    out = tmp_path / "flags"
    (out / "dt=2026-05-05" / "hour=05").mkdir(parents=True)
    (out / "dt=2026-05-05" / "hour=05" / "_SUCCESS").write_text("r\n")
    with pytest.raises(ModscanError, match=r"dt=2026-05-05 is written in hours \(1 committed\).*--hour HH"):
        prepare_waves(str(out), "2026-05-05")
    assert partition_arg("2026-05-05", 5) == "2026-05-05T05" and partition_arg("2026-05-05", None) == "2026-05-05"
    with pytest.raises(ModscanError, match="dt=2026-05-05/hour=05 has no committed signatures.*write_signatures"):
        prepare_waves(str(out), partition_arg("2026-05-05", 5))


# ---------------------------------------------------------------------------------------------
# a moderated day on a real local Ray cluster
# ---------------------------------------------------------------------------------------------
def _make_day(root: Path) -> dict[str, list[str]]:
    """Uploads of DAY: the planted waves, unrelated pictures, an unreadable and a flat file; the
    modification time of each planted member is set so that the wave's first upload is known."""
    from models.synthetic import generate
    from pipeline.evaluation.samples import procedural

    up = root / "uploads"
    planted: dict[str, list[str]] = {}
    base = 1_780_000_000
    for name, edits in WAVES.items():
        im = Image.fromarray(photo(name))
        for i, e in enumerate(edits):
            key = f"{name}-{i:02d}.jpg"
            pic = im if (name == "astronaut" and i == 0) else apply_named(im, e, random.Random(i))
            os.utime(save_jpeg(pic, up / key), (base + 60 * i, base + 60 * i))
            planted.setdefault(name, []).append(key)
    unrelated = []
    for n in UNRELATED_PHOTOS:
        save_jpeg(Image.fromarray(photo(n)), up / f"photo-{n}.jpg")
        unrelated.append(f"photo-{n}.jpg")
    r = random.Random(5)
    for i in range(6):
        save_jpeg(procedural(r, (320, 240)), up / f"procedural-{i}.jpg")
        save_jpeg(generate("waves-test", i)[1], up / f"everyday-{i}.jpg")
        unrelated += [f"procedural-{i}.jpg", f"everyday-{i}.jpg"]
    (up / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    save_jpeg(Image.new("RGB", (300, 200), (120, 160, 200)), up / "flat.jpg")
    return {**planted, "unrelated": unrelated}


@pytest.fixture(scope="module")
def world(tmp_path_factory, shipped_model_dir, ray_cluster):
    from jobs.cli import main
    from jobs.runtime.job_config import JobConfig
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    root = tmp_path_factory.mktemp("waves")
    planted = _make_day(root)
    save_jpeg(Image.fromarray(photo("rocket")), root / "refs" / "violence" / "rocket.jpg")
    save_jpeg(Image.fromarray(photo("chelsea")), root / "refs" / "spam" / "chelsea.jpg")
    banks = [Bank("violence", str(root / "refs" / "violence"), "sensitive/violence", "filter"),
             Bank("spam", str(root / "refs" / "spam"), "low_quality/spam", "downrank")]
    gal = root / "gallery"
    G.build(open_store(str(gal), create=True), banks, read_card(None), local_extractor(None), n_shards=1)
    # `modscan moderate` with [job] waves = true: the day's waves are committed right after its flags
    toml = root / "job.toml"
    toml.write_text("[job]\nactors = 1\nbatch_size = 16\nverify_gallery = false\nwaves = true\n")
    out = root / "flags"
    assert main(["moderate", "--input", str(root / "uploads"), "--gallery", str(gal), "--output", str(out),
                 "--date", DAY, "--config", str(toml)]) == 0
    info = F.read_run(open_store(str(out)), DAY)
    assert info["inputs"] == sum(len(v) for v in planted.values()) + 2
    waves_run = F.read_run(open_store(O.waves_root(str(out))), DAY)
    assert waves_run["flags_run_id"] == info["run_id"] and waves_run["waves"] == 2
    return {"root": root, "planted": planted, "gallery": gal, "out": out, "cfg": JobConfig.from_toml(str(toml)),
            "flags_info": info}


@pytest.fixture(scope="module")
def passes(world):
    """The day's waves as `modscan moderate` committed them ([job] waves), then a rerun by `modscan waves`."""
    import contextlib
    import io
    import json

    from jobs.cli import main
    from pipeline.ingest.storage import open_store

    first = F.read_run(open_store(O.waves_root(str(world["out"]))), DAY)
    df1 = O.read_waves(O.waves_root(str(world["out"])), DAY)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["waves", "--output", str(world["out"]), "--date", DAY, "--actors", "1", "--json"]) == 0
    second = json.loads(buf.getvalue())
    df2 = O.read_waves(O.waves_root(str(world["out"])), DAY)
    return {"first": first, "second": second, "df1": df1, "df2": df2}


def _cluster_of(df, keys: list[str]) -> str:
    """The cluster most of ``keys`` landed in."""
    ids = df.set_index("image_key").loc[keys, "dup_cluster_id"]
    return str(ids.value_counts().index[0])


def test_planted_waves_are_found_and_nothing_unrelated_joins_them(world, passes) -> None:
    df, planted = passes["df1"], world["planted"]
    found, total = 0, 0
    wave_ids = []
    for name in WAVES:
        cid = _cluster_of(df, planted[name])
        wave_ids.append(cid)
        members = df[df["dup_cluster_id"] == cid]
        found += int(members["image_key"].isin(planted[name]).sum())
        total += len(planted[name])
        assert set(members["image_key"]) <= set(planted[name]), f"unrelated uploads merged into wave {name}"
        assert members["wave"].all() and (members["dup_cluster_size"] == len(members)).all()
        assert sorted(members["dup_rank"]) == list(range(1, len(members) + 1))
    assert found / total >= 0.95, (found, total)
    assert len(set(wave_ids)) == 2  # two distinct waves, not merged
    first_astronaut = df.set_index("image_key").loc["astronaut-00.jpg"]
    assert first_astronaut["dup_rank"] == 1 and first_astronaut["uploaded_at"].timestamp() == 1_780_000_000
    # every unrelated upload is in no wave
    others = df[df["image_key"].isin(planted["unrelated"])]
    assert not others["wave"].any() and (others["dup_basis"] == W.SEARCHED).all()
    info = passes["first"]
    assert info["waves"] == 2 and info["uploads_in_waves"] == found and info["candidate_pairs"] > 0


def test_one_row_per_upload_identical_ids_on_rerun_read_by_pandas_and_duckdb(world, passes) -> None:
    import duckdb
    import pandas as pd

    df1, df2 = passes["df1"], passes["df2"]
    flags = F.read_flags(str(world["out"]), DAY)
    assert sorted(df1["image_key"]) == sorted(flags["image_key"]) and df1["image_key"].is_unique
    cols = ["image_key", "dup_cluster_id", "dup_cluster_size", "dup_rank", "wave"]
    pd.testing.assert_frame_equal(df1[cols].sort_values("image_key").reset_index(drop=True),
                                  df2[cols].sort_values("image_key").reset_index(drop=True))
    assert passes["first"]["run_id"] != passes["second"]["run_id"]
    by_key = df1.set_index("image_key")
    assert by_key.loc["broken.jpg", "dup_basis"] == W.NOT_SEARCHED and by_key.loc["flat.jpg", "dup_cluster_size"] == 1
    root = O.waves_root(str(world["out"]))
    part = Path(root) / f"dt={DAY}"
    assert (part / "_SUCCESS").exists() and len(list(part.glob("*.parquet"))) == 1
    assert not (Path(root) / "_staging").exists()  # cleaned up after the commit
    # the recommender's reads: pandas over the root with a dt filter, DuckDB with hive partitioning
    pdf = pd.read_parquet(root, filters=[("dt", "=", DAY)])
    assert len(pdf) == len(flags)
    q = f"""SELECT f.image_key, f.action, w.dup_rank FROM read_parquet('{world['out']}/dt=*/*.parquet', hive_partitioning=true) f
            JOIN read_parquet('{root}/dt=*/*.parquet', hive_partitioning=true) w USING (dt, image_key)
            WHERE f.dt = '{DAY}' AND (w.dup_rank = 1)"""
    firsts = duckdb.sql(q).df()
    assert len(firsts) == df1["dup_cluster_id"].nunique()


def test_a_commit_that_fails_verification_publishes_nothing(world, passes) -> None:
    from pipeline.ingest.storage import open_store

    wstore = open_store(O.waves_root(str(world["out"])))
    before = O.read_waves(wstore.uri, DAY)
    t = pa.Table.from_pandas(before.iloc[:-1], preserve_index=False)  # one upload lost
    with pytest.raises(F.CommitError, match="1 without one"):
        O.commit_waves(wstore, DAY, F.compact(DAY) + "T000000-lost0000", t, set(before["image_key"]), {})
    after = O.read_waves(wstore.uri, DAY)
    assert after.equals(before) and not wstore.exists(F.staging_key(F.compact(DAY) + "T000000-lost0000"))


def test_errors_name_what_is_missing(world, tmp_path) -> None:
    from jobs.runtime.waves import prepare_waves
    from pipeline.errors import ModscanError

    with pytest.raises(ModscanError, match="no committed flags partition.*run `modscan moderate`"):
        prepare_waves(str(world["out"]), "2026-05-04")
    with pytest.raises(ModscanError, match="not an hour"):
        prepare_waves(str(world["out"]), "2026-05-03T1")


# ---------------------------------------------------------------------------------------------
# the review page's Waves section (re-written by the waves pass), rendered by headless Chromium
# ---------------------------------------------------------------------------------------------
def _review_page(world) -> str:
    run_id = world["flags_info"]["run_id"]
    return (world["out"] / "_reviews" / f"dt={DAY}" / f"review-{run_id}.html").read_text()


def _wave_rows(page: str) -> dict[str, str]:
    """wave id -> its table row in the Waves section."""
    import re

    return {m.group(1): m.group(0) for m in re.finditer(r'<tr class="wave">.*?wave <code>([0-9a-f]{16})</code>.*?</tr>', page)}


def test_review_page_shows_each_wave_with_its_size_and_members_sensitive_ones_blurred(world, passes) -> None:
    page, df = _review_page(world), passes["df1"]
    assert "<h2>Waves (2 clusters of near-duplicate uploads, 14 uploads)</h2>" in page
    rows = _wave_rows(page)
    astronaut, rocket = (_cluster_of(df, world["planted"][n]) for n in ("astronaut", "rocket"))
    assert set(rows) == {astronaut, rocket}
    assert "<b>8</b> uploads" in rows[astronaut] and "<b>6</b> uploads" in rows[rocket]
    assert "first: <code>astronaut-00.jpg</code>" in rows[astronaut]  # the first upload represents the wave
    assert rows[astronaut].count('src="data:image/jpeg;base64,') == 7  # the first + a sample of 6
    assert f"--from-wave {astronaut} --flags OUTPUT --date {DAY}" in rows[astronaut]
    # the rocket wave matched the sensitive bank: every thumbnail of it blurred; the astronaut wave's not
    assert rows[rocket].count('class="sens"') == rows[rocket].count("<img") == 6 and 'class="sens"' not in rows[astronaut]
    assert "filter 6" in rows[rocket] and "none 8" in rows[astronaut]


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: apt-get install chromium)")
def test_waves_section_in_headless_chromium(world, passes, tmp_path) -> None:
    from pipeline.ops.review_page import CSS

    page = _review_page(world)
    start = page.index("<h2>Waves")
    section = page[start:page.index("</table>", start) + len("</table>")]
    doc = f'<!doctype html><html><head><meta charset="utf-8"><style>{CSS}</style></head><body>{section}</body></html>'
    (tmp_path / "waves.html").write_text(doc)
    (tmp_path / "revealed.html").write_text(doc.replace('<input type="checkbox">', '<input type="checkbox" checked>'))
    blurred = np.asarray(screenshot(tmp_path / "waves.html", tmp_path / "blurred.png", (1280, 900)), np.int16)
    revealed = np.asarray(screenshot(tmp_path / "revealed.html", tmp_path / "revealed.png", (1280, 900)), np.int16)
    # the section is drawn: thumbnails in colour (the astronaut wave is not sensitive)
    spread = blurred.max(axis=2) - blurred.min(axis=2)
    assert (spread > 40).mean() > 0.02
    # clicking reveals the sensitive wave's thumbnails: grey when blurred, in colour when revealed
    diff = np.abs(blurred - revealed).max(axis=2) > 16
    assert diff.mean() > 0.02
    grey = lambda a: float((a.max(axis=2) - a.min(axis=2))[diff].mean())
    assert grey(blurred) < 2 and grey(revealed) > 5


# ---------------------------------------------------------------------------------------------
# gallery add --from-wave, then retro (last: it re-commits the day's flags)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gallery_add_from_wave_then_retro_flags_the_waves_members(world, passes, capsys) -> None:
    from jobs.cli import main
    from pipeline.gallery.audit import read_log
    from pipeline.ingest.storage import open_store

    df, planted = passes["df1"], world["planted"]
    cid = _cluster_of(df, planted["astronaut"])
    before = F.read_flags(str(world["out"]), DAY).set_index("image_key")
    assert (before.loc[planted["astronaut"], "action"] == "none").all()  # nothing in the gallery matched them
    gal, out = str(world["gallery"]), str(world["out"])
    assert main(["gallery", "add", gal, "--bank", "spam", "--from-wave", "0123456789abcdef", "--flags", out,
                 "--date", DAY]) == 2
    assert "no cluster '0123456789abcdef' in the committed waves of dt=2026-05-03" in capsys.readouterr().err
    assert main(["gallery", "add", gal, "--bank", "spam", "--from-wave", cid]) == 2
    assert "--from-wave needs --flags" in capsys.readouterr().err
    assert main(["gallery", "add", gal, "--bank", "spam", "--from-wave", cid, "--flags", out, "--date", DAY,
                 "--who", "ops-anna", "--note", "campaign seen on the review page"]) == 0
    rec = read_log(open_store(gal))[-1]
    assert rec.action == "add" and rec.who == "ops-anna" and rec.version == "v000002"
    assert f"from wave {cid} of {DAY} (8 uploads; representative astronaut-00.jpg" in rec.note
    assert rec.note.startswith("campaign seen on the review page; ") and rec.details["added"] == 1
    capsys.readouterr()
    assert main(["retro", "--gallery", gal, "--since", "v000001", "--from", DAY, "--to", DAY, "--output", out]) == 0
    after = F.read_flags(out, DAY).set_index("image_key")
    members = after.loc[planted["astronaut"]]
    assert (members["action"] == "downrank").all() and (members["bank"] == "spam").all()
    assert members["decided_by_run"].notna().all() and (members["previous_action"] == "none").all()
    others = [k for k in after.index if k not in planted["astronaut"]]
    assert after.loc[others, "action"].equals(before.loc[others, "action"])  # nothing else changed

