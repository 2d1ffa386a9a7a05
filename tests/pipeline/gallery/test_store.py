"""pipeline/gallery/store.py: the version format (what a written version records)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from models.card import read_card
from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeParams, ScoreNorm
from pipeline.ingest.storage import open_store


def test_write_version_records_the_model_and_thresholds_it_is_given(tmp_path) -> None:

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
