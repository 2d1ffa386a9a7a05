"""pipeline/gallery/nodecache.py: one verified, memory-mapped copy of a version per node."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CoarseIndexSpec
from pipeline.gallery.nodecache import NodeCache, cached_status, drop_from_page_cache, resident_bytes
from pipeline.ingest.storage import open_store


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(root: Path, n: int = 3000, spec: CoarseIndexSpec | str | None = None, seed: int = 0,
           publish_twice: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coarse, rerank = _unit(rng.standard_normal((n, 128))), _unit(rng.standard_normal((n, 512)))
    ids = np.arange(n, dtype=np.int64) * 3 + 1  # compact enough for the dense row table
    now = pd.Timestamp.now(tz="UTC")
    entries = pd.DataFrame({"id": ids, "bank": np.where(ids % 2 == 0, "a", "b"), "category": "c",
                            "action": np.where(ids % 2 == 0, "filter", "downrank"), "source_uri": "s3://r/x.jpg",
                            "sha256": [f"{i:064x}" for i in ids], "added_at": now})
    # id 4 is in both banks: memberships come from the entries, not one per id
    extra = entries[entries["id"] == 4].assign(bank="allow", action="allow")
    banks = {"a": Bank("a", "-", "c", "filter"), "b": Bank("b", "-", "c", "downrank"),
             "allow": Bank("allow", "-", "c", "allow")}
    content = G.GalleryContent(ids, coarse, rerank, pd.concat([entries, extra], ignore_index=True), banks)
    store = open_store(str(root), create=True)
    for _ in range(publish_twice):
        G.write_version(store, content, G.VersionModel("m", 128, 512, 0.1, 0.5), n_shards=3, coarse_spec=spec)
    return coarse, rerank


def _queries(coarse: np.ndarray, rerank: np.ndarray, n: int = 60, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(coarse), n, replace=False)
    q128 = _unit(coarse[pick] + 0.04 * rng.standard_normal((n, 128)))
    q512 = _unit(rerank[pick] + rng.uniform(0.02, 0.12, (n, 1)) * rng.standard_normal((n, 512)))
    q128[:10] = _unit(rng.standard_normal((10, 128)))  # unrelated queries too
    q512[:10] = _unit(rng.standard_normal((10, 512)))
    return q128, q512


def _decisions(g: G.GalleryIndex, q128: np.ndarray, q512: np.ndarray) -> list[tuple]:
    res = g.search(q128, lambda rows: q512[rows])
    return [(m.status, m.action, m.bank, m.reference_id, m.rule, None if m.fine_score is None else round(m.fine_score, 5))
            for m in res.matches]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_cached_version_decides_like_a_private_copy_and_maps_its_arrays(tmp_path: Path, kind: str) -> None:
    spec = CoarseIndexSpec(kind, ivf_nlist=8, nprobe=8, ef_search=256)
    coarse, rerank = _write(tmp_path / "g", spec=spec)
    q128, q512 = _queries(coarse, rerank)
    private = G.open_gallery(str(tmp_path / "g"), None)
    cache = NodeCache(tmp_path / "cache")
    shared = G.open_gallery(str(tmp_path / "g"), None, cache=cache)
    want = _decisions(private, q128, q512)
    assert _decisions(shared, q128, q512) == want
    assert sum(d[0] == "matched" for d in want) >= 30  # the comparison covers matches, not only clean rows
    # the big arrays are views of files, not copies in this process
    assert isinstance(shared.cascade.rerank_matrix.base, np.memmap)
    assert isinstance(shared.cascade.sorted_ids.base, np.memmap)
    ids_col = shared.entries_table.column("id").chunk(0)
    assert ids_col.buffers()[1].address != 0 and not isinstance(shared.entries_table, pd.DataFrame)
    assert shared.entries.shape == private.entries.shape  # the DataFrame tools read is still there
    (row,) = cached_status(tmp_path / "cache")
    assert row["version"] == private.version and row["bytes"] > 0


def _page_cache_can_drop(folder: Path) -> bool:
    """Whether this filesystem lets a written file's pages leave the page cache (not tmpfs)."""
    probe = folder / "probe.bin"
    probe.write_bytes(b"x" * (1 << 20))
    drop_from_page_cache(probe)
    return resident_bytes(probe) == 0


