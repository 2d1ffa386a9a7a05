"""pipeline/gallery/sharded.py and ``[job] gallery_shard_servers``: a version served by shard servers
(Ray actors on a real local cluster) decides exactly as the single-copy index."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.runtime.job_config import JobConfig
from jobs.runtime.ray_stages import shard_servers
from pipeline import gallery as G
from pipeline.gallery.banks import Bank
from pipeline.gallery.index import CoarseIndexSpec
from pipeline.gallery.nodecache import NodeCache
from pipeline.gallery.sharded import GalleryShardServer, LocalShardServers, RemoteCascade
from pipeline.gallery.store import GalleryIntegrityError
from pipeline.ingest.storage import open_store

N_SHARDS = 5  # two servers: shards 0, 2, 4 and 1, 3


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _version(root: Path, spec: CoarseIndexSpec, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """A version of ``n`` entries over :data:`N_SHARDS` shards, with exact duplicates across shards
    (ids 2j and 2j + 1 share both vectors for j < 40: ties that only the merge order breaks)."""
    rng = np.random.default_rng(0)
    coarse, rerank = _unit(rng.standard_normal((n, 128))), _unit(rng.standard_normal((n, 512)))
    coarse[1:80:2], rerank[1:80:2] = coarse[0:80:2], rerank[0:80:2]
    ids = np.arange(n, dtype=np.int64)
    entries = pd.DataFrame({"id": ids, "bank": np.where(ids % 3 == 0, "a", "b"), "category": "c",
                            "action": np.where(ids % 3 == 0, "filter", "downrank"), "source_uri": "s3://r/x.jpg",
                            "sha256": [f"{i:064x}" for i in ids], "added_at": pd.Timestamp.now(tz="UTC")})
    extra = entries[entries["id"] % 7 == 0].assign(bank="allow", action="allow")  # allow-list memberships too
    banks = {"a": Bank("a", "-", "c", "filter"), "b": Bank("b", "-", "c", "downrank"),
             "allow": Bank("allow", "-", "c", "allow")}
    content = G.GalleryContent(ids, coarse, rerank, pd.concat([entries, extra], ignore_index=True), banks)
    G.write_version(open_store(str(root), create=True), content, G.VersionModel("m", 128, 512, 0.1, 0.5),
                    n_shards=N_SHARDS, coarse_spec=spec)
    return coarse, rerank


def _queries(coarse: np.ndarray, rerank: np.ndarray, n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    pick = np.concatenate([np.arange(0, 80, 2)[:24], rng.choice(np.arange(80, len(coarse)), n - 24, replace=False)])
    q128 = _unit(coarse[pick] + 0.04 * rng.standard_normal((n, 128)))
    q512 = _unit(rerank[pick] + rng.uniform(0.02, 0.12, (n, 1)) * rng.standard_normal((n, 512)))
    q128[-10:], q512[-10:] = _unit(rng.standard_normal((10, 128))), _unit(rng.standard_normal((10, 512)))
    return q128, q512


def _decisions(g: G.GalleryIndex, q128: np.ndarray, q512: np.ndarray) -> tuple[list[tuple], np.ndarray]:
    res = g.search(q128, lambda rows: q512[rows])
    exact = [(m.status, m.action, m.bank, m.category, m.reference_id, m.rule, m.coarse_score) for m in res.matches]
    scores = np.array([np.nan if m.fine_score is None else m.fine_score for m in res.matches])
    return exact, scores


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_shard_servers_decide_like_the_single_copy_index(tmp_path: Path, ray_cluster, kind: str) -> None:
    spec = CoarseIndexSpec(kind, ivf_nlist=8, nprobe=8, ef_search=256)
    coarse, rerank = _version(tmp_path / "g", spec)
    q128, q512 = _queries(coarse, rerank)
    uri, cache_dir = str(tmp_path / "g"), str(tmp_path / "cache")
    single = G.open_gallery(uri, None)  # a private copy: no node cache, no servers
    cfg = JobConfig(gallery_shard_servers=2, gallery_cache_dir=cache_dir)
    with shard_servers(cfg, uri, single.version) as servers:
        assert servers is not None and len(servers) == 2
        infos = servers.call("info", [(0, ()), (1, ())])
        assert [i["shards"] for i in infos] == [[0, 2, 4], [1, 3]]
        assert sum(i["ntotal"] for i in infos) == single.cascade.ntotal == 2000
        sharded = G.open_gallery(uri, None, cache=NodeCache(cache_dir), servers=servers)
        assert isinstance(sharded.cascade, RemoteCascade) and sharded.cascade.ntotal == 2000
        # stage 1: the same ids in the same order (ties between the duplicated entries included)
        want, got = single.coarse_hits(q128), sharded.coarse_hits(q128)
        np.testing.assert_array_equal(got.I, want.I)
        np.testing.assert_array_equal(got.D, want.D)
        ties = sum(int(np.sum(np.diff(want.D[q][want.I[q] >= 0]) == 0)) for q in range(len(q128)))
        # the tie-break was exercised (IVF codes are residuals to each shard's own centroids: no exact ties)
        assert ties >= 20 or kind == "ivf"
        # stage 2 and the decisions: identical; fine scores equal (same matmul shapes on every server)
        want_d, want_f = _decisions(single, q128, q512)
        got_d, got_f = _decisions(sharded, q128, q512)
        assert got_d == want_d
        np.testing.assert_allclose(got_f, want_f, rtol=0, atol=1e-6, equal_nan=True)
        assert sum(d[0] == "matched" for d in want_d) >= 30 and any(d[2] == "allow" for d in want_d)
        assert sum(d[0] == "clean" and d[2] is None for d in want_d) >= 10
        # a candidate list with a duplicate pair across the two servers is scored on both
        I = np.array([[0, 1, -1], [3, 2, 4]], np.int64)
        np.testing.assert_array_equal(sharded.cascade.score_fine(q512[:2], I), single.cascade.score_fine(q512[:2], I))


def test_a_server_that_cannot_load_its_version_says_why(tmp_path: Path, ray_cluster) -> None:
    from jobs.runtime.ray_stages import raise_worker_error
    from pipeline.gallery.store import GalleryNotFound

    _version(tmp_path / "g", CoarseIndexSpec("flat"), n=200)
    cfg = JobConfig(gallery_shard_servers=2, gallery_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(GalleryNotFound, match="gallery version v000009 has no manifest"):
        try:
            with shard_servers(cfg, str(tmp_path / "g"), "v000009"):
                pass
        except Exception as e:
            raise_worker_error(e)  # what the job's _fail does with it


def test_a_server_holds_only_its_shards(tmp_path: Path) -> None:
    coarse, _ = _version(tmp_path / "g", CoarseIndexSpec("flat"), n=500)
    version = G.open_gallery(str(tmp_path / "g"), None).version
    srv = GalleryShardServer(str(tmp_path / "g"), version, 1, 2, cache_dir=str(tmp_path / "cache"))
    held = np.asarray(srv.index.sorted_ids)
    assert srv.info() == {"version": version, "n_shards": N_SHARDS, "shards": [1, 3], "ntotal": len(held)}
    np.testing.assert_array_equal(held, [i for i in range(500) if i % N_SHARDS in (1, 3)])
    # its rerank vectors are those ids' only, in this process's own memory (not the node's mapped file)
    assert srv.index.rerank_matrix.shape == (len(held), 512) and not isinstance(srv.index.rerank_matrix.base, np.memmap)
    parts = srv.search_coarse(coarse[:4], 10)
    assert [s for s, _, _ in parts] == [1, 3] and all(np.all(I % N_SHARDS == s) for s, _, I in parts)
    with pytest.raises(ValueError, match="shard server 2 of 2"):
        GalleryShardServer(str(tmp_path / "g"), version, 2, 2, cache_dir=str(tmp_path / "cache"))


def test_three_servers_in_process_decide_like_the_single_copy_index(tmp_path: Path) -> None:
    """The client without Ray (LocalShardServers): 3 servers over 5 shards, one of them holding 1."""
    coarse, rerank = _version(tmp_path / "g", CoarseIndexSpec("flat"))
    q128, q512 = _queries(coarse, rerank)
    uri, cache = str(tmp_path / "g"), NodeCache(tmp_path / "cache")
    single = G.open_gallery(uri, None, cache=cache)
    servers = LocalShardServers([GalleryShardServer(uri, single.version, j, 3, cache_dir=str(cache.root))
                                 for j in range(3)])
    assert [s.shard_numbers for s in servers.servers] == [[0, 3], [1, 4], [2]]
    sharded = G.open_gallery(uri, None, cache=cache, servers=servers)
    want_d, want_f = _decisions(single, q128, q512)
    got_d, got_f = _decisions(sharded, q128, q512)
    assert got_d == want_d and sum(d[0] == "matched" for d in want_d) >= 30
    np.testing.assert_allclose(got_f, want_f, rtol=0, atol=1e-6, equal_nan=True)
    assert isinstance(sharded.cascade, RemoteCascade) and sharded.cascade.seconds > 0
    with pytest.raises(GalleryIntegrityError, match="do not hold every shard exactly once"):
        RemoteCascade(LocalShardServers(servers.servers[:2]), single.manifest)


def _flag_rows(out: Path, day: str) -> pd.DataFrame:
    from pipeline.moderation import flags as F

    df = F.read_flags(str(out), day).drop(columns=["run_id", "processed_at"], errors="ignore")
    return df.sort_values("image_key").reset_index(drop=True)


def test_a_job_with_two_shard_servers_writes_the_rows_of_one_without(ops_world, ray_cluster, tmp_path: Path) -> None:
    from operator_world import DAY

    from jobs.runtime.run import moderate

    rows = {}
    for n in (0, 2):
        cfg = JobConfig(batch_size=8, gallery_shard_servers=n, write_signatures=False)
        info = moderate(str(ops_world["uploads"]), str(ops_world["gallery"]), str(tmp_path / f"flags-{n}"), DAY,
                        cfg=cfg, review=False)
        assert info["config"]["gallery_shard_servers"] == n
        # the Moderators waited on the servers (their summed time) only when there were servers
        assert ("shard_servers" in info["stage_seconds_summed_over_workers"]) == bool(n)
        rows[n] = _flag_rows(tmp_path / f"flags-{n}", DAY)
    want, got = rows[0], rows[2]
    assert len(got) == len(ops_world["uploads_list"]) and got["image_key"].is_unique
    exact = [c for c in want.columns if c not in ("coarse_score", "fine_score", "fine_score_raw")]
    pd.testing.assert_frame_equal(got[exact], want[exact])
    for c in ("coarse_score", "fine_score", "fine_score_raw"):
        np.testing.assert_allclose(got[c].astype(float), want[c].astype(float), rtol=0, atol=1e-6, equal_nan=True)
    assert (want["status"] == "matched").sum() >= 5 and (want["status"] == "error").sum() >= 1


def _kill_server_when_busy(out: Path, stop: threading.Event, killed: list[int]) -> None:
    import psutil

    while not stop.is_set():
        if any(out.glob("_staging/*/*/timings/[!d]*")):  # the run's first Moderator timing record
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "GalleryShardServer" in " ".join(p.info["cmdline"] or []):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_shard_server_killed_mid_job_loses_no_upload(ops_world, ray_cluster, tmp_path: Path) -> None:
    from operator_world import DAY

    from jobs.runtime.run import moderate

    src = tmp_path / "up"
    for i in range(4):  # enough batches of 2 that the kill lands mid-job
        shutil.copytree(ops_world["uploads"], src / f"r{i}")
    rows = {}
    for n in (0, 2):
        out, stop, killed = tmp_path / f"flags-{n}", threading.Event(), []
        th = threading.Thread(target=_kill_server_when_busy, args=(out, stop, killed), daemon=True)
        if n:
            th.start()
        try:
            moderate(str(src), str(ops_world["gallery"]), str(out), DAY, review=False,
                     cfg=JobConfig(batch_size=2, gallery_shard_servers=n, write_signatures=False))
        finally:
            stop.set()
        assert bool(killed) == bool(n), "the server was never killed: the test did not exercise the fault"
        rows[n] = _flag_rows(out, DAY)
    assert len(rows[2]) == 4 * len(ops_world["uploads_list"]) and rows[2]["image_key"].is_unique
    # Ray restarted the server (it re-attached its node's cache) and retried the calls: no error row either
    cols = ["image_key", "status", "action", "bank", "reference_id", "error_code"]
    pd.testing.assert_frame_equal(rows[2][cols], rows[0][cols])
