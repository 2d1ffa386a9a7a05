"""pipeline/gallery/update.py: build, load round trip, add/remove without re-extracting, approximate
coarse indexes through add/remove, a version's own thresholds."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from conftest import write_refs

from models.card import read_card
from models.synthetic import generate
from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CoarseIndexSpec
from pipeline.ingest.decode import DecodeConfig, Decoder
from pipeline.ingest.storage import open_store


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


def test_add_and_remove_make_new_versions_without_reextracting(built) -> None:
    store, card, extract, _, _, tmp = built
    calls: list[int] = []

    def counting(uris):
        calls.append(len(uris))
        return extract(uris)

    _, before = G.read_content(store)
    new = write_refs(tmp / "c", ["horse", "astronaut"])  # astronaut already in bank aa
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


# -- approximate coarse indexes ---------------------------------------------------------------
def _extracted_once(extract: G.Extractor) -> G.Extractor:
    """``extract`` with each upload's features computed once: the flat and the approximate builds
    read the same files, so they get the same features either way, at a third of the cost."""
    seen: dict[str, dict] = {}

    def once(uris: list[str]) -> list[dict]:
        todo = [u for u in dict.fromkeys(uris) if u not in seen]
        if todo:
            got = extract(todo)
            assert len(got) == len(todo)
            seen.update(zip(todo, got))
        return [seen[u] for u in uris]

    return once


@pytest.fixture(scope="module")
def coarse_world(tmp_path_factory, shipped_model_dir) -> dict:
    """80 generated references and 10 to add, the shipped model's features of each computed once,
    a flat gallery of the 80, and the queries (20 lightly edited copies and pictures): shared by
    both approximate index types."""
    import random as _random

    from models.augment import apply_named
    from pipeline.gallery.extract import local_extractor

    tmp = tmp_path_factory.mktemp("coarse-idx")
    refs, extra = tmp / "refs", tmp / "extra"
    refs.mkdir()
    extra.mkdir()
    pics = [generate("coarse-idx", i)[1] for i in range(90)]
    for i, im in enumerate(pics[:80]):
        im.save(refs / f"{i:03d}.png")
    for i, im in enumerate(pics[80:]):
        im.save(extra / f"{i:03d}.png")
    card, ex = read_card(shipped_model_dir), _extracted_once(local_extractor(str(shipped_model_dir)))
    bank = [Bank("b", str(refs), "s/x", "filter")]
    G.build(open_store(str(tmp / "flat"), create=True), bank, card, ex, n_shards=2)
    rng = _random.Random(0)
    datas = []
    for im in pics[:40:4] + pics[80:]:
        buf = io.BytesIO()
        apply_named(im, ["rescale_jpeg"], rng).save(buf, format="JPEG", quality=90)
        datas.append(buf.getvalue())
    dec = Decoder(DecodeConfig(low_res=card.config.low_res, high_res=card.config.high_res))
    keys = np.asarray([f"q{i}" for i in range(len(datas))], object)
    queries = dec({"image_key": keys, "bytes": np.asarray(datas, object)})
    return {"tmp": tmp, "refs": refs, "extra": extra, "card": card, "extract": ex, "bank": bank, "queries": queries,
            "flat": _flags(str(tmp / "flat"), queries, shipped_model_dir)}


def _flags(uri: str, queries: dict, model_dir) -> list:
    """The job's Moderator on ``queries`` against gallery ``uri`` -> (status, reference id) per query."""
    from pipeline.gallery import QueryOverrides
    from pipeline.moderation.moderator import Moderator, RunContext

    # rerank_k 3: the coarse index's top-3 decides what gets reranked, so its order matters
    mod = Moderator(uri, RunContext("2026-01-01", "r"), model_dir=str(model_dir),
                    overrides=QueryOverrides(coarse_threshold=0.0, rerank_k=3))
    t = mod(dict(queries)).to_pandas()
    return list(zip(t["status"], t["reference_id"].fillna(-1).astype(int)))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_coarse_index_flags_like_flat_and_supports_add_remove(coarse_world, shipped_model_dir, kind) -> None:
    from pipeline.moderation.moderator import Moderator, RunContext

    w = coarse_world
    card, ex = w["card"], w["extract"]
    apx_store = open_store(str(w["tmp"] / kind), create=True)
    spec = CoarseIndexSpec(kind, ivf_nlist=4, nprobe=4, ef_search=256)
    G.build(apx_store, w["bank"], card, ex, 2, "float16", spec)
    m = G.read_manifest(apx_store)
    assert m.coarse_index.type == kind and m.coarse_index.nprobe == 4
    want = w["flat"]
    assert sum(s == "matched" for s, _ in want) >= 5  # the comparison says something
    assert _flags(str(w["tmp"] / kind), w["queries"], shipped_model_dir) == want
    # add and remove keep the index type and its parameters
    n0 = m.counts.images
    v2, st = G.add(apx_store, "b", G.list_source(str(w["extra"])), card, ex)
    v3, _ = G.remove(apx_store, card, ids=[0, 1])
    m3 = G.read_manifest(apx_store)
    assert st["added"] >= 8 and m3.coarse_index == m.coarse_index
    assert m3.counts.images == n0 + st["added"] - 2
    gal = Moderator(str(w["tmp"] / kind), RunContext("2026-01-01", "r"), model_dir=str(shipped_model_dir)).gallery
    assert gal.cascade.ntotal == n0 + st["added"] - 2 and not {0, 1} & set(gal.entries["id"].tolist())


def test_add_and_remove_keep_the_gallerys_own_thresholds(tmp_path, tiny_model_dir) -> None:

    from pipeline import gallery as G
    from pipeline.gallery.extract import local_extractor

    refs, more = tmp_path / "refs", tmp_path / "more"
    refs.mkdir()
    more.mkdir()
    generate("keep-thr", 0, ("chart",))[1].save(refs / "0.png")
    generate("keep-thr", 1, ("text_screenshot",))[1].save(more / "1.png")
    card = read_card(tiny_model_dir)
    card.thresholds = {"coarse": 0.11, "fine": 0.55, "rerank_k": 7, "norm": {"beta": 0.25, "k": 3}}
    store = open_store(str(tmp_path / "g"), create=True)
    ex = local_extractor(str(tiny_model_dir))
    G.build(store, [Bank("b", str(refs), "s/x", "filter")], card, ex, n_shards=1)
    built = G.read_manifest(store).model
    recalibrated = dataclasses.replace(card, thresholds={"coarse": 0.9, "fine": 0.99, "rerank_k": 1})
    G.add(store, "b", G.list_source(str(more)), recalibrated, ex)
    assert G.read_manifest(store).model == built
    G.remove(store, recalibrated, ids=[0])
    assert G.read_manifest(store).model == built
