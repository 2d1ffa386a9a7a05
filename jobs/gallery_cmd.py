"""``modscan gallery build|add|remove|info``: gallery-side feature extraction with Ray Data actors."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from pipeline import gallery as G
from pipeline.errors import UsageError
from pipeline.gallery.banks import Bank, load_banks
from pipeline.ingest.storage import open_store


class GalleryFeatureStage:
    """Actor: decoded batch -> adapter-1 128-d and 512-d features of the high-res image.

    A low-content picture (flat colour, near-uniform, almost empty canvas) is rejected with the
    code ``low_content``: as a reference it would match every flat upload.
    """

    def __init__(self, model_dir: str | None, threads: int | None = None, precision: str = "auto") -> None:
        from pipeline.features import FeatureExtractor

        self.fx = FeatureExtractor(model_dir, threads=threads, precision=precision)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        decoded = np.asarray(batch["ok"], bool)
        low = np.asarray(batch.get("low_content", np.zeros(len(decoded), bool)), bool) & decoded
        ok = decoded & ~low
        codes = np.asarray(batch["error_code"], dtype=object).copy()
        messages = np.asarray(batch["error_message"], dtype=object).copy()
        codes[low] = "low_content"
        messages[low] = "near-uniform picture (flat colour or almost empty): nothing to identify copies by"
        cd, rd = self.fx.config.coarse_dim, self.fx.config.rerank_dim
        coarse = np.zeros((len(ok), cd), np.float32)
        rerank = np.zeros((len(ok), rd), np.float32)
        if ok.any():
            c, r = self.fx.gallery(batch["high"][ok])
            coarse[ok], rerank[ok] = c, r
        n = len(ok)  # the reference's own signals (SignalDecoder's), kept for `gallery export-hashes`
        signals = {c: batch.get(c, np.full(n, d, dtype=object if d is None else np.int16))
                   for c, d in (("md5", None), ("pdq_hash", None), ("pdq_quality", -1))}
        return {"uri": batch["image_key"], "sha256": batch["image_sha256"], "ok": ok,
                "error_code": codes, "error_message": messages, "coarse": coarse, "rerank": rerank, **signals}


def _rows(b: dict[str, Any]) -> list[dict[str, Any]]:
    """A GalleryFeatureStage output batch -> the per-image dicts of the Extractor contract."""
    out = []
    for i in range(len(b["uri"])):
        ok = bool(b["ok"][i])
        out.append({"uri": str(b["uri"][i]), "sha256": b["sha256"][i], "ok": ok,
                    "error_code": b["error_code"][i], "error_message": b["error_message"][i],
                    "coarse": b["coarse"][i] if ok else None, "rerank": b["rerank"][i] if ok else None,
                    "md5": b["md5"][i] if "md5" in b else None,
                    "pdq_hash": b["pdq_hash"][i] if "pdq_hash" in b else None,
                    "pdq_quality": int(b["pdq_quality"][i]) if "pdq_quality" in b else None})
    return out


def ray_extractor(model_dir: str | None, ray_address: str | None = None, batch_size: int = 32,
                  precision: str = "auto") -> G.Extractor:
    """Extractor for :func:`pipeline.gallery.build`: the job's fetch -> decode -> actors wiring
    (:mod:`jobs.ray_stages`) with :class:`GalleryFeatureStage` actors, in ``batch_size`` batches."""

    def extract(uris: list[str]) -> list[dict[str, Any]]:
        from jobs.job_config import JobConfig
        from jobs.ray_stages import actor_resources, decode_and_apply, fetch_by_uri, init_ray, raise_worker_error
        from models.card import read_card
        from pipeline.ingest.decode import DecodeConfig

        if not uris:
            return []
        init_ray(ray_address)
        card = read_card(model_dir)
        cfg = JobConfig(batch_size=batch_size)
        ds = fetch_by_uri(uris, uris, cfg, num_blocks=max(1, min(100, len(uris) // 32 or 1)), batch_size=batch_size,
                          max_fetchers=2)
        ds = decode_and_apply(ds, GalleryFeatureStage, {"model_dir": model_dir, "precision": precision}, cfg,
                              actor_resources(cfg), DecodeConfig.for_model(card.config))
        out = []
        try:
            for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
                out += _rows(b)
        except Exception as e:
            raise_worker_error(e)
        order = {u: i for i, u in enumerate(uris)}
        return sorted(out, key=lambda r: order[r["uri"]])

    return extract


def local_extractor(model_dir: str | None = None) -> G.Extractor:
    """Same contract without Ray (used by tests and tiny galleries)."""
    from models.card import read_card
    from pipeline.ingest.decode import DecodeConfig
    from pipeline.ingest.fetch import Fetcher

    card = read_card(model_dir)
    from pipeline.signals.hashes import SignalDecoder

    fetch, dec = Fetcher(), SignalDecoder(DecodeConfig.for_model(card.config))
    stage = GalleryFeatureStage(model_dir)

    def extract(uris: list[str]) -> list[dict[str, Any]]:
        out = []
        for i in range(0, len(uris), 32):
            chunk = uris[i:i + 32]
            out += _rows(stage(dec(fetch({"image_key": np.asarray(chunk, object), "uri": np.asarray(chunk, object)}))))
        return out

    return extract


def _is_hash_bank(a: argparse.Namespace) -> bool:
    """``gallery add``'s bank is a pdq/md5 bank: in the gallery already, or declared in ``--banks``."""
    m = G.read_manifest(open_store(a.gallery))
    if a.bank in m.banks:
        return m.banks[a.bank].bank.is_hash
    declared = {b.name: b for b in load_banks(a.banks)} if a.banks else {}
    return a.bank in declared and declared[a.bank].is_hash


