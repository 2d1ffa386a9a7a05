"""jobs/commands/gallery_cmd.py: modscan gallery build/add/remove from S3 and the command line."""

from __future__ import annotations

import dataclasses
import io
import json

from conftest import NAMES, photo, write_refs
from PIL import Image

from models.card import read_card
from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.extract import local_extractor
from pipeline.ingest.storage import open_store


def test_build_from_s3(s3_server, tmp_path, tiny_model_dir) -> None:
    import boto3

    from pipeline.gallery.extract import local_extractor

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="refs-bucket")
    s3.create_bucket(Bucket="gal-bucket")

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

    from jobs.cli import main
    from jobs.commands import gallery_cmd
    from pipeline.gallery import audit as A

    monkeypatch.setattr(gallery_cmd, "ray_extractor",
                        lambda model_dir, ray_address=None, **kw: local_extractor(model_dir))
    card = read_card(tiny_model_dir)
    own = {"coarse": 0.21, "fine": 0.61, "rerank_k": 9, "norm": {"beta": 0.0, "k": 3}}
    assert card.thresholds != own
    store = open_store(str(tmp_path / "gal"), create=True)
    G.build(store, [Bank("aa", str(write_refs(tmp_path / "a", NAMES[:2])), "sensitive/x", "filter")],
            dataclasses.replace(card, thresholds=own), local_extractor(str(tiny_model_dir)), n_shards=2)
    built = G.read_manifest(store).model.thresholds()
    gal = str(tmp_path / "gal")

    def cli(*argv: str) -> dict:
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    new = write_refs(tmp_path / "c", ["horse", "astronaut"])  # astronaut is already in aa
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


def test_an_unknown_gallery_command_is_a_usage_error() -> None:
    import argparse

    import pytest

    from jobs.commands.gallery_cmd import run
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="unknown gallery command 'frobnicate'"):
        run(argparse.Namespace(gcmd="frobnicate", model=None, ray_address=None))
