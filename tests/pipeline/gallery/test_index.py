"""pipeline/gallery/index.py: the sharded cascade against an exhaustive numpy computation on seeded data;
the background term of score normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.gallery.index import CascadeIndex, background_term, decode_rerank, encode_rerank


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n: int, nq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10_000_000, size=n, replace=False).astype(np.int64)  # sparse, unordered ids
    c = _unit(rng.normal(size=(n, 128)))
    r = _unit(rng.normal(size=(n, 512)))
    # queries: noisy copies of some entries plus unrelated vectors
    src = rng.integers(0, n, size=nq) if n else np.zeros(nq, int)
    qc = _unit((c[src] if n else 0) + 0.6 * rng.normal(size=(nq, 128)))
    qr = _unit((r[src] if n else 0) + 0.6 * rng.normal(size=(nq, 512)))
    return ids, c, r, qc, qr


def _exhaustive(ids, c, r, qc, qr, k, thr):
    """Reference: numpy scores, coarse filter by threshold, top-k by coarse, fine score by id."""
    S = qc @ c.T
    out = []
    for q in range(len(qc)):
        cand = [(S[q, j], ids[j], float(qr[q] @ r[j])) for j in range(len(ids)) if S[q, j] >= thr]
        cand.sort(key=lambda t: -t[0])
        out.append(cand[:k])
    return out


@pytest.mark.parametrize("n_shards", [1, 2, 7])
@pytest.mark.parametrize("n", [0, 5, 300])
def test_sharded_cascade_equals_exhaustive(n_shards: int, n: int) -> None:
    ids, c, r, qc, qr = _data(n, 25, seed=n_shards + n)
    k, thr = 20, 0.1
    idx = CascadeIndex.build(ids, c, r, n_shards, rerank_dtype="float32")
    if n == 5 and n_shards == 7:
        assert any(s.ntotal == 0 for s in idx.shards), "the case should include empty shards"
    D, I = idx.search_coarse(qc, k, thr)
    F = idx.score_fine(qr, I)
    ref = _exhaustive(ids, c, r, qc, qr, k, thr)
    for q in range(len(qc)):
        got = [(float(D[q, j]), int(I[q, j]), float(F[q, j])) for j in range(k) if I[q, j] >= 0]
        assert [g[1] for g in got] == [int(e[1]) for e in ref[q]]
        np.testing.assert_allclose([g[0] for g in got], [e[0] for e in ref[q]], atol=1e-5)
        np.testing.assert_allclose([g[2] for g in got], [e[2] for e in ref[q]], atol=1e-5)
        assert np.all(I[q, len(got):] == -1) and np.all(np.isneginf(F[q, len(got):]))


def test_threshold_edges_and_k_limits() -> None:
    ids, c, r, qc, qr = _data(50, 4)
    idx = CascadeIndex.build(ids, c, r, 3)
    D, I = idx.search_coarse(c[:4], 500, 0.999)  # self-queries: exactly themselves pass a 0.999 threshold
    assert (I[:, 0] == ids[:4]).all() and (I[:, 1] == -1).all()
    D, I = idx.search_coarse(qc, 500, 1.01)  # nothing passes
    assert (I == -1).all()
    D, I = idx.search_coarse(qc, 3, -1.0)  # everything passes, only 3 kept
    assert I.shape == (4, 3) and (I >= 0).all()


def test_duplicate_ids_are_rejected() -> None:
    ids, c, r, *_ = _data(10, 1)
    ids[3] = ids[4]
    with pytest.raises(ValueError, match="unique"):
        CascadeIndex.build(ids, c, r, 2)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3), ("int8", 1.5e-2)])
def test_rerank_compression_error_is_bounded(dtype: str, tol: float) -> None:
    _, _, r, _, qr = _data(200, 20)
    approx = decode_rerank(encode_rerank(r, dtype))
    err = np.abs(qr @ approx.T - qr @ r.T).max()
    assert err < tol, err


def test_shard_bytes_round_trip() -> None:
    from pipeline.gallery.index import Shard

    ids, c, r, qc, qr = _data(40, 5)
    idx = CascadeIndex.build(ids, c, r, 2)
    again = CascadeIndex([Shard.from_bytes(s.index_bytes(), s.rerank_bytes()) for s in idx.shards], 128, 512)
    D1, I1 = idx.search_coarse(qc, 10, 0.0)
    D2, I2 = again.search_coarse(qc, 10, 0.0)
    assert np.array_equal(I1, I2) and np.allclose(D1, D2)
    assert np.allclose(idx.score_fine(qr, I1), again.score_fine(qr, I2))



@pytest.mark.parametrize("ids", [np.delete(np.arange(400), [5, 17, 200]),            # compact: dense row table
                                 np.arange(397, dtype=np.int64) * 1_000_003])         # sparse: binary search
def test_rerank_scores_equal_brute_force_with_padding_and_unknown_ids(ids) -> None:
    rng = np.random.default_rng(7)
    n = len(ids)
    c = rng.standard_normal((n, 8)).astype(np.float32)
    r = rng.standard_normal((n, 32)).astype(np.float32)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    idx = CascadeIndex.build(ids, c, r, n_shards=2, rerank_dtype="float32")
    assert (idx.row_table is not None) == bool(ids[-1] < 1000)
    q = rng.standard_normal((70, 32)).astype(np.float32)
    cols = rng.integers(0, n, (70, 600))
    I = ids[cols]
    I[:, -5:] = -1  # padding slots
    I[3] = -1       # a query without candidates
    F = idx.score_fine(q, I)
    want = np.einsum("bkd,bd->bk", r[cols], q)
    ok = I >= 0
    np.testing.assert_allclose(F[ok], want[ok], rtol=1e-5, atol=1e-5)
    assert np.isneginf(F[~ok]).all()
    with pytest.raises(KeyError):
        idx.rerank_vectors(np.array([ids[0], int(ids[-1]) + 7]))


def test_float16_decode_fast_path_equals_numpy_cast() -> None:
    x = encode_rerank(np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32) / 8, "float16")
    assert x.size >= 4096  # large enough for the vectorised path
    out = decode_rerank(x)
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))


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
