"""Gallery versions: round trip, checksums, add/remove, allow-list precedence, bank files, S3."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import photo
from PIL import Image

from models.card import read_card
from pipeline import gallery as G
from pipeline.gallery.banks import Bank, BankFileError, parse_banks
from pipeline.ingest.storage import open_store

NAMES = ["astronaut", "rocket", "coffee", "camera", "chelsea", "horse"]


def _write_refs(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(photo(n)).save(root / f"{n}.png")
    return root


@pytest.fixture()
def built(tmp_path, tiny_model_dir):
    from jobs.gallery_cmd import local_extractor

    a = _write_refs(tmp_path / "a", NAMES[:3])
    b = _write_refs(tmp_path / "b", NAMES[2:4])  # coffee is in both banks
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    banks = [Bank("aa", str(a), "sensitive/x", "filter"), Bank("bb", str(b), "low_quality/spam", "downrank")]
    card = read_card(tiny_model_dir)
    store = open_store(str(tmp_path / "gal"), create=True)
    extract = local_extractor(str(tiny_model_dir))
    v, stats = G.build(store, banks, card, extract, n_shards=3)
    return store, card, extract, v, stats, tmp_path


def test_build_dedupes_by_sha_and_records_rejects(built) -> None:
    store, card, _, v, stats, _ = built
    assert v == "v000001" and G.current_version(store) == v
    assert stats["aa"]["added"] == 3 and stats["bb"]["added"] == 1 and stats["bb"]["new_membership"] == 1
    assert stats["bb"]["rejected"] == 1  # broken.jpg (notes.txt is not an image file: not listed)
    inf = G.info(store)
    assert inf["counts"] == {"images": 4, "memberships": 5}
    assert inf["banks"]["aa"]["count"] == 3 and inf["banks"]["bb"]["count"] == 2
    assert inf["model_id"] == card.version_id and inf["rejected"] == 1
    m = G.read_manifest(store)
    assert m.rejected[0].error_code == "truncated"


def test_load_round_trip_and_self_match(built) -> None:
    store, card, extract, *_ = built
    gal = G.open_gallery(store, G.ModelRef(card.version_id))
    _, content = G.read_content(store)
    # querying the gallery vectors themselves returns each id first, with cosine ~1
    D, I = gal.cascade.search_coarse(content.coarse, 5, -1.0)
    assert np.array_equal(I[:, 0], content.ids) and np.allclose(D[:, 0], 1.0, atol=1e-5)
    F = gal.cascade.score_fine(content.rerank, I)
    assert np.allclose(F[:, 0], 1.0, atol=2e-3)  # float16 storage


def test_tampered_shard_is_a_checksum_error(built) -> None:
    store, card, *_ = built
    p = store.path("versions/v000001/shard-001.rerank.safetensors")
    raw = bytearray(open(p, "rb").read())
    raw[-3] ^= 0x55
    open(p, "wb").write(bytes(raw))
    with pytest.raises(G.GalleryIntegrityError, match="checksum mismatch"):
        G.open_gallery(store, G.ModelRef(card.version_id))


def test_model_mismatch_is_a_clear_error(built) -> None:
    store, *_ = built
    with pytest.raises(G.GalleryModelMismatch, match="rebuild the gallery"):
        G.open_gallery(store, G.ModelRef("resnet18-160x112-000000000000"))


def test_add_and_remove_make_new_versions_without_reextracting(built) -> None:
    store, card, extract, _, _, tmp = built
    calls: list[int] = []

    def counting(uris):
        calls.append(len(uris))
        return extract(uris)

    _, before = G.read_content(store)
    new = _write_refs(tmp / "c", ["horse", "astronaut"])  # astronaut already in bank aa
    v2, st = G.add(store, "aa", G.list_source(str(new)), card, counting)
    assert v2 == "v000002" and calls == [2] and st["added"] == 1 and st["already_present"] == 1
    m2, after = G.read_content(store)
    assert m2.parent == "v000001" and len(after.ids) == 5
    # existing vectors are carried over bit for bit
    keep = np.isin(after.ids, before.ids)
    order = np.argsort(after.ids[keep])
    np.testing.assert_array_equal(after.coarse[keep][order], before.coarse[np.argsort(before.ids)])
    # remove bank bb's membership of coffee: coffee stays (still in aa), camera's vectors go
    v3, st3 = G.remove(store, card, bank="bb")
    assert v3 == "v000003" and st3 == {"memberships_removed": 2, "images_dropped": 1}
    inf = G.info(store)
    assert set(inf["banks"]) == {"aa"} and inf["counts"]["images"] == 4
    assert G.list_versions(store) == ["v000001", "v000002", "v000003"]
    # old versions stay readable (immutable)
    assert G.read_manifest(store, "v000001").counts.images == 4


def test_write_version_records_the_model_and_thresholds_it_is_given(tmp_path) -> None:
    from pipeline.gallery.index import CascadeParams, ScoreNorm

    card = read_card(None)
    model = G.VersionModel(card.version_id, card.config.coarse_dim, card.config.rerank_dim, 0.123, 0.456, 17,
                           ScoreNorm(0.3, 4))
    assert model.thresholds() != G.VersionModel.from_card(card).thresholds()  # a card's would fail below
    rng = np.random.default_rng(0)
    ids = np.array([3, 5, 8], np.int64)
    c, r = rng.standard_normal((3, 128)).astype(np.float32), rng.standard_normal((3, 512)).astype(np.float32)
    entries = pd.DataFrame({"id": ids, "bank": "b", "category": "c", "action": "filter", "source_uri": ["x"] * 3,
                            "sha256": ["a", "b", "c"], "added_at": pd.Timestamp.now(tz="UTC")})
    store = open_store(str(tmp_path / "g"), create=True)
    G.write_version(store, G.GalleryContent(ids, c, r, entries, {"b": Bank("b", "-", "c", "filter")}), model, n_shards=2)
    m = G.read_manifest(store)
    assert (m.model.model_id, m.model.coarse_dim, m.model.rerank_dim) == (card.version_id, 128, 512)
    assert m.model.thresholds() == {"coarse": 0.123, "fine": 0.456, "rerank_k": 17, "norm": {"beta": 0.3, "k": 4}}
    assert m.model == model  # what add, remove and review apply carry over
    assert G.open_gallery(store, G.ModelRef(card.version_id)).params == CascadeParams(0.123, 0.456, 17, ScoreNorm(0.3, 4))
    # a card without rerank_k or norm: the defaults a manifest has always recorded
    bare = G.VersionModel.from_card(dataclasses.replace(card, thresholds={"coarse": 0.5, "fine": 0.6}))
    assert bare.thresholds() == {"coarse": 0.5, "fine": 0.6, "rerank_k": 500, "norm": {"beta": 0.0, "k": 1}}


def _gallery_with(banks: dict[str, Bank], members: list[tuple[int, str]], fine: float = 0.5) -> G.GalleryIndex:
    from pipeline.gallery.index import CascadeIndex, CascadeParams

    ids = np.asarray(sorted({i for i, _ in members}), np.int64)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(len(ids), 128)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    r = np.zeros((len(ids), 512), np.float32)
    r[:, :128] = v
    casc = CascadeIndex.build(ids, v, r, 2)
    entries = pd.DataFrame([{"id": i, "bank": b, "category": banks[b].category, "action": banks[b].action,
                             "source_uri": f"x/{i}", "sha256": str(i), "added_at": pd.Timestamp.now(tz="UTC")}
                            for i, b in members])
    return G.GalleryIndex(_manifest(banks), casc, entries, CascadeParams(0.0, fine, 10))


def _manifest(banks: dict[str, Bank]) -> G.Manifest:
    """A manifest with these banks and nothing else of note (for a GalleryIndex built in memory)."""
    from pipeline.gallery.index import CoarseIndexSpec

    return G.Manifest("vtest", None, "2026-01-01T00:00:00+00:00", G.VersionModel("m", 128, 512, 0.0, 0.5),
                      "float16", CoarseIndexSpec(), (), G.EntriesFile("entries.parquet", "", 0),
                      {n: G.BankRecord(b, 0) for n, b in banks.items()}, G.Counts(0, 0))


def test_allow_list_wins_over_a_weaker_or_equal_blocking_match() -> None:
    banks = {"blk": Bank("blk", "-", "sensitive/x", "filter"), "ok": Bank("ok", "-", "allow/fp", "allow"),
             "dr": Bank("dr", "-", "low_quality/spam", "downrank", fine_threshold=0.9)}
    gal = _gallery_with(banks, [(1, "blk"), (1, "ok"), (2, "blk"), (3, "ok"), (4, "dr")])
    I = np.array([[1, -1], [2, -1], [2, 3], [4, -1]])
    D = np.array([[0.9, -np.inf], [0.9, -np.inf], [0.9, 0.8], [0.9, -np.inf]], np.float32)
    F = np.array([[0.95, -np.inf],   # same image in blocking and allow banks: allow wins (tie)
                  [0.95, -np.inf],   # only blocking
                  [0.70, 0.90],      # allow entry matches better than the blocking one
                  [0.85, -np.inf]],  # downrank bank's own threshold 0.9 not reached
                 np.float32)
    m = gal.decide(D, I, F)
    assert (m[0].status, m[0].action, m[0].bank) == ("clean", "none", "ok")
    assert (m[1].status, m[1].action, m[1].bank, m[1].reference_id) == ("matched", "filter", "blk", 2)
    assert (m[2].status, m[2].bank, m[2].reference_id) == ("clean", "ok", 3)
    assert (m[3].status, m[3].action, m[3].bank) == ("clean", "none", None)
    # the blocking match wins when it is better than the allow-list match
    F2 = np.array([[0.7, -np.inf], [0.95, -np.inf], [0.93, 0.90], [0.95, -np.inf]], np.float32)
    m2 = gal.decide(D, I, F2)
    assert (m2[2].status, m2[2].action, m2[2].bank) == ("matched", "filter", "blk")
    assert (m2[3].status, m2[3].action) == ("matched", "downrank")


def test_disabled_bank_never_matches() -> None:
    banks = {"blk": Bank("blk", "-", "s/x", "filter", enabled=False)}
    gal = _gallery_with(banks, [(1, "blk")])
    m = gal.decide(np.array([[0.9]], np.float32), np.array([[1]]), np.array([[0.99]], np.float32))
    assert m[0].status == "clean"


def test_bank_file_errors_are_reported_with_their_lines() -> None:
    text = textwrap.dedent("""\
        [[bank]]
        name = "violence"
        source = "s3://refs/violence/"
        category = "sensitive/violence"
        action = "filter"

        [[bank]]
        name = "violence"
        source = "refs/spam"
        category = "low_quality/spam"
        action = "delete"
        fine_threshold = 7
        colour = "red"

        [[bank]]
        name = "Bad Name"
        category = "x"
        action = "allow"
        enabled = "yes"
        """)
    with pytest.raises(BankFileError) as e:
        parse_banks(text, "banks.toml")
    msg = str(e.value)
    assert "banks.toml:8: duplicate bank name 'violence' (first at line 2)" in msg
    assert "banks.toml:11:" in msg and "'delete'" in msg
    assert "banks.toml:12:" in msg and "fine_threshold" in msg
    assert "banks.toml:13: bank #2: unknown key 'colour'" in msg
    assert "banks.toml:15: bank #3: missing required key 'source'" in msg
    assert "banks.toml:16:" in msg and "Bad Name" in msg
    assert "banks.toml:19:" in msg and "enabled" in msg
    with pytest.raises(BankFileError, match=r"banks.toml:2: TOML syntax"):
        parse_banks('[[bank]]\nname = "x\n', "banks.toml")


def test_relative_sources_resolve_against_the_bank_file(tmp_path) -> None:
    from pipeline.gallery.banks import load_banks

    p = tmp_path / "conf" / "banks.toml"
    p.parent.mkdir()
    p.write_text('[[bank]]\nname = "a"\nsource = "../refs"\ncategory = "c"\naction = "downrank"\n')
    assert load_banks(p)[0].source == str(tmp_path / "refs")


def test_build_from_s3(s3_server, tmp_path, tiny_model_dir) -> None:
    import boto3

    from jobs.gallery_cmd import local_extractor

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="refs-bucket")
    s3.create_bucket(Bucket="gal-bucket")
    import io

    for n in NAMES[:3]:
        buf = io.BytesIO()
        Image.fromarray(photo(n)).save(buf, format="JPEG")
        s3.put_object(Bucket="refs-bucket", Key=f"violence/{n}.jpg", Body=buf.getvalue())
    card = read_card(tiny_model_dir)
    store = open_store("s3://gal-bucket/galleries/main")
    v, stats = G.build(store, [Bank("v", "s3://refs-bucket/violence", "sensitive/violence", "filter")], card,
                       local_extractor(str(tiny_model_dir)), n_shards=2)
    assert stats["v"]["added"] == 3
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="gal-bucket")["Contents"]}
    assert "galleries/main/CURRENT" in keys and f"galleries/main/versions/{v}/manifest.json" in keys
    gal = G.open_gallery("s3://gal-bucket/galleries/main", G.ModelRef(card.version_id))
    assert gal.cascade.ntotal == 3
    src = set(gal.entries["source_uri"])
    assert src == {f"s3://refs-bucket/violence/{n}.jpg" for n in NAMES[:3]}
    man = json.loads(s3.get_object(Bucket="gal-bucket", Key=f"galleries/main/versions/{v}/manifest.json")["Body"].read())
    assert all(len(s["index_sha256"]) == 64 for s in man["shards"])


def test_gallery_add_and_remove_through_the_cli(tmp_path, tiny_model_dir, monkeypatch, capsys) -> None:
    """``modscan gallery add|remove`` in-process: new versions with the right counts, the gallery's own
    thresholds kept (not the model card's), a new bank declared with --banks. Features are extracted
    without Ray (the CLI's Ray extractor is swapped for the same code run locally)."""
    import dataclasses

    from jobs import gallery_cmd
    from jobs.cli import main
    from pipeline.gallery import audit as A

    monkeypatch.setattr(gallery_cmd, "ray_extractor",
                        lambda model_dir, ray_address=None, **kw: gallery_cmd.local_extractor(model_dir))
    card = read_card(tiny_model_dir)
    own = {"coarse": 0.21, "fine": 0.61, "rerank_k": 9, "norm": {"beta": 0.0, "k": 3}}
    assert card.thresholds != own
    store = open_store(str(tmp_path / "gal"), create=True)
    G.build(store, [Bank("aa", str(_write_refs(tmp_path / "a", NAMES[:2])), "sensitive/x", "filter")],
            dataclasses.replace(card, thresholds=own), gallery_cmd.local_extractor(str(tiny_model_dir)), n_shards=2)
    built = G.read_manifest(store).model.thresholds()
    gal = str(tmp_path / "gal")

    def cli(*argv: str) -> dict:
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    new = _write_refs(tmp_path / "c", ["horse", "astronaut"])  # astronaut is already in aa
    assert cli("gallery", "add", gal, "--bank", "aa", "--source", str(new), "--model", str(tiny_model_dir),
               "--who", "ops-t", "--note", "more refs") == {
        "version": "v000002", "added": 1, "already_present": 1, "new_membership": 0, "rejected": 0}
    m2 = G.read_manifest(store)
    assert m2.version == "v000002" and m2.parent == "v000001"
    assert m2.counts == G.Counts(images=3, memberships=3) and m2.banks["aa"].count == 3
    assert m2.model.thresholds() == built == own
    banks = tmp_path / "banks.toml"
    banks.write_text(f'[[bank]]\nname = "bb"\nsource = "{tmp_path / "c"}"\ncategory = "low_quality/spam"\n'
                     'action = "downrank"\n')
    out = cli("gallery", "add", gal, "--bank", "bb", "--source", str(new), "--banks", str(banks),
              "--model", str(tiny_model_dir))
    assert (out["version"], out["added"], out["new_membership"]) == ("v000003", 0, 2)
    m3 = G.read_manifest(store)
    assert m3.counts == G.Counts(images=3, memberships=5) and m3.banks["bb"].bank.action == "downrank"
    # remove runs without a model: the gallery keeps its own model id and thresholds
    horse = int(G.read_content(store)[1].entries.query("source_uri.str.endswith('horse.png')")["id"].iloc[0])
    assert cli("gallery", "remove", gal, "--ids", str(horse), "--who", "ops-t") == {
        "version": "v000004", "memberships_removed": 2, "images_dropped": 1}
    assert cli("gallery", "remove", gal, "--bank", "bb") == {
        "version": "v000005", "memberships_removed": 1, "images_dropped": 0}
    m5 = G.read_manifest(store)
    assert m5.counts == G.Counts(images=2, memberships=2) and set(m5.banks) == {"aa"}
    assert m5.model.thresholds() == built and m5.model.model_id == card.version_id
    assert G.list_versions(store) == ["v000001", "v000002", "v000003", "v000004", "v000005"]
    recs = A.read_log(store)
    assert [r.action for r in recs] == ["build", "add", "add", "remove", "remove"]
    assert (recs[1].who, recs[1].note, recs[3].details["ids"]) == ("ops-t", "more refs", [horse])
