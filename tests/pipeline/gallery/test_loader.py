"""pipeline/gallery/loader.py: the streaming gallery loader (``open_gallery``, ``load_streaming``): same index as whole-file loading, every
byte verified, and a load peak close to what stays resident (``bench memory``); a tampered shard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from models.card import read_card
from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CascadeIndex
from pipeline.ingest.storage import open_store


def _write_gallery(root, n: int, n_shards: int, rerank_dtype: str, seed: int = 0, holes: bool = True) -> str:
    from pipeline.gallery import GalleryContent, VersionModel, write_version
    from pipeline.ingest.storage import open_store

    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(3 * n, n, replace=False)).astype(np.int64) if holes else np.arange(n, dtype=np.int64)
    coarse = rng.standard_normal((n, 128), dtype=np.float32)
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True)
    rerank = rng.standard_normal((n, 512), dtype=np.float32)
    rerank /= np.linalg.norm(rerank, axis=1, keepdims=True)
    now = pd.Timestamp.now(tz="UTC")
    entries = pd.DataFrame({"id": ids, "bank": "b", "category": "c", "action": "filter",
                            "source_uri": [f"s3://refs/b/{i:08d}.jpg" for i in ids],
                            "sha256": [f"{i:064x}" for i in ids], "added_at": now})
    write_version(open_store(str(root), create=True), GalleryContent(ids, coarse, rerank, entries,
                                                                      {"b": Bank("b", "-", "c", "filter")}),
                  VersionModel.from_card(read_card(None)), n_shards=n_shards, rerank_dtype=rerank_dtype)
    return str(root)


@pytest.mark.parametrize("rerank_dtype", ["float16", "int8", "float32"])
def test_streaming_load_equals_whole_file_load(tmp_path, rerank_dtype: str) -> None:
    from pipeline import gallery as G
    from pipeline.gallery.store import load_verified

    root = _write_gallery(tmp_path / "g", 3000, 3, rerank_dtype)
    g = G.open_gallery(root, None)
    store = open_store(root)
    m = G.read_manifest(store)
    shards, entries = load_verified(store, m)
    ref = CascadeIndex(shards, 128, 512)
    assert np.array_equal(g.cascade.sorted_ids, ref.sorted_ids)
    assert g.cascade.rerank_matrix.dtype == ref.rerank_matrix.dtype and np.array_equal(g.cascade.rerank_matrix, ref.rerank_matrix)
    pd.testing.assert_frame_equal(g.entries, entries)
    xq = np.random.default_rng(1).standard_normal((20, 128), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    D1, I1 = g.cascade.search_coarse(xq, 50, -1.0)
    D2, I2 = ref.search_coarse(xq, 50, -1.0)
    assert np.array_equal(I1, I2) and np.allclose(D1, D2)
    x512 = np.random.default_rng(2).standard_normal((20, 512), dtype=np.float32)
    assert np.allclose(g.cascade.score_fine(x512, I1), ref.score_fine(x512, I2))


@pytest.mark.parametrize("target,where", [("shard-001.rerank.safetensors", -5), ("shard-001.rerank.safetensors", 20),
                                          ("shard-000.faiss", 200), ("shard-000.faiss", -1)])
def test_streaming_load_refuses_any_changed_byte(tmp_path, target: str, where: int) -> None:
    from pipeline import gallery as G

    root = _write_gallery(tmp_path / "g", 500, 2, "float16")
    p = tmp_path / "g" / "versions" / "v000001" / target
    data = bytearray(p.read_bytes())
    data[where] ^= 0x01  # vectors, the safetensors header, the faiss header, the faiss tail
    p.write_bytes(bytes(data))
    with pytest.raises(G.GalleryIntegrityError, match=target):
        G.open_gallery(root, None)
    assert [x["file"] for x in G.verify(root)["problems"]] == [target]


_PROBE = r"""
import ctypes, gc, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import faiss, numpy, pandas, pyarrow.parquet, torch  # noqa: F401 - imports are not the gallery's memory
from pipeline.gallery import open_gallery
base = status("VmRSS:")
g = open_gallery(sys.argv[1], None)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed transients back to the OS: what stays is resident
print(status("VmHWM:") - base, status("VmRSS:") - base)
"""


def test_load_peak_is_close_to_resident(tmp_path) -> None:
    """Whole-file loading peaked at ~2.5x the resident size (file bytes, per-shard and merged
    matrices at once); the streaming loader must stay within 1.3x."""
    root = _write_gallery(tmp_path / "g", 60_000, 4, "float16", holes=False)
    r = subprocess.run([sys.executable, "-c", _PROBE, root], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    peak, resident = (int(x) for x in r.stdout.split())
    assert resident > 60_000 * 1024  # rerank float16 alone is 1 KiB per entry: the load really happened
    assert peak <= 1.3 * resident, f"peak {peak / 2**20:.0f} MiB > 1.3 x resident {resident / 2**20:.0f} MiB"




def test_tampered_shard_is_a_checksum_error(built) -> None:
    store, card, *_ = built
    p = store.path("versions/v000001/shard-001.rerank.safetensors")
    raw = bytearray(open(p, "rb").read())
    raw[-3] ^= 0x55
    open(p, "wb").write(bytes(raw))
    with pytest.raises(G.GalleryIntegrityError, match="checksum mismatch"):
        G.open_gallery(store, G.ModelRef(card.version_id))


def test_keypoints_round_trip_through_versions_and_are_checked(built) -> None:
    """Built versions store every reference's keypoints (sha256-checked, never unpickled); an add
    or remove carries them over; a changed byte, or a file that is not a keypoint table even with a
    matching checksum, refuses the version like any corrupt gallery file."""
    import json

    from pipeline.gallery.store import read_keypoints, sha256_hex

    store, card, extract, v, _stats, tmp = built
    m = G.read_manifest(store)
    table = read_keypoints(store, m)
    assert m.keypoints is not None and len(table) == m.counts.images == m.keypoints.entries
    assert table.n_keypoints == m.keypoints.keypoints and min(table.count(int(g)) for g in table.ids) > 40
    content = G.read_content(store).content
    assert set(content.keypoints) == set(content.ids.tolist())
    ids = sorted(content.keypoints)
    G.remove(store, None, ids=[ids[0]])
    t2 = read_keypoints(store, G.read_manifest(store))
    assert list(t2.ids) == ids[1:]
    np.testing.assert_array_equal(t2.get(ids[1]).desc, table.get(ids[1]).desc)  # carried over, not re-extracted
    vdir = Path(store.path(f"versions/{G.read_manifest(store).version}"))
    kp = vdir / "keypoints.safetensors"
    raw = bytearray(kp.read_bytes())
    raw[-5] ^= 0x21
    kp.write_bytes(bytes(raw))
    with pytest.raises(G.GalleryIntegrityError, match="checksum mismatch"):
        G.open_gallery(store, G.ModelRef(card.version_id))
    junk = b"{not a keypoint table}" * 10
    kp.write_bytes(junk)
    man = json.loads((vdir / "manifest.json").read_text())
    man["keypoints"]["sha256"] = sha256_hex(junk)
    (vdir / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(G.GalleryIntegrityError, match="malformed keypoint file"):
        G.open_gallery(store, G.ModelRef(card.version_id))
