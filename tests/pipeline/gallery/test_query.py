"""pipeline/gallery/query.py: GalleryIndex, score normalisation and the bank rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.card import read_card
from models.synthetic import generate
from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeIndex, CascadeParams, CoarseIndexSpec, ScoreNorm, background_term
from pipeline.ingest.storage import open_store


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
    from models.card import BackgroundBank
    from pipeline import gallery as G
    from pipeline.gallery.extract import local_extractor

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




def test_model_mismatch_is_a_clear_error(built) -> None:
    store, *_ = built
    with pytest.raises(G.GalleryModelMismatch, match="rebuild the gallery"):
        G.open_gallery(store, G.ModelRef("resnet18-160x112-000000000000"))


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