def run(a: argparse.Namespace) -> int:
    from models.card import read_card

    if a.gcmd == "info":
        store = open_store(a.gallery)
        out = G.info(store)
        if getattr(a, "verify", False):
            out["verify"] = G.verify(store, a.version)
        print(json.dumps(out, indent=2, default=str))
        problems = out.get("verify", {}).get("problems")
        if problems:
            v = out["verify"]
            raise G.GalleryIntegrityError(
                f"gallery {v['version']}: {len(problems)} of {v['files']} files fail verification: "
                + "; ".join(f"{p['file']}: {p['problem']}" for p in problems))
        return 0
    if a.gcmd == "remove":  # extracts nothing, so no model: the new version keeps the gallery's own
        v, stats = G.remove(open_store(a.gallery), None, a.bank, a.ids, a.sha256, who=a.who, note=a.note,
                            hashes=getattr(a, "hash", []), entry_ids=getattr(a, "entry_id", []))
        print(json.dumps({"version": v, **stats}, indent=2))
        return 0
    if a.gcmd == "export-hashes":
        from pipeline.signals.lists import write_list

        entries = G.export_hashes(open_store(a.gallery), a.bank, a.signal)
        write_list(a.out, entries, a.signal)
        print(json.dumps({"bank": a.bank, "signal": a.signal, "hashes": len(entries), "out": a.out}, indent=2))
        return 0
    if a.gcmd == "add" and _is_hash_bank(a):  # a newer list file: nothing to extract
        new_bank = {b.name: b for b in load_banks(a.banks)}.get(a.bank) if a.banks else None
        v, stats = G.replace_list(open_store(a.gallery), a.bank, a.source, new_bank, who=a.who, note=a.note)
        print(json.dumps({"version": v, **stats}, indent=2))
        return 0
    card = read_card(a.model)
    extract = ray_extractor(a.model, a.ray_address, precision=getattr(a, "precision", "auto"))
    if a.gcmd == "build":
        from pipeline.gallery.index import CoarseIndexSpec

        banks = load_banks(a.banks)
        spec = CoarseIndexSpec(a.coarse_index, hnsw_m=a.hnsw_m, ivf_nlist=a.ivf_nlist, nprobe=a.nprobe,
                               ef_search=a.ef_search)
        v, stats = G.build(open_store(a.out, create=True), banks, card, extract, a.shards, a.rerank_dtype,
                           spec, who=a.who, note=a.note)
        print(json.dumps({"version": v, "banks": stats}, indent=2, default=str))
        return 0
    if a.gcmd == "add":
        new_bank: Bank | None = None
        if a.banks:
            new_bank = {b.name: b for b in load_banks(a.banks)}.get(a.bank)
        v, stats = G.add(open_store(a.gallery), a.bank, G.list_source(a.source), card, extract, new_bank,
                         who=a.who, note=a.note)
        print(json.dumps({"version": v, **stats}, indent=2))
        return 0
    raise UsageError(f"unknown gallery command {a.gcmd!r}")
