"""Hash banks in bank files, manifests and the decision rule (issue 20), the PDQ index stored in a
version and memory-mapped by readers (issue 27), without Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import gallery as G
from pipeline.gallery.banks import Bank, BankFileError, parse_banks
from pipeline.gallery.hashlists import HashBanks, HashHit, HashQuery, IndexedEntries
from pipeline.gallery.manifest import Manifest
from pipeline.gallery.query import GalleryIndex, Match
from pipeline.gallery.store import GalleryIntegrityError, read_lists
from pipeline.ingest.storage import Store, open_store
from pipeline.signals.index import PdqIndex
from pipeline.signals.lists import HashEntry, read_list

PDQ_A = "f" * 64
PDQ_B = "f" * 60 + "0000"  # 16 bits from PDQ_A


def test_hash_bank_kinds_and_settings_parse() -> None:
    banks = parse_banks('[[bank]]\nname = "p"\nkind = "pdq"\nsource = "l.txt"\ncategory = "c"\naction = "filter"\n'
                        'pdq_max_distance = 20\npdq_min_quality = 70\n'
                        '[[bank]]\nname = "m"\nkind = "md5"\nsource = "s3://b/m.csv"\ncategory = "c"\naction = "allow"\n'
                        '[[bank]]\nname = "i"\nsource = "imgs/"\ncategory = "c"\naction = "downrank"\n', base_dir="/x")
    p, m, i = banks
    assert (p.kind, p.pdq_max_distance, p.pdq_min_quality, p.source) == ("pdq", 20, 70, "/x/l.txt")
    assert (m.kind, m.source, m.pdq_max_distance) == ("md5", "s3://b/m.csv", 31)
    assert (i.kind, i.is_hash) == ("images", False)


def test_every_bad_hash_bank_setting_is_reported_at_its_line() -> None:
    text = ('[[bank]]\nname = "p"\nkind = "sha1"\nsource = "l"\ncategory = "c"\naction = "filter"\n'   # line 3
            '[[bank]]\nname = "q"\nkind = "pdq"\nsource = "l"\ncategory = "c"\naction = "filter"\n'
            'pdq_max_distance = 300\n'                                                                  # line 13
            'pdq_min_quality = -1\n'                                                                    # line 14
            'fine_threshold = 0.5\n'                                                                    # line 15
            '[[bank]]\nname = "r"\nsource = "imgs"\ncategory = "c"\naction = "filter"\npdq_min_quality = 50\n')  # 21
    with pytest.raises(BankFileError) as e:
        parse_banks(text, "banks.toml")
    msg = str(e.value)
    for line, what in ((3, "kind 'sha1'"), (13, "pdq_max_distance"), (14, "pdq_min_quality"), (15, "fine_threshold"),
                       (21, "pdq_min_quality is for kind")):
        assert f"banks.toml:{line}:" in msg and what in msg, (line, what, msg)
    assert e.value.exit_code == 2


def test_manifest_without_hash_banks_writes_the_old_json_and_old_manifests_read(tmp_path) -> None:
    old = {"format": 1, "version": "v000001", "parent": None, "created_at": "2026-01-01T00:00:00+00:00",
           "model_id": "m", "dims": {"coarse": 128, "rerank": 512},
           "thresholds": {"coarse": 0.5, "fine": 0.7, "rerank_k": 500, "norm": {"beta": 0.0, "k": 1}},
           "rerank_dtype": "float16", "coarse_index": {"type": "flat", "hnsw_m": 32, "ivf_nlist": None,
                                                       "nprobe": 32, "ef_search": 128},
           "shards": [], "entries": {"file": "entries.parquet", "sha256": "0" * 64, "rows": 0},
           "banks": {"b": {"name": "b", "source": "s", "category": "c", "action": "filter", "fine_threshold": None,
                           "enabled": True, "count": 0}},
           "counts": {"images": 0, "memberships": 0}, "rejected": [], "disabled_references": []}
    m = Manifest.from_dict(old)
    assert m.hash_lists == () and m.banks["b"].bank.kind == "images"
    again = Manifest.from_json(m.to_json())
    assert json.loads(again.to_json()) == json.loads(m.to_json()) and "hash_lists" not in m.to_json()
    assert m.to_json() == json.dumps(old, indent=2) + "\n"  # byte-identical: no new key for an images-only gallery


def _banks() -> dict[str, Bank]:
    return {"pblock": Bank("pblock", "-", "c/b", "filter", kind="pdq"),
            "pallow": Bank("pallow", "-", "c/a", "allow", kind="pdq", pdq_max_distance=10),
            "m": Bank("m", "-", "c/m", "downrank", kind="md5"),
            "floor": Bank("floor", "-", "c/f", "filter", kind="pdq", pdq_min_quality=90)}


def test_hash_banks_query_distance_per_bank_md5_exact_and_quality_floor() -> None:
    hb = HashBanks(_banks(), {"pblock": [HashEntry(PDQ_A, "e1", '{"k":1}')], "pallow": [HashEntry(PDQ_A)],
                              "m": [HashEntry("a" * 32, "m1")], "floor": [HashEntry(PDQ_A)]})
    q = hb.query(["A" * 32, None], [PDQ_B, PDQ_B], [80, 95])
    by = {h.bank: h for h in q[0].hits}
    assert set(by) == {"pblock", "m"}  # pallow: 16 > its 10 bits; floor: quality 80 < 90
    assert by["pblock"].distance == 16 and by["pblock"].entry_key == "e1" and by["m"].distance == 0
    assert q[0].below_quality == ("floor",) and {h.bank for h in q[1].hits} == {"pblock", "floor"}


def _hit(bank: str, action: str, signal: str, distance: int, idx: int = 0) -> HashHit:
    return HashHit(bank, "c", action, signal, distance, idx, HashEntry(PDQ_A if signal == "pdq" else "a" * 32))


def test_decision_rule_strongest_wins_allow_at_least_as_strong_wins_ties_by_bank() -> None:
    desc = Match("matched", "filter", "imgs", "c", 7, 0.9, 0.95, 0.95)
    # pdq is stronger than the descriptor
    m = GalleryIndex.decide_signals(desc, HashQuery((_hit("p", "downrank", "pdq", 20),)))
    assert (m.status, m.bank, m.signal, m.pdq_distance, m.reference_id) == ("matched", "p", "pdq", 20, None)
    # md5 beats pdq at distance 0; a nearer pdq beats a farther one
    m = GalleryIndex.decide_signals(None, HashQuery((_hit("p", "filter", "pdq", 0), _hit("m", "downrank", "md5", 0))))
    assert (m.bank, m.signal) == ("m", "md5")
    m = GalleryIndex.decide_signals(None, HashQuery((_hit("far", "filter", "pdq", 9), _hit("near", "downrank", "pdq", 3))))
    assert m.bank == "near"
    # an allow at equal strength wins; a weaker one does not
    m = GalleryIndex.decide_signals(desc, HashQuery((_hit("b", "filter", "pdq", 5), _hit("a", "allow", "pdq", 5))))
    assert (m.status, m.action, m.bank) == ("clean", "none", "a")
    m = GalleryIndex.decide_signals(desc, HashQuery((_hit("b", "filter", "pdq", 5), _hit("a", "allow", "pdq", 6))))
    assert (m.status, m.bank) == ("matched", "b")
    # a descriptor allow is weaker than any hash block
    allow_desc = Match("clean", "none", "fp", "c", 3, 0.9, 0.99, 0.99)
    assert GalleryIndex.decide_signals(allow_desc, HashQuery((_hit("b", "filter", "pdq", 30),))).status == "matched"
    # ties: filter over downrank, then bank name, whatever the order of arrival
    hits = (_hit("zz", "filter", "pdq", 4), _hit("aa", "downrank", "pdq", 4), _hit("bb", "filter", "pdq", 4))
    assert GalleryIndex.decide_signals(None, HashQuery(hits)).bank == "bb"
    assert GalleryIndex.decide_signals(None, HashQuery(hits[::-1])).bank == "bb"
    # the descriptor alone: unchanged, labelled
    assert GalleryIndex.decide_signals(desc, HashQuery()).signal == "descriptor"
    assert GalleryIndex.decide_signals(None, HashQuery()) is None


# ---------------------------------------------------------------------------------------------
# the stored PDQ index: written once with the version, mapped by readers; old versions
# ---------------------------------------------------------------------------------------------
def _version_with_lists(tmp_path: Path, n_pdq: int = 3000) -> tuple[Store, np.ndarray]:
    """A version with 3 images, a pdq bank whose list file repeats 40 lines, and an md5 bank."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n_pdq, 32), dtype=np.uint8)
    lines = [f"pdq {c.tobytes().hex()}" for c in codes] + [f"pdq {c.tobytes().hex()}" for c in codes[:40]]
    (tmp_path / "ncmec.pdq.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "m.txt").write_text(f"{'a' * 32}\n{'b' * 32}\n")  # a bare-hash file
    (tmp_path / "q.csv").write_text("hash,entry_id,metadata\n" + "".join(
        f'{c.tobytes().hex()},q-{i},"{{""n"": {i}}}"\n' if i % 2 else f"{c.tobytes().hex()},,\n"
        for i, c in enumerate(codes[:6])))
    banks = {"imgs": Bank("imgs", "-", "c/i", "filter"),
             "p": Bank("p", str(tmp_path / "ncmec.pdq.txt"), "c/p", "filter", kind="pdq"),
             "q": Bank("q", str(tmp_path / "q.csv"), "c/q", "filter", kind="pdq"),
             "m": Bank("m", str(tmp_path / "m.txt"), "c/m", "downrank", kind="md5")}
    ids = np.array([3, 5, 8], np.int64)
    coarse, rerank = rng.standard_normal((3, 128)).astype(np.float32), rng.standard_normal((3, 512)).astype(np.float32)
    entries = pd.DataFrame({"id": ids, "bank": "imgs", "category": "c/i", "action": "filter", "source_uri": ["x"] * 3,
                            "sha256": ["a", "b", "c"], "added_at": pd.Timestamp.now(tz="UTC")})
    lists = {n: read_list(banks[n].source, banks[n].kind) for n in ("p", "q", "m")}
    store = open_store(str(tmp_path / "g"), create=True)
    G.write_version(store, G.GalleryContent(ids, coarse, rerank, entries, banks, lists=lists),
                    G.VersionModel("m", 128, 512, 0.1, 0.5), n_shards=1)
    return store, codes


def _near(codes: np.ndarray, seed: int = 1) -> list[str]:
    """Queries: entries with 0-40 bits flipped, and unrelated hashes."""
    rng = np.random.default_rng(seed)
    from jobs.bench.hashes import flip_bits

    q = flip_bits(codes[rng.integers(0, len(codes), 200)], rng.integers(0, 41, 200), rng)
    return [c.tobytes().hex() for c in np.concatenate([q, rng.integers(0, 256, (50, 32), dtype=np.uint8)])]


def test_a_version_stores_the_pdq_index_and_readers_map_it(tmp_path: Path) -> None:
    store, codes = _version_with_lists(tmp_path)
    m = G.read_manifest(store)
    p, md5 = (next(h for h in m.hash_lists if h.bank == b) for b in ("p", "m"))
    assert (p.count, p.duplicates, p.index) == (3000, 40, "list-p.pdq-index.safetensors")
    assert (md5.count, md5.duplicates, md5.index) == (2, 0, None)  # md5 lists have no stored index
    assert (p.index, p.index_sha256) in m.files()
    vdir = tmp_path / "g" / "versions" / m.version
    assert hashlib.sha256((vdir / p.index).read_bytes()).hexdigest() == p.index_sha256
    info = G.info(store)["hash_lists"]
    assert info["p"]["duplicates_dropped"] == 40 and info["p"]["stored_index"] == p.index
    lists = read_lists(store, m)
    index = lists["p"].pdq_index
    assert isinstance(index, PdqIndex) and index.kind == "flat"  # 3,000 <= FLAT_MAX: flat over the mapped codes
    assert isinstance(index.arrays()["codes"], np.memmap) and index.arrays()["codes"].filename == str(vdir / p.index)
    # the loaded version queries through the mapped index, not a rebuilt one
    g = G.open_gallery(store, None)
    assert isinstance(g.hash_banks.index["p"], PdqIndex) and isinstance(g.hash_banks.index["p"].arrays()["codes"], np.memmap)
    # the same file searched as multi-hash (forced at this size) gives flat's matches at 0-40 bits
    mapped = PdqIndex.mapped(vdir / p.index, kind="auto", flat_max=100)
    assert mapped.kind == "mih" and all(isinstance(a, np.memmap) for a in mapped.arrays().values())
    queries = _near(codes)
    for r in (0, 12, 31, 32, 40):
        assert mapped.query(queries, r) == PdqIndex(codes, "flat").query(queries, r), r
    # the list round-trips for the next version without opening the index
    assert read_lists(store, m, indexes=False)["p"].pdq_index is None and read_lists(store, m, indexes=False)["p"] == lists["p"]


def test_lazy_lists_make_entries_on_access_from_the_mapped_codes(tmp_path: Path) -> None:
    store, codes = _version_with_lists(tmp_path)
    m = G.read_manifest(store)
    eager, lazy = read_lists(store, m), read_lists(store, m, lazy=True)
    assert read_lists(store, m, checked=True, lazy=True) == lazy  # a node cache's verified copy: not hashed again
    assert isinstance(lazy["p"], IndexedEntries) and isinstance(lazy["q"], IndexedEntries)
    assert not isinstance(lazy["m"], IndexedEntries)  # md5: no stored index, a plain list
    for b in ("p", "q", "m"):
        assert len(lazy[b]) == len(eager[b]) and lazy[b] == eager[b] and list(lazy[b]) == list(eager[b])
    q = lazy["q"]
    assert q[1] == HashEntry(codes[1].tobytes().hex(), "q-1", '{"n":1}') and q[0] == HashEntry(codes[0].tobytes().hex())
    assert q[-1] == eager["q"][-1] and q[1:3] == eager["q"][1:3]
    with pytest.raises(IndexError):
        q[6]
    assert isinstance(lazy["p"], IndexedEntries) and lazy["p"].duplicates == 40
    banks = {b: Bank(b, "-", "c", "filter", kind="pdq") for b in ("p", "q")}
    queries = _near(codes)
    n = len(queries)
    assert HashBanks(banks, lazy).query([None] * n, queries, [100] * n) == HashBanks(banks, eager).query([None] * n, queries, [100] * n)


def test_a_corrupt_stored_index_is_refused(tmp_path: Path) -> None:
    store, _ = _version_with_lists(tmp_path, 500)
    m = G.read_manifest(store)
    path = tmp_path / "g" / "versions" / m.version / "list-p.pdq-index.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryIntegrityError, match="checksum mismatch"):
        read_lists(store, m)


def test_versions_without_a_stored_index_still_load_and_build_it(tmp_path: Path) -> None:
    """A version written before the stored index existed: the manifest has no index keys, the
    folder no index file; the list loads, the index is built on load and answers the same."""
    store, codes = _version_with_lists(tmp_path, 800)
    m = G.read_manifest(store)
    vdir = tmp_path / "g" / "versions" / m.version
    d = json.loads((vdir / "manifest.json").read_text())
    for h in d["hash_lists"]:
        (vdir / h.pop("index")).unlink() if "index" in h else None
        h.pop("index_sha256", None)
        h.pop("duplicates", None)
    (vdir / "manifest.json").write_text(json.dumps(d, indent=2) + "\n")
    old = G.read_manifest(store)
    assert all(h.index is None and h.duplicates == 0 for h in old.hash_lists)
    assert not any("pdq-index" in f for f, _ in old.files())
    lists = read_lists(store, old)
    assert lists["p"].pdq_index is None and len(lists["p"]) == 800
    banks = HashBanks({"p": Bank("p", "-", "c", "filter", kind="pdq")}, lists)
    assert not isinstance(banks.index["p"].arrays()["codes"], np.memmap)  # built here
    queries = _near(codes)
    got = banks.query([None] * len(queries), queries, [100] * len(queries))
    want = PdqIndex(codes, "flat").query(queries, 31)
    assert [[h.entry_idx for h in q.hits] for q in got] == [[x.entry_idx for x in row] for row in want]
    assert sum(map(len, want)) > 10
