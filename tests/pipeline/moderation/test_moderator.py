"""pipeline/moderation/moderator.py: the Moderator stage's flag rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import png_bytes
from PIL import Image

from models.synthetic import generate
from pipeline.gallery.banks import Bank
from pipeline.ingest.decode import DecodeConfig, Decoder


# -- low-content guard ----------------------------------------------------------------------
def test_moderator_rows_say_low_content_and_never_match(tmp_path, tiny_model_dir) -> None:
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery import QueryOverrides
    from pipeline.gallery.extract import local_extractor
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
                    overrides=QueryOverrides(coarse_threshold=-1.0, fine_threshold=-1.0))
    dec = Decoder(DecodeConfig(low_res=48, high_res=64))
    datas = [png_bytes(Image.new("RGB", (90, 70), (10, 200, 30))), (refs / "0.png").read_bytes()]
    batch = dec({"image_key": np.asarray(["flat.png", "copy.png"], object), "bytes": np.asarray(datas, object)})
    rows = mod(batch).to_pandas()
    assert rows["status"].tolist() == ["low_content", "matched"]
    assert rows["action"].tolist()[0] == "none" and pd.isna(rows["reference_id"].iloc[0])
