"""jobs/bench/common.py: the synthetic vector factory the search and memory benchmarks share."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.bench.common import VectorFactory


def _stats(c: int = 48) -> dict:
    rng = np.random.default_rng(0)
    return {"P": np.abs(rng.normal(1.0, 0.3, (200, c))).astype(np.float32)}


def test_pooled_samples_in_chunks_as_float32_like_the_photos() -> None:
    vf = VectorFactory(_stats(), seed=3)
    x = vf.pooled(1000, chunk=64)  # many chunks, the last one partial
    assert x.shape == (1000, 48) and x.dtype == np.float32 and (x > 0).all()
    assert np.allclose(x.mean(0), vf.gallery_bases.mean(0), atol=0.05)  # samples follow the photos' statistics
    # every sample is a real base with multiplicative jitter of sigma per channel: its log distance
    # to the nearest base is about sigma * sqrt(C)
    d = np.linalg.norm(np.log(x)[:, None, :] - np.log(vf.gallery_bases)[None], axis=2).min(axis=1)
    assert np.median(d) == pytest.approx(vf.sigma * np.sqrt(48), rel=0.1)
    # queries without a match come from held-out photos: never a gallery base
    held = vf.pooled(500, held_out=True)
    dq = np.linalg.norm(np.log(held)[:, None, :] - np.log(vf.query_bases)[None], axis=2).min(axis=1)
    dg = np.linalg.norm(np.log(held)[:, None, :] - np.log(vf.gallery_bases)[None], axis=2).min(axis=1)
    assert (dq < dg).mean() > 0.99 and len(vf.query_bases) == 20 and len(vf.reference_bases) == 20
    assert np.array_equal(VectorFactory(_stats(), seed=3).pooled(1000, chunk=64), x)  # seeded
    assert not np.array_equal(VectorFactory(_stats(), seed=4).pooled(1000, chunk=64), x)