def test_attach_after_fill_reads_no_storage_and_restarts_attach(tmp_path: Path) -> None:
    _write(tmp_path / "g")
    cache = NodeCache(tmp_path / "cache")
    first = cache.attach(str(tmp_path / "g"))
    assert first.filled
    # the fill leaves its files on disk, not in the page cache (the job pages in what it reads)
    rerank = first.path / "rerank.npy"
    if _page_cache_can_drop(tmp_path):
        assert resident_bytes(rerank) <= rerank.stat().st_size // 4, resident_bytes(rerank)
    again = NodeCache(tmp_path / "cache").attach(str(tmp_path / "g"), first.manifest.version)
    assert not again.filled and again.manifest == first.manifest
    # the version's files are gone from storage: a pinned attach still works from the node's copy
    for f in (tmp_path / "g" / "versions" / first.manifest.version).iterdir():
        if f.name != "manifest.json":
            f.unlink()
    g = G.open_gallery(str(tmp_path / "g"), None, version=first.manifest.version, cache=NodeCache(tmp_path / "cache"))
    assert g.cascade.ntotal == 3000


def test_a_tampered_file_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    _write(tmp_path / "g")
    m = G.read_manifest(open_store(str(tmp_path / "g")))
    f = tmp_path / "g" / "versions" / m.version / m.shards[1].rerank
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(G.GalleryIntegrityError, match="checksum mismatch"):
        NodeCache(tmp_path / "cache").attach(str(tmp_path / "g"))
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name.startswith("v0")]
    assert leftovers == []


def test_a_truncated_cache_file_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "g")
    att = NodeCache(tmp_path / "cache").attach(str(tmp_path / "g"))
    p = att.path / "rerank.npy"
    os.truncate(p, p.stat().st_size - 100)
    with pytest.raises(G.GalleryIntegrityError, match="rerank.npy is missing or truncated"):
        NodeCache(tmp_path / "cache").attach(str(tmp_path / "g"), att.manifest.version)


def _attach_in_child(gallery: str, root: str, barrier: Any, filled: Any) -> None:
    barrier.wait()
    filled.put(NodeCache(root).attach(gallery).filled)


def test_concurrent_processes_fill_once(tmp_path: Path) -> None:
    _write(tmp_path / "g", n=20000)
    ctx = mp.get_context("spawn")
    barrier, filled = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_attach_in_child, args=(str(tmp_path / "g"), str(tmp_path / "cache"), barrier, filled))
             for _ in range(3)]
    for p in procs:
        p.start()
    got = sorted(filled.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [False, False, True]
    assert [p.exitcode for p in procs] == [0, 0, 0]


def test_old_versions_are_evicted_unless_mapped(tmp_path: Path) -> None:
    _write(tmp_path / "g", publish_twice=1)
    cache = NodeCache(tmp_path / "cache", keep_versions=1)
    v1 = cache.attach(str(tmp_path / "g")).manifest.version  # this process maps v1: it stays
    _write(tmp_path / "g", publish_twice=2, seed=3)
    v3 = cache.attach(str(tmp_path / "g")).manifest.version
    held = sorted(r["version"] for r in cached_status(tmp_path / "cache"))
    assert v1 in held and v3 in held
    # another process attaching a newer version removes what nobody maps (v2 was never attached)
    assert len(held) == 2


def test_float16_coarse_codes_are_the_default_and_old_manifests_read_as_float32() -> None:
    assert CoarseIndexSpec().codes == "float16" and CoarseIndexSpec().factory(100) == "SQfp16"
    assert CoarseIndexSpec.from_manifest({"type": "flat"}).codes == "float32"
    assert CoarseIndexSpec.from_manifest(None).factory(100) == "Flat"
    assert CoarseIndexSpec.parse("HNSW32,SQfp16") == CoarseIndexSpec("hnsw", hnsw_m=32, codes="float16")
    with pytest.raises(ValueError, match="codes"):
        CoarseIndexSpec(codes="int4")


def test_rerank_rows_read_at_random_page_in_only_themselves(tmp_path) -> None:
    """The rerank matrix is mapped with MADV_RANDOM: reading one candidate row pages in that row,
    not the kernel's read-around (128 KB or more about it). Measured with mincore after the file's
    pages are dropped (POSIX_FADV_DONTNEED); a plain map of the same file shows the read-around."""
    from pipeline.gallery.nodecache import random_access

    path = tmp_path / "rerank.npy"
    np.save(path, np.ones((32768, 512), np.float16))  # 32 MiB, 1 KiB rows

    if not _page_cache_can_drop(tmp_path):
        pytest.skip("this filesystem keeps written pages resident (tmpfs?): read-around cannot be seen")

    def pages_after_reading_rows(advised: bool) -> int:
        drop_from_page_cache(path)
        a = np.load(path, mmap_mode="r")
        a = random_access(a) if advised else a
        assert float(a[20000].sum()) == 512.0 and float(a[9000].sum()) == 512.0
        n = resident_bytes(path) // 4096
        del a
        return n

    plain, advised = pages_after_reading_rows(False), pages_after_reading_rows(True)
    assert advised <= 8, (advised, plain)  # two rows and the header, a page or two each
    assert plain >= 4 * advised, (plain, advised)  # the kernel read around them
