"""The moderation stage: decoded batches -> flag rows (:data:`~pipeline.schemas.FLAG_SCHEMA`).

A plain class: heavy state (model, gallery) in ``__init__``, work in ``__call__(batch)``; Ray
only distributes it (``jobs/runtime/ray_stages.py`` wires it with ``map_batches``), tests call it
directly. It returns exactly one output row per input row, like every stage
(:class:`~pipeline.ingest.fetch.Fetcher`, :class:`~pipeline.ingest.decode.Decoder`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import plain_message
from pipeline.ingest.storage import open_store
from pipeline.schemas import FILE_SCHEMA, Action, ErrorCode, Status, check_columns, error_rows

if TYPE_CHECKING:
    from pipeline.gallery.query import QueryOverrides
    from pipeline.gallery.sharded import ShardServers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What every flag row of one run shares."""

    dt: str
    run_id: str
    timings_uri: str | None = None  # folder for per-batch timing/count records (small JSON files)
    signatures_uri: str | None = None  # the run's signature staging (SIG/_staging/R/data); None: none written


class Moderator:
    """Features + cascade + decision for decoded batches -> flag rows.

    Only rows with a coarse candidate get the 512-d high-res pass (the expensive part of the model
    run): that is the cascade's point, since most uploads match nothing. :meth:`search_rows` is the
    one step a subclass replaces (the benchmark's single-stage baseline, ``jobs/bench/baseline.py``).
    """

    def __init__(self, gallery_uri: str, ctx: RunContext, model_dir: str | None = None,
                 device: str | None = None, threads: int | None = None,
                 overrides: QueryOverrides | None = None,
                 gallery_version: str | None = None, precision: str = "auto",
                 gallery_cache: str | None = None, gallery_servers: ShardServers | None = None) -> None:
        """``overrides``: the job config's over the gallery version's query settings
        (``JobConfig.query_overrides()``; None: the version's own). ``gallery_cache``
        (``JobConfig.node_cache()``): None loads a private copy of the gallery; ``"node"`` or a
        folder maps the node's shared copy (:mod:`pipeline.gallery.nodecache`).
        ``gallery_servers``: the job's shard servers (``[job] gallery_shard_servers``, Ray actors
        behind :class:`~pipeline.gallery.sharded.ShardServers`): they hold the vectors and this actor none
        (:mod:`pipeline.gallery.sharded`); the entries come from the node cache."""
        from pipeline.features import FeatureExtractor
        from pipeline.gallery import QueryOverrides, open_gallery
        from pipeline.gallery.nodecache import NodeCache

        self.fx = FeatureExtractor(model_dir, device=device, threads=threads, precision=precision)
        cache = None if gallery_cache is None else NodeCache(None if gallery_cache == "node" else gallery_cache)
        # gallery_version: the job's pinned version (never CURRENT at actor start: a version
        # published during the run must not mix into its partition)
        self.gallery = open_gallery(gallery_uri, self.fx, version=gallery_version,
                                    overrides=overrides or QueryOverrides(), cache=cache, servers=gallery_servers)
        self.ctx = ctx
        self._timings = open_store(ctx.timings_uri) if ctx.timings_uri else None
        self._signatures = None
        if ctx.signatures_uri:
            from pipeline.moderation.signatures import SignatureWriter

            self._signatures = SignatureWriter(ctx.signatures_uri, ctx.run_id, self.fx.version_id)
        self._coarse: np.ndarray | None = None  # the last batch's low-res query features (for signatures)

    def __call__(self, batch: dict[str, Any]) -> Any:
        """Flag rows for a batch. An exception turns the batch into ``internal_error`` rows (rows
        that were already decode errors keep their code) and the job goes on: a bug must cost
        rows that say so, never the run or silently lost uploads."""
        try:
            return self._moderate(batch)
        except Exception as e:
            log.exception("Moderator failed on a batch of %d rows; writing internal_error rows", len(batch["image_key"]))
            return self._failed_batch(batch, e)

    def _failed_batch(self, batch: dict[str, Any], e: Exception) -> Any:
        keys = [str(k) for k in batch["image_key"]]
        n = len(keys)
        ok = np.asarray(batch.get("ok", np.zeros(n, bool)), dtype=bool)
        codes_in, messages_in = batch.get("error_code", [None] * n), batch.get("error_message", [None] * n)
        message = f"Moderator failed on this batch: {plain_message(e, 400)}"
        own = [not ok[i] and bool(codes_in[i]) for i in range(n)]  # decode errors keep their code
        codes = [codes_in[i] if own[i] else ErrorCode.INTERNAL_ERROR.value for i in range(n)]
        messages = [messages_in[i] if own[i] else message for i in range(n)]
        return error_rows(keys, codes, messages, model_version=self.fx.version_id, gallery_version=self.gallery.version,
                          run_id=self.ctx.run_id, sha256s=list(batch.get("image_sha256", [None] * n)))

    def _moderate(self, batch: dict[str, Any]) -> Any:
        check_columns(batch, ["image_key", "image_sha256", "ok", "error_code", "error_message", "low", "high"],
                      "Moderator")
        t0 = time.perf_counter()
        ok = np.asarray(batch["ok"], dtype=bool)
        low_content = np.asarray(batch.get("low_content", np.zeros(len(ok), bool)), dtype=bool) & ok
        searched = ok & ~low_content
        self._coarse = None
        matches, timing = self.search_rows(batch, np.nonzero(searched)[0])
        t_hash = time.perf_counter()
        matches = self.with_hash_signals(batch, ok, matches)
        timing["hash_lists"] = time.perf_counter() - t_hash
        table = self._rows(batch, ok, low_content, matches)
        rows = np.nonzero(searched)[0]
        if self._signatures is not None and len(rows):
            # a subclass whose search_rows does not keep the features: computed again for the signatures
            coarse = self._coarse if self._coarse is not None else self.fx.query_coarse(batch["low"][rows])
            self._signatures.write(batch, rows, coarse)
        if self._timings is not None:
            self._write_timing({"rows": len(ok), "decoded": int(ok.sum()), "low_content": int(low_content.sum()),
                                "survivors": timing.pop("survivors"),
                                "t_start": time.time() - (time.perf_counter() - t0), "t_end": time.time(),
                                "seconds": {**timing, "moderator_total": time.perf_counter() - t0}})
        return table

    def search_rows(self, batch: dict[str, Any], rows: np.ndarray) -> tuple[dict[int, Any], dict[str, Any]]:
        """The cascade for the decoded rows ``rows``: low-res coarse pass for all, high-res pass
        for survivors only. Returns {row: Match} and the time split (``model_coarse``, ``search``,
        ``model_rerank`` in seconds, ``survivors``: rows given the high-res pass).

        The subclass hook: a subclass may replace this one step and keep the rest of the stage
        (error rows, flag rows, timing records); it must return the same pair for the same
        ``rows`` (indexes into ``batch`` of decoded, searchable rows)."""
        timing: dict[str, Any] = {"model_coarse": 0.0, "search": 0.0, "model_rerank": 0.0, "verify": 0.0,
                                  "verified_uploads": 0, "survivors": 0}
        if not len(rows):
            return {}, timing
        low, high = batch["low"][rows], batch["high"][rows]

        def fine_fn(sel: np.ndarray) -> np.ndarray:
            t1 = time.perf_counter()
            out = self.fx.fine_features(high[sel])
            timing["model_rerank"] += time.perf_counter() - t1
            return out

        kp_fn = None
        if "bytes" in batch:  # the decoder passes the encoded upload on for verification
            kp_fn = self.gallery.keypoints_from_bytes([batch["bytes"][r] for r in rows])
        v0 = dict(self.gallery.verify_stats)
        from pipeline.gallery.sharded import RemoteCascade

        remote = self.gallery.cascade if isinstance(self.gallery.cascade, RemoteCascade) else None
        served0 = remote.seconds if remote is not None else 0.0  # shard servers: time waiting for them
        t = time.perf_counter()
        xq = self.fx.query_coarse(low)
        self._coarse = xq  # kept for the batch's signature side file
        timing["model_coarse"] = time.perf_counter() - t
        decisions, survivors = self.gallery.search(xq, fine_fn, kp_fn)
        # verification (the upload decoded at the verify size, its keypoints, matching) runs inside the search
        timing["verify"] = self.gallery.verify_stats["seconds"] - v0["seconds"]
        timing["verified_uploads"] = self.gallery.verify_stats["queries"] - v0["queries"]
        timing["search"] = time.perf_counter() - t - timing["model_coarse"] - timing["model_rerank"] - timing["verify"]
        timing["survivors"] = int(survivors.sum())
        if remote is not None:
            timing["shard_servers"] = remote.seconds - served0
        return {int(r): d for r, d in zip(rows, decisions)}, timing

    def with_hash_signals(self, batch: dict[str, Any], ok: np.ndarray, matches: dict[int, Any]) -> dict[int, Any]:
        """The descriptor's decisions ``matches`` decided again with the gallery's hash banks, for
        every decoded row (low-content ones too: an MD5 is the same file, whatever it shows), by
        :meth:`~pipeline.gallery.query.GalleryIndex.decide_signals`'s one rule. A batch without
        the decoder's signal columns (a plain Decoder) queries no list."""
        rows = np.nonzero(ok)[0]
        if not len(self.gallery.hash_banks) or not len(rows) or "pdq_hash" not in batch:
            return matches
        col = lambda c: [batch[c][r] if c in batch else None for r in rows]
        quals = [int(q) if h is not None and q is not None else None for h, q in zip(col("pdq_hash"), col("pdq_quality"))]
        out = dict(matches)
        for r, q in zip(rows, self.gallery.query_hashes(col("md5"), col("pdq_hash"), quals)):
            m = self.gallery.decide_signals(matches.get(int(r)), q)
            if m is not None:
                out[int(r)] = m
        return out

    @staticmethod
    def _signal_fields(batch: dict[str, Any], i: int, m: Any) -> dict[str, Any]:
        """The row's hash-signal columns: the upload's own PDQ (every decoded row) and, for a
        decision, the signal that made it and the list entry a hash match reached."""
        h = batch["pdq_hash"][i] if "pdq_hash" in batch else None
        out: dict[str, Any] = {"pdq_hash": h, "pdq_quality": int(batch["pdq_quality"][i]) if h is not None else None}
        if m is not None:
            out.update(signal=getattr(m, "signal", None), pdq_distance=getattr(m, "pdq_distance", None),
                       list_entry_id=getattr(m, "list_entry_id", None), list_metadata=getattr(m, "list_metadata", None),
                       reason=getattr(m, "note", None))
        return out

    def _rows(self, batch: dict[str, Any], ok: np.ndarray, low_content: np.ndarray, matches: dict[int, Any]) -> Any:
        """One flag row per input row (:data:`FILE_SCHEMA`)."""
        import pyarrow as pa

        def finite(x: float | None) -> float | None:
            return x if x is None or np.isfinite(x) else None

        now = _dt.datetime.now(_dt.UTC)
        cols: dict[str, list[Any]] = {f.name: [] for f in FILE_SCHEMA}
        for i in range(len(ok)):
            m = matches.get(i)
            row: dict[str, Any] = {c: None for c in cols}
            row.update(image_key=str(batch["image_key"][i]), image_sha256=batch["image_sha256"][i],
                       model_version=self.fx.version_id, gallery_version=self.gallery.version,
                       run_id=self.ctx.run_id, processed_at=now, action=Action.NONE.value)
            if ok[i]:
                row.update(self._signal_fields(batch, i, m))
            if low_content[i] and (m is None or m.status != Status.MATCHED.value):
                row["status"] = Status.LOW_CONTENT.value
            elif m is None:
                row.update(status=Status.ERROR.value, error_message=batch["error_message"][i],
                           error_code=batch["error_code"][i] or ErrorCode.INTERNAL_ERROR.value)
            else:
                row.update(status=m.status, action=m.action, bank=m.bank, category=m.category,
                           reference_id=m.reference_id, coarse_score=m.coarse_score,
                           fine_score=finite(m.fine_score), fine_score_raw=finite(m.fine_score_raw),
                           inliers=getattr(m, "inliers", None), match_rule=getattr(m, "rule", None))
            for c in cols:
                cols[c].append(row[c])
        return pa.Table.from_pydict(cols, schema=FILE_SCHEMA)

    def _write_timing(self, rec: dict[str, Any]) -> None:
        if self._timings is None:
            return
        try:
            self._timings.write_text(f"{uuid.uuid4().hex}.json", json.dumps(rec))
        except Exception as e:
            log.warning("could not write a timing record: %s", e)
