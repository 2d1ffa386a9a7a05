"""Round-2 scoring parts: losses, generated pictures, low-content guard, score normalisation,
trunk precision."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.losses import info_nce, koleo_entropy, relational_distill
from models.synthetic import EVERYDAY, generate
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeIndex, CascadeParams, CoarseIndexSpec, ScoreNorm, background_term
from pipeline.ingest.decode import DecodeConfig, Decoder, is_low_content


# -- losses ------------------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def _reference_info_nce(a, b, t, ids, q, qids):
    """Row by row: positives on the diagonal, negatives = every entry of another image."""
    losses = []
    for x, y in ((a, b), (b, a)):
        for i in range(len(x)):
            keep_b = [j for j in range(len(y)) if j == i or ids[j] != ids[i]]
            keep_q = [m for m in range(len(q)) if qids[m] != ids[i]]
            logits = torch.cat([x[i] @ y[keep_b].t(), x[i] @ q[keep_q].t()]) / t
            losses.append(-torch.log_softmax(logits, 0)[keep_b.index(i)])
    return torch.stack(losses).mean()


def test_info_nce_masks_same_image_entries_instead_of_counting_them_as_negatives() -> None:
    torch.manual_seed(0)
    a, b = _unit(torch.randn(6, 16)), _unit(torch.randn(6, 16))
    ids = torch.tensor([0, 1, 2, 3, 4, 0])              # rows 0 and 5 are two views of one image
    q = torch.cat([_unit(a[:3] + 0.05 * torch.randn(3, 16)), _unit(torch.randn(7, 16))])
    qids = torch.cat([ids[:3], torch.arange(100, 107)])  # queue: near-copies of images 0-2, then others
    got = info_nce(a, b, 0.1, ids, q, qids)
    want = _reference_info_nce(a, b, 0.1, ids, q, qids)
    assert torch.isclose(got, want, atol=1e-5), (float(got), float(want))
    unmasked = info_nce(a, b, 0.1, torch.arange(6), q, torch.arange(200, 210))
    assert float(unmasked) > float(got)  # counting same-image copies as negatives costs loss


def test_koleo_uses_the_nearest_non_match() -> None:
    x = _unit(torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]]))
    ids = torch.tensor([0, 0, 1, 1])  # rows 0/1 and 2/3 are views of one image
    far = koleo_entropy(x, ids)       # nearest other image is ~90 degrees away
    near = koleo_entropy(x)           # without ids the twin view is the neighbour
    assert float(far) < float(near)


def test_relational_distill_is_zero_when_the_student_equals_the_target() -> None:
    torch.manual_seed(0)
    t, bank = _unit(torch.randn(8, 32)), _unit(torch.randn(64, 32))
    cos_t, kl = relational_distill(t.clone(), t, bank, 0.05)
    assert float(cos_t) == pytest.approx(0.0, abs=1e-6) and float(kl) == pytest.approx(0.0, abs=1e-5)
    cos2, kl2 = relational_distill(_unit(torch.randn(8, 32)), t, bank, 0.05)
    assert float(cos2) > 0.5 and float(kl2) > 0.1


# -- generated pictures ---------------------------------------------------------------------
def test_generated_pictures_are_deterministic_and_disjoint_per_purpose() -> None:
    k1, a = generate("train", 3)
    k2, b = generate("train", 3)
    _, c = generate("eval-0", 3)
    assert k1 == k2 and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a.resize((64, 64))), np.asarray(c.resize((64, 64))))
    kinds = {generate("train", i)[0] for i in range(len(EVERYDAY))}
    assert kinds == set(EVERYDAY)


# -- low-content guard ----------------------------------------------------------------------
def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind,expected", [("flat", True), ("transparent", True), ("gradient", False),
                                           ("noise", False), ("text_screenshot", False)])
def test_low_content_is_decided_by_the_decoder(kind: str, expected: bool) -> None:
    dec = Decoder(DecodeConfig(low_res=48, high_res=64))
    for i in range(6):
        k, im = generate("low-content-test", i, (kind,))
        if kind == "gradient" and is_low_content(np.asarray(im.convert("RGB").resize((64, 64)))):
            continue  # a gradient between two near-identical colours is a flat picture
        r = dec.decode_one(_png(im))
        assert r["ok"] and r["low_content"] is expected, (kind, i)


def test_photos_are_not_low_content() -> None:
    from conftest import photo

    dec = Decoder(DecodeConfig(low_res=48, high_res=64))
    for name in ("astronaut", "camera", "coins", "moon", "page", "horse", "brick"):
        buf = io.BytesIO()
        Image.fromarray(photo(name)).save(buf, format="JPEG")
        assert not dec.decode_one(buf.getvalue())["low_content"], name


def test_moderator_rows_say_low_content_and_never_match(tmp_path, tiny_model_dir) -> None:
    from jobs.gallery_cmd import local_extractor
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.moderator import Moderator, RunContext

    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        generate("lc-ref", i, ("flat_shapes",))[1].save(refs / f"{i}.png")
    Image.new("RGB", (80, 80), (10, 200, 30)).save(refs / "flat.png")
    store = open_store(str(tmp_path / "g"), create=True)
    G.build(store, [Bank("b", str(refs), "sensitive/x", "filter")], read_card(tiny_model_dir),
            local_extractor(str(tiny_model_dir)), n_shards=1)
    m = G.read_manifest(store)
    assert [r.error_code for r in m.rejected] == ["low_content"] and m.counts.images == 3
    mod = Moderator(str(tmp_path / "g"), RunContext("2026-01-01", "r1"), model_dir=str(tiny_model_dir),
                    threshold_overrides={"coarse": -1.0, "fine": -1.0})
    dec = Decoder(DecodeConfig(low_res=48, high_res=64))
    datas = [_png(Image.new("RGB", (90, 70), (10, 200, 30))), (refs / "0.png").read_bytes()]
    batch = dec({"image_key": np.asarray(["flat.png", "copy.png"], object), "bytes": np.asarray(datas, object)})
    rows = mod(batch).to_pandas()
    assert rows["status"].tolist() == ["low_content", "matched"]
    assert rows["action"].tolist()[0] == "none" and pd.isna(rows["reference_id"].iloc[0])


# -- score normalisation --------------------------------------------------------------------
def test_background_term_is_the_mean_of_the_top_k_cosines() -> None:
    rng = np.random.default_rng(0)
    bg = rng.normal(size=(50, 8)).astype(np.float32)
    bg /= np.linalg.norm(bg, axis=1, keepdims=True)
    xq = bg[:3] * 0.9 + 0.1 * bg[3:6]
    S = xq @ bg.T
    for k in (1, 3, 10):
        np.testing.assert_allclose(background_term(xq, bg, k), np.sort(S, axis=1)[:, ::-1][:, :k].mean(1), rtol=1e-6)
    assert background_term(xq, None, 3).tolist() == [0.0, 0.0, 0.0]


def _index(beta: float, background: np.ndarray | None):
    from pipeline import gallery as G

    rng = np.random.default_rng(1)
    v = rng.normal(size=(4, 128)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    r = rng.normal(size=(4, 512)).astype(np.float32)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    casc = CascadeIndex.build(np.arange(4), v, r, 1, rerank_dtype="float32")
    entries = pd.DataFrame([{"id": i, "bank": "b", "category": "s/x", "action": "filter", "source_uri": f"x/{i}",
                             "sha256": str(i), "added_at": pd.Timestamp.now(tz="UTC")} for i in range(4)])
    manifest = G.Manifest("vtest", None, "2026-01-01T00:00:00+00:00", G.VersionModel("m", 128, 512, -1.0, 0.5),
                          "float32", CoarseIndexSpec(), (), G.EntriesFile("entries.parquet", "", 0),
                          {"b": G.BankRecord(Bank("b", "-", "s/x", "filter"), 4)}, G.Counts(4, 4))
    params = CascadeParams(-1.0, 0.5, 4, ScoreNorm(beta, 2))
    return G.GalleryIndex(manifest, casc, entries, params, background), v, r


def test_normalised_fine_score_subtracts_beta_times_the_background_term() -> None:
    rng = np.random.default_rng(2)
    bg = rng.normal(size=(30, 512)).astype(np.float32)
    bg /= np.linalg.norm(bg, axis=1, keepdims=True)
    gal, v, r = _index(0.5, bg)
    q512 = r[[0, 1]] * 0.8 + 0.2 * bg[[0, 1]]
    q512 /= np.linalg.norm(q512, axis=1, keepdims=True)
    c = gal.candidates(v[[0, 1]], lambda rows: q512[rows])
    term = background_term(q512, bg, 2)
    np.testing.assert_allclose(c.offset, 0.5 * term, rtol=1e-5)
    raw = gal.cascade.score_fine(q512, c.I)
    ok = c.I >= 0
    np.testing.assert_allclose(c.F[ok], (raw - 0.5 * term[:, None])[ok], rtol=1e-5, atol=1e-6)
    m = gal.decide(c.D, c.I, c.F, c.offset)
    for q, match in enumerate(m):
        assert match.fine_score_raw == pytest.approx(match.fine_score + c.offset[q], abs=1e-5)
    # beta = 0: raw scores, no background needed
    gal0, _, _ = _index(0.0, None)
    c0 = gal0.candidates(v[[0, 1]], lambda rows: q512[rows])
    np.testing.assert_allclose(c0.F[ok], raw[ok], rtol=1e-5)


def test_a_normalising_gallery_refuses_to_score_without_a_background_bank(tmp_path, tiny_model_dir) -> None:
    from jobs.gallery_cmd import local_extractor
    from models.card import BackgroundBank, read_card
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

    refs = tmp_path / "refs"
    refs.mkdir()
    generate("norm-ref", 0, ("chart",))[1].save(refs / "0.png")
    card = read_card(tiny_model_dir)
    card.thresholds = {"coarse": 0.1, "fine": 0.5, "rerank_k": 10, "norm": {"beta": 0.5, "k": 3}}
    store = open_store(str(tmp_path / "g"), create=True)
    G.build(store, [Bank("b", str(refs), "s/x", "filter")], card, local_extractor(str(tiny_model_dir)), n_shards=1)
    assert G.read_manifest(store).model.norm == ScoreNorm(0.5, 3)
    gal = G.open_gallery(store, None)  # opens (to inspect) but refuses to score
    with pytest.raises(G.GalleryIntegrityError, match="without a background bank"):
        gal.normalise(np.zeros((1, 512), np.float32), np.zeros((1, 1), np.float32))
    bg = BackgroundBank(np.eye(3, 512, dtype=np.float32), np.eye(3, 128, dtype=np.float32), ["photo"] * 3)
    gal = G.open_gallery(store, G.ModelRef(card.version_id, bg))
    assert gal.params.norm == ScoreNorm(0.5, 3) and gal.background is bg.f512


# -- trunk precision ------------------------------------------------------------------------
def test_auto_precision_follows_the_hardware() -> None:
    from models.precision import Precision, cpu_has_native_bf16, resolve_precision

    expect = Precision.BF16 if cpu_has_native_bf16() else Precision.FP32
    assert resolve_precision("auto", "cpu") is expect
    assert resolve_precision("fp32", "cpu") is Precision.FP32
    with pytest.raises(ValueError):
        resolve_precision("fp8", "cpu")


def test_bf16_features_agree_with_fp32_and_heads_stay_fp32(tiny_model_dir) -> None:
    from models.card import load_model
    from models.preprocess import to_batch

    m, card = load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    imgs = np.stack([np.asarray(generate("prec", i)[1].convert("RGB").resize((64, 64))) for i in range(4)])
    imgs = np.concatenate([imgs, rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)])
    x = to_batch(imgs)
    with torch.no_grad():
        m.set_precision("fp32")
        f32 = m.gallery_features(x)
        m.set_precision("bf16")
        fb = m.gallery_features(x)
    for a, b in zip(f32, fb):
        assert b.dtype == torch.float32
        cos = (a * b).sum(1)
        assert float(cos.min()) >= 0.999, cos


# -- approximate coarse indexes ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_coarse_index_flags_like_flat_and_supports_add_remove(tmp_path, shipped_model_dir, kind) -> None:
    import random as _random

    from jobs.gallery_cmd import local_extractor
    from models.augment import apply_named
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.index import CoarseIndexSpec
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.moderator import Moderator, RunContext

    refs, extra = tmp_path / "refs", tmp_path / "extra"
    refs.mkdir()
    extra.mkdir()
    pics = [generate("coarse-idx", i)[1] for i in range(90)]
    for i, im in enumerate(pics[:80]):
        im.save(refs / f"{i:03d}.png")
    for i, im in enumerate(pics[80:]):
        im.save(extra / f"{i:03d}.png")
    card, ex = read_card(shipped_model_dir), local_extractor(str(shipped_model_dir))
    bank = [Bank("b", str(refs), "s/x", "filter")]
    flat_store, apx_store = open_store(str(tmp_path / "flat"), create=True), open_store(str(tmp_path / kind), create=True)
    G.build(flat_store, bank, card, ex, n_shards=2)
    spec = CoarseIndexSpec(kind, ivf_nlist=4, nprobe=4, ef_search=256)
    G.build(apx_store, bank, card, ex, 2, "float16", spec)
    m = G.read_manifest(apx_store)
    assert m.coarse_index.type == kind and m.coarse_index.nprobe == 4
    rng = _random.Random(0)
    datas = []
    for im in pics[:40:4] + pics[80:]:
        buf = io.BytesIO()
        apply_named(im, ["rescale_jpeg"], rng).save(buf, format="JPEG", quality=90)
        datas.append(buf.getvalue())
    dec = Decoder(DecodeConfig(low_res=card.config.low_res, high_res=card.config.high_res))
    keys = np.asarray([f"q{i}" for i in range(len(datas))], object)

    def flags(uri: str) -> list:
        # rerank_k 3: the coarse index's top-3 decides what gets reranked, so its order matters
        mod = Moderator(uri, RunContext("2026-01-01", "r"), model_dir=str(shipped_model_dir),
                        threshold_overrides={"coarse": 0.0, "rerank_k": 3})
        t = mod(dec({"image_key": keys, "bytes": np.asarray(datas, object)})).to_pandas()
        return list(zip(t["status"], t["reference_id"].fillna(-1).astype(int)))

    want = flags(str(tmp_path / "flat"))
    assert sum(s == "matched" for s, _ in want) >= 5  # the comparison says something
    assert flags(str(tmp_path / kind)) == want
    # add and remove keep the index type and its parameters
    n0 = m.counts.images
    v2, st = G.add(apx_store, "b", G.list_source(str(extra)), card, ex)
    v3, _ = G.remove(apx_store, card, ids=[0, 1])
    m3 = G.read_manifest(apx_store)
    assert st["added"] >= 8 and m3.coarse_index == m.coarse_index
    assert m3.counts.images == n0 + st["added"] - 2
    bank_f512 = Moderator(str(tmp_path / kind), RunContext("2026-01-01", "r"), model_dir=str(shipped_model_dir)).gallery
    gal = bank_f512
    assert gal.cascade.ntotal == n0 + st["added"] - 2 and not {0, 1} & set(gal.entries["id"].tolist())


def test_add_and_remove_keep_the_gallerys_own_thresholds(tmp_path, tiny_model_dir) -> None:
    import dataclasses

    from jobs.gallery_cmd import local_extractor
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

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
