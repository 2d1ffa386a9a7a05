"""PDQ and MD5 indexes: flat and multi-hash against brute force, edges, ties, storage (memory-mapped,
v1 files), the multi-hash tables themselves; the benchmark runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pipeline.signals.index as ix
from jobs.bench.hashes import bench_hashes, flip_bits, make_data
from pipeline.signals.hashes import hamming, pack_hex
from pipeline.signals.index import HashMatch, Md5Index, PdqIndex
from pipeline.signals.lists import HashEntry
from pipeline.signals.multihash import MultiHashTables, directory_bits, flip_masks, substring_keys

KINDS = ("flat", "mih")


def hexes(codes: np.ndarray) -> list[str]:
    """``(n, 32)`` uint8 codes -> the PDQ hex strings :func:`pack_hex` packs them from (queries are hex)."""
    return [row.tobytes().hex() for row in np.ascontiguousarray(codes, np.uint8)]


def brute_force(codes: np.ndarray, queries: np.ndarray, max_distance: int) -> list[list[tuple[int, int]]]:
    """Every (distance, entry) within max_distance, by numpy popcount over all pairs, sorted."""
    bits_g = np.unpackbits(codes, axis=1).astype(bool)
    out = []
    for q in np.unpackbits(queries, axis=1).astype(bool):
        d = (bits_g != q).sum(axis=1)
        hit = np.flatnonzero(d <= max_distance)
        out.append(sorted((int(d[i]), int(i)) for i in hit))
    return out


@pytest.fixture(scope="module")
def seeded() -> tuple[np.ndarray, np.ndarray]:
    """3000 entries (5% variants of others) and 400 queries, half planted at 0-40 bits of an entry."""
    codes, queries, _src, _d = make_data(3000, 400, seed=7)
    rng = np.random.default_rng(11)
    extra = flip_bits(codes[rng.integers(0, 3000, 64)], rng.integers(25, 38, 64), rng)  # many near the edge
    return codes, np.concatenate([queries, extra])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_distance", [0, 8, 31, 32, 40])
def test_index_agrees_with_brute_force(seeded: tuple[np.ndarray, np.ndarray], kind: str, max_distance: int) -> None:
    """Tolerance: none. Multi-hash with nflip = max_distance // nhash is exact (pigeonhole) up to 32, and
    falls back to the flat storage beyond (40 here), so both kinds must equal brute force pair for pair."""
    codes, queries = seeded
    index = PdqIndex(codes, kind)
    assert index.kind == kind and len(index) == len(codes)
    want = brute_force(codes, queries, max_distance)
    got = index.query(hexes(queries), max_distance)
    assert [[(m.distance, m.entry_idx) for m in row] for row in got] == want
    assert sum(map(len, want)) > 20  # the data has matches to find
    assert sum(1 for row in want if row) < len(queries)  # and queries without any


def test_flat_and_mih_return_the_same_csr(seeded: tuple[np.ndarray, np.ndarray]) -> None:
    codes, queries = seeded
    a = PdqIndex(codes, "flat").search(queries, 31, batch_size=37)  # batches of odd size
    b = PdqIndex(codes, "mih").search(queries, 31)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("kind", KINDS)
def test_distance_edges(kind: str) -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (1, 32), dtype=np.uint8)
    at = {d: flip_bits(base, np.asarray([d]), rng) for d in (0, 1, 30, 31, 32, 33, 128)}
    for d, c in at.items():
        assert hamming(hexes(c)[0], hexes(base)[0]) == d
    index = PdqIndex(base, kind)
    q = [hexes(at[d])[0] for d in (31, 32, 30, 0, 33)]
    assert index.query(q, 31) == [[HashMatch(0, 31)], [], [HashMatch(0, 30)], [HashMatch(0, 0)], []]
    assert index.query(q, 32) == [[HashMatch(0, 31)], [HashMatch(0, 32)], [HashMatch(0, 30)], [HashMatch(0, 0)], []]
    assert index.query(q, 0) == [[], [], [], [HashMatch(0, 0)], []]
    assert index.query([hexes(at[128])[0]], 256) == [[HashMatch(0, 128)]]
    for bad in (-1, 257, True, 31.0):
        with pytest.raises(ValueError):
            index.query(q, bad)


@pytest.mark.parametrize("kind", KINDS)
def test_duplicates_and_ties_are_ordered_by_distance_then_entry(kind: str) -> None:
    rng = np.random.default_rng(9)
    h = rng.integers(0, 256, (1, 32), dtype=np.uint8)
    near = flip_bits(h, np.asarray([3]), rng)
    codes = np.concatenate([near, h, near, h, flip_bits(h, np.asarray([3]), rng)])  # 0,2 dup; 1,3 dup
    got = PdqIndex(codes, kind).query([hexes(h)[0]], 31)[0]
    assert got == [HashMatch(1, 0), HashMatch(3, 0), HashMatch(0, 3), HashMatch(2, 3), HashMatch(4, 3)]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index_empty_and_missing_queries(kind: str) -> None:
    empty = PdqIndex(np.zeros((0, 32), np.uint8), kind)
    assert len(empty) == 0
    assert empty.query(["0" * 64, None], 31) == [[], []]
    full = PdqIndex.build([HashEntry("0" * 64), HashEntry("f" * 64)], kind)
    assert full.query([], 31) == []
    assert full.query([None, "0" * 63 + "1", None], 31) == [[], [HashMatch(0, 1)], []]
    lims, D, I = full.search([None, "0" * 64], 31)
    assert lims.tolist() == [0, 0, 1] and D.tolist() == [0] and I.tolist() == [0]
    with pytest.raises(ValueError):
        full.query(["xyz"], 31)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(seeded: tuple[np.ndarray, np.ndarray], kind: str, tmp_path: Path) -> None:
    codes, queries = seeded
    index = PdqIndex(codes, kind)
    again = PdqIndex.from_bytes(index.to_bytes())
    assert again.kind == kind and len(again) == len(index)
    assert np.array_equal(again.codes(), codes)
    assert again.query(hexes(queries), 31) == index.query(hexes(queries), 31)
    index.save(tmp_path / "pdq.idx")
    assert PdqIndex.load(tmp_path / "pdq.idx").query(hexes(queries[:50]), 31) == index.query(hexes(queries[:50]), 31)
    e = PdqIndex.from_bytes(PdqIndex(np.zeros((0, 32), np.uint8), kind).to_bytes())
    assert len(e) == 0 and e.kind == kind


def test_load_refuses_other_files() -> None:
    good = PdqIndex(np.zeros((2, 32), np.uint8)).to_bytes()
    for bad in (b"", b"not safetensors at all", good[: len(good) // 2], Md5Index.build(["0" * 32]).to_bytes()):
        with pytest.raises(ValueError):
            PdqIndex.from_bytes(bad)
    with pytest.raises(ValueError):
        Md5Index.from_bytes(good)


def test_auto_kind_follows_the_measured_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    codes = np.random.default_rng(0).integers(0, 256, (10, 32), dtype=np.uint8)
    assert PdqIndex(codes).kind == "flat"
    monkeypatch.setattr(ix, "FLAT_MAX", 9)
    assert PdqIndex(codes).kind == "mih"
    monkeypatch.setattr(ix, "FLAT_MAX", 10)
    assert PdqIndex(codes).kind == "flat"  # up to and including FLAT_MAX
    assert PdqIndex(codes, flat_max=9).kind == "mih" and PdqIndex(codes, flat_max=10).kind == "flat"


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        PdqIndex(np.zeros((2, 31), np.uint8))
    with pytest.raises(ValueError):
        PdqIndex(np.zeros((2, 32), np.uint8), "hnsw")
    with pytest.raises(ValueError):
        PdqIndex(np.zeros((2, 32), np.uint8), "mih", nhash=16, bits=17)  # 272 > 256 bits


def test_build_from_entries_keeps_their_order() -> None:
    hs = [f"{i:064x}" for i in (5, 1, 9)]
    index = PdqIndex.build([HashEntry(h, f"id{i}") for i, h in enumerate(hs)])
    assert index.query(hs, 0) == [[HashMatch(0, 0)], [HashMatch(1, 0)], [HashMatch(2, 0)]]
    assert np.array_equal(index.codes(), pack_hex(hs))


# ---------------------------------------------------------------------------------------------
# stored and memory-mapped; the tables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_distance", [0, 8, 22, 31, 32, 33, 40])
def test_a_stored_index_maps_and_searches_exactly(seeded: tuple[np.ndarray, np.ndarray], tmp_path: Path,
                                                  max_distance: int) -> None:
    """Tolerance: none. The stored tables, memory-mapped and searched as multi-hash (a threshold of
    100 forces it on 3,000 entries), equal brute force pair for pair; 33 and 40 take the flat
    fallback over the same mapped codes."""
    codes, queries = seeded
    PdqIndex(codes, "mih").save(tmp_path / "pdq.safetensors")
    index = PdqIndex.mapped(tmp_path / "pdq.safetensors", kind="auto", flat_max=100)
    assert index.kind == "mih" and len(index) == len(codes)
    arrays = index.arrays()
    assert set(arrays) == {"codes", "perm", "offsets"}
    assert all(isinstance(a, np.memmap) and a.filename == str(tmp_path / "pdq.safetensors") for a in arrays.values())
    want = brute_force(codes, queries, max_distance)
    assert [[(m.distance, m.entry_idx) for m in row] for row in index.query(hexes(queries), max_distance)] == want
    flat = PdqIndex.mapped(tmp_path / "pdq.safetensors", kind="auto")  # 3,000 <= FLAT_MAX: flat over the mapped codes
    assert flat.kind == "flat" and isinstance(flat.arrays()["codes"], np.memmap) and set(flat.arrays()) == {"codes"}
    for x, y in zip(flat.search(queries, max_distance), index.search(queries, max_distance)):
        assert np.array_equal(x, y)


def test_v1_files_load_and_bad_tables_are_refused(seeded: tuple[np.ndarray, np.ndarray]) -> None:
    from safetensors.numpy import save

    codes, queries = seeded
    v1 = save({"codes": codes}, metadata={"format": "modscan.pdq-index", "version": "1", "kind": "mih",
                                          "nhash": "11", "bits": "23"})
    old = PdqIndex.from_bytes(v1)
    assert old.kind == "mih" and set(old.arrays()) == {"codes", "perm", "offsets"}  # tables built on load
    assert old.query(hexes(queries), 31) == PdqIndex(codes, "flat").query(hexes(queries), 31)
    t = MultiHashTables.build(codes)
    meta = {"format": "modscan.pdq-index", "version": "2", "kind": "mih", "nhash": "11", "bits": "23"}
    bad_offsets = t.offsets.copy()
    bad_offsets[3, -1] -= 1
    for arrays in ({"codes": codes, "perm": t.perm, "offsets": bad_offsets},
                   {"codes": codes, "perm": t.perm[:, :-1].copy(), "offsets": t.offsets},
                   {"codes": codes, "perm": t.perm.astype(np.int32), "offsets": t.offsets}):
        with pytest.raises(ValueError):
            PdqIndex.from_bytes(save(arrays, metadata=meta))


def test_substring_keys_are_the_codes_bits_in_order() -> None:
    codes = np.random.default_rng(3).integers(0, 256, (500, 32), dtype=np.uint8)
    bits = np.unpackbits(codes, axis=1).astype(np.int64)
    for nhash, b in ((11, 23), (16, 16), (8, 32), (5, 7)):
        want = np.stack([bits[:, t * b:(t + 1) * b] @ (1 << np.arange(b - 1, -1, -1)) for t in range(nhash)])
        assert np.array_equal(substring_keys(codes, nhash, b), want), (nhash, b)
    assert len(flip_masks(23, 2)) == 1 + 23 + 253 and len(flip_masks(16, 1)) == 17
    assert [directory_bits(n, 23) for n in (0, 1, 2, 1000, 1 << 20, 1_000_000, 10_000_000)] == [1, 1, 2, 11, 21, 21, 23]


@pytest.mark.parametrize(("nhash", "bits"), [(11, 23), (16, 16), (8, 32), (21, 12)])
def test_tables_of_other_layouts_are_exact_up_to_their_pigeonhole_limit(seeded: tuple[np.ndarray, np.ndarray],
                                                                       nhash: int, bits: int) -> None:
    codes, queries = seeded
    index = PdqIndex(codes, "mih", nhash, bits)
    for r in (0, 10, 31, 3 * nhash - 1, 3 * nhash + 5):  # the last needs 3 flips a table: flat fallback
        r = min(r, 256)
        got = index.query(hexes(queries), r)
        assert [[(m.distance, m.entry_idx) for m in row] for row in got] == brute_force(codes, queries, r), (nhash, bits, r)


def test_crowded_buckets_split_the_query_batch_and_stay_exact() -> None:
    """A list of 2,000 near-identical entries (0-6 bits from one hash) puts them all in a few buckets:
    a candidate cap of 500 makes every query batch split down to single queries."""
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, (1, 32), dtype=np.uint8)
    codes = flip_bits(np.repeat(base, 2000, axis=0), rng.integers(0, 7, 2000), rng)
    queries = np.concatenate([flip_bits(np.repeat(base, 40, axis=0), rng.integers(0, 40, 40), rng),
                              rng.integers(0, 256, (10, 32), dtype=np.uint8)])
    t = MultiHashTables.build(codes)
    lims, D, I = t.search(queries, 31, max_candidates=500)
    got = [sorted(zip(D[lims[q]:lims[q + 1]].tolist(), I[lims[q]:lims[q + 1]].tolist())) for q in range(len(queries))]
    assert got == brute_force(codes, queries, 31)
    assert sum(map(len, got)) > 20_000  # the crowd is found


# ---------------------------------------------------------------------------------------------
# MD5
# ---------------------------------------------------------------------------------------------
def test_md5_index_exact_with_duplicates_case_and_none(tmp_path: Path) -> None:
    a, b, c = "d41d8cd98f00b204e9800998ecf8427e", "cab08b36195edb1a1231d2d09fa450e0", "00" * 15 + "10"
    index = Md5Index.build([HashEntry(a, "x"), b, a, c])
    assert len(index) == 4
    got = index.query([a.upper(), None, "00" * 16, c, b])
    assert got == [[HashMatch(0, 0), HashMatch(2, 0)], [], [], [HashMatch(3, 0)], [HashMatch(1, 0)]]
    again = Md5Index.from_bytes(index.to_bytes())
    assert again.query([a, c]) == index.query([a, c])
    empty = Md5Index.build([])
    assert empty.query([a]) == [[]] and Md5Index.from_bytes(empty.to_bytes()).query([a]) == [[]]
    with pytest.raises(ValueError):
        index.query(["abc"])
    with pytest.raises(ValueError):
        Md5Index.build(["z" * 32])


def test_md5_index_against_a_dict_on_many_entries() -> None:
    rng = np.random.default_rng(1)
    hs = [rng.bytes(16).hex() for _ in range(2000)]
    hs += hs[:50]  # duplicates
    index = Md5Index.build(hs)
    queries = hs[::7] + [rng.bytes(16).hex() for _ in range(100)]
    want: dict[str, list[int]] = {}
    for i, h in enumerate(hs):
        want.setdefault(h, []).append(i)
    assert [[m.entry_idx for m in row] for row in index.query(queries)] == [want.get(q, []) for q in queries]


# ---------------------------------------------------------------------------------------------
# the benchmark's data and a tiny run
# ---------------------------------------------------------------------------------------------
def test_flip_bits_flips_exactly_k_bits() -> None:
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (300, 32), dtype=np.uint8)
    k = rng.integers(0, 257, 300)
    out = flip_bits(codes, k, rng, chunk=64)
    assert (np.unpackbits(codes ^ out, axis=1).sum(axis=1) == k).all()


def test_bench_hashes_runs_and_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hashes.json"
    res = bench_hashes(sizes=(2000,), queries=64, out=out, methods=("flat", "mih", "mih_faiss", "hnsw"))
    saved = json.loads(out.read_text())
    assert saved["rows"] == res["rows"] and [r["method"] for r in res["rows"]] == ["flat", "mih", "mih_faiss", "hnsw"]
    flat, mih, old, _hnsw = res["rows"]
    for row in (mih, old):
        assert row["recall vs flat"] == 1.0 and row["extra vs flat"] == 0 and row["planted found"] == flat["planted found"]
    assert (flat["processes"], mih["processes"], old["processes"]) == (2, 2, 1)  # the mapped ones: two at once
    assert mih["file B/hash"] > 32 and old["file B/hash"] == 32 and isinstance(mih["USS B/hash"], float)
    assert "mih/flat queries/s @2,000" in res["ratios"] and "mih_faiss/mih load time @2,000" in res["ratios"]
    assert "| size | method |" in capsys.readouterr().out
    with pytest.raises(ValueError):
        bench_hashes(sizes=(10,), methods=("ivf",), out=tmp_path / "x.json")
