"""Sharded serving: a gallery version too large for one node's memory, held by shard servers.

With ``[job] gallery_shard_servers = N`` the job starts N :class:`GalleryShardServer` actors
(``jobs/runtime/ray_stages.py``); server ``j`` holds the version's shards ``i`` with ``i % N == j``: their
coarse indexes, mapped from its node's cache (:mod:`pipeline.gallery.nodecache`), and the rerank
vectors of their ids, copied into its memory. The Moderator actors hold no vectors: their
:class:`RemoteCascade` has the interface of :class:`~pipeline.gallery.index.CascadeIndex` that
:class:`~pipeline.gallery.query.GalleryIndex` uses and

* sends each batch's coarse queries to every server, which answers each of its shards' own top-K;
  the answers are merged by :func:`~pipeline.gallery.index.merge_coarse` in shard order, exactly
  as the single-copy index merges its shards (same concatenation, same stable sort: same ties);
* reranks each candidate on the server that holds its vector: the ``(B, k)`` candidate table is
  sent to each server with the ids it does not hold blanked (``-1``), so every server scores in
  the shapes the single-copy index scores in (the same float results), and the answers are
  scattered back.

The decisions are the single-copy index's. Ray stays in ``jobs/``: the client calls the servers
through :class:`ShardServers`, which the job implements over Ray actor handles. Entries,
memberships, hash lists and keypoints still come from the node cache in each Moderator (small per
entry, or read from disk when used). Each batch costs one round-trip per server for the coarse
stage and one per server holding a candidate for the rerank (docs/clusters.md, "When to shard").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from pipeline.gallery.index import merge_coarse
from pipeline.gallery.manifest import Manifest
from pipeline.gallery.store import GalleryIntegrityError


def server_shards(n_shards: int, server: int, n_servers: int) -> list[int]:
    """The shards server ``server`` of ``n_servers`` holds: ``i % n_servers == server``."""
    return [i for i in range(n_shards) if i % n_servers == server]


class GalleryShardServer:
    """Shards ``i % n_servers == server`` of one gallery version, searched and scored on request.

    A plain class (tests call it directly); the job runs it as a Ray actor. ``cache_dir``: the
    node cache's folder (None: its default); ``nprobe`` / ``ef_search``: the job's coarse search
    overrides (None: the version's own)."""

    def __init__(self, gallery_uri: str, version: str, server: int, n_servers: int, cache_dir: str | None = None,
                 nprobe: int | None = None, ef_search: int | None = None) -> None:
        from pipeline.gallery.nodecache import NodeCache

        if not 0 <= server < n_servers:
            raise ValueError(f"shard server {server} of {n_servers}")
        att = NodeCache(cache_dir).attach(gallery_uri, version)
        self.version, self.n_shards = att.manifest.version, len(att.manifest.shards)
        self.shard_numbers = server_shards(self.n_shards, server, n_servers)
        # on the CPU: a server claims no GPU (its point is memory; the Moderators' GPUs run the model)
        self.index = att.cascade(use_gpu=False, nprobe=nprobe, ef_search=ef_search, shards=self.shard_numbers)
        for s, shard in zip(self.shard_numbers, self.index.shards):
            ids = np.asarray(shard.ids, np.int64)
            if len(ids) and np.any(ids % self.n_shards != s):  # the client routes each id to shard id % n
                raise GalleryIntegrityError(f"gallery {self.version}: shard {s} holds ids outside id % "
                                            f"{self.n_shards} == {s}; it cannot be served sharded")

    def info(self) -> dict[str, Any]:
        """What the client checks: the version, its shard count, the shards held and their entries."""
        return {"version": self.version, "n_shards": self.n_shards, "shards": self.shard_numbers,
                "ntotal": self.index.ntotal}

    def search_coarse(self, xq: np.ndarray, k: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Each held, non-empty shard's own top ``min(k, size)``: ``(shard number, D, I)``."""
        parts = self.index.search_shards(xq, k)
        return [(s, p[0], p[1]) for s, p in zip(self.shard_numbers, parts) if p is not None]

    def score_fine(self, xq512: np.ndarray, I: np.ndarray) -> np.ndarray:
        """:meth:`CascadeIndex.score_fine` over the held ids of ``I`` (every other slot ``-1``)."""
        return self.index.score_fine(xq512, I)


class ShardServers(Protocol):
    """The job's shard servers as the client sees them: ``len`` of them, numbered from 0, and
    :meth:`call`. ``jobs/runtime/ray_stages.py``'s ``RayShardServers`` calls Ray actors (``pipeline/``
    never imports Ray); :class:`LocalShardServers` calls objects in this process (tests, tools)."""

    def __len__(self) -> int: ...

    def call(self, method: str, calls: Sequence[tuple[int, tuple[Any, ...]]]) -> list[Any]:
        """``method(*args)`` of server ``j`` for every ``(j, args)``, all in flight at once -> the
        answers, in that order."""
        ...


class LocalShardServers:
    """:class:`ShardServers` over :class:`GalleryShardServer` objects of this process."""

    def __init__(self, servers: Sequence[GalleryShardServer]) -> None:
        self.servers = list(servers)

    def __len__(self) -> int:
        return len(self.servers)

    def call(self, method: str, calls: Sequence[tuple[int, tuple[Any, ...]]]) -> list[Any]:
        return [getattr(self.servers[j], method)(*args) for j, args in calls]


class RemoteCascade:
    """The coarse search and rerank of a version held by shard servers (:class:`ShardServers`,
    each a :class:`GalleryShardServer`), with the interface
    :class:`~pipeline.gallery.query.GalleryIndex` uses: :meth:`search_coarse`, :meth:`score_fine`,
    :attr:`ntotal`. Checks that the servers serve ``manifest``'s version, every shard once."""

    def __init__(self, servers: ShardServers, manifest: Manifest) -> None:
        if not len(servers):
            raise ValueError("a remote cascade needs at least one shard server")
        self.servers = servers
        infos = servers.call("info", [(j, ()) for j in range(len(servers))])
        self.n_shards = len(manifest.shards)
        self._server_of = np.full(self.n_shards, -1, np.int64)
        for j, info in enumerate(infos):
            if info["version"] != manifest.version or info["n_shards"] != self.n_shards:
                raise GalleryIntegrityError(f"shard server {j} serves {info['version']} ({info['n_shards']} shards), "
                                            f"not {manifest.version} ({self.n_shards} shards)")
            self._server_of[info["shards"]] = j
        if np.any(self._server_of < 0) or sum(len(i["shards"]) for i in infos) != self.n_shards:
            raise GalleryIntegrityError(f"shard servers of {manifest.version} do not hold every shard exactly once")
        self._ntotal = int(sum(i["ntotal"] for i in infos))
        self.seconds = 0.0  # spent waiting for the servers' answers (the cost of serving sharded)

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def search_coarse(self, xq: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`CascadeIndex.search_coarse`: every server's shards' top ``k``, merged in shard order."""
        xq = np.ascontiguousarray(xq, np.float32)
        if not len(xq):
            return merge_coarse([], 0, k, threshold)
        t = time.perf_counter()
        answers = self.servers.call("search_coarse", [(j, (xq, k)) for j in range(len(self.servers))])
        self.seconds += time.perf_counter() - t
        parts = {s: (D, I) for answer in answers for s, D, I in answer}
        return merge_coarse([parts[s] for s in sorted(parts)], len(xq), k, threshold)

    def score_fine(self, xq512: np.ndarray, I: np.ndarray) -> np.ndarray:
        """As :meth:`CascadeIndex.score_fine`: each candidate scored by the server holding it."""
        I = np.asarray(I, np.int64)
        F = np.full(I.shape, -np.inf, np.float32)
        valid = I >= 0
        owner = np.where(valid, self._server_of[np.where(valid, I, 0) % self.n_shards], -1)
        held = [j for j in range(len(self.servers)) if np.any(owner == j)]
        if not held:
            return F
        xq = np.asarray(xq512, np.float32)
        t = time.perf_counter()
        answers = self.servers.call("score_fine", [(j, (xq, np.where(owner == j, I, -1))) for j in held])
        self.seconds += time.perf_counter() - t
        for j, Fj in zip(held, answers):
            F = np.where(owner == j, Fj, F)
        return F

    def search_fine_exhaustive(self, xq512: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Not served: the exhaustive baseline (benchmarks) needs every vector in one process."""
        raise NotImplementedError("the exhaustive 512-d baseline needs the whole index; open the gallery without "
                                  "shard servers")
