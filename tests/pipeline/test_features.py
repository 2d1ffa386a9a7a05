"""pipeline/features.py: FeatureExtractor (precision of the features)."""

from __future__ import annotations

import numpy as np
import torch

from models.synthetic import generate


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
