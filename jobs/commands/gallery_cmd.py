"""``modscan gallery build|add|remove|info``: gallery-side feature extraction with Ray Data actors."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from pipeline.errors import UsageError

if TYPE_CHECKING:  # the gallery, its extractor and storage pull torch, faiss, pandas and pyarrow: imported when run
    from pipeline import gallery as G


def ray_extractor(model_dir: str | None, ray_address: str | None = None, batch_size: int = 32,
                  precision: str = "auto") -> G.Extractor:
    """Extractor for :func:`pipeline.gallery.build`: the job's fetch -> decode -> actors wiring
    (:mod:`jobs.runtime.ray_stages`) with :class:`GalleryFeatureStage` actors, in ``batch_size`` batches."""

    def extract(uris: list[str]) -> list[dict[str, Any]]:
        from jobs.runtime.job_config import JobConfig
        from jobs.runtime.ray_stages import actor_resources, decode_and_apply, fetch_by_uri, init_ray, raise_worker_error
        from models.card import read_card
        from pipeline.gallery.extract import GalleryFeatureStage, stage_rows
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
                out += stage_rows(b)
        except Exception as e:
            raise_worker_error(e)
        order = {u: i for i, u in enumerate(uris)}
        return sorted(out, key=lambda r: order[r["uri"]])

    return extract


def _is_hash_bank(a: argparse.Namespace) -> bool:
    """``gallery add``'s bank is a pdq/md5 bank: in the gallery already, or declared in ``--banks``."""
    from pipeline import gallery as G
    from pipeline.gallery.banks import load_banks
    from pipeline.ingest.storage import open_store

    m = G.read_manifest(open_store(a.gallery))
    if a.bank in m.banks:
        if m.banks[a.bank].bank.is_hash and getattr(a, "from_wave", None) is not None:
            raise UsageError(f"--from-wave adds a picture; bank {a.bank!r} is a hash-list bank")
        return m.banks[a.bank].bank.is_hash
    declared = {b.name: b for b in load_banks(a.banks)} if a.banks else {}
    return a.bank in declared and declared[a.bank].is_hash


def _add_source(a: argparse.Namespace) -> tuple[list[str], str | None]:
    """``gallery add``'s pictures and audit note: ``--source``'s, or a committed wave's representative
    (``--from-wave``, with ``--flags`` and ``--date``; the note names the wave)."""
    if getattr(a, "from_wave", None) is None:
        from pipeline import gallery as G

        return G.list_source(a.source), a.note
    if not a.flags or not a.date:
        raise UsageError("--from-wave needs --flags (the flags root) and --date (the wave's day)")
    from jobs.commands.waves_cmd import wave_source

    uris, note = wave_source(a.flags, a.date, a.hour, a.from_wave)
    return uris, f"{a.note}; {note}" if a.note else note


def _info(a: argparse.Namespace) -> int:
    """``gallery info`` (``--verify``: exit 1 on a file that fails its manifest checksum)."""
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

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


def run(a: argparse.Namespace) -> int:
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import load_banks
    from pipeline.ingest.storage import open_store

    if a.gcmd == "info":
        return _info(a)
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
        from pipeline.gallery.calibration import Budgets

        for name in ("false_flag_budget", "verify_budget"):
            if not 0.0 < getattr(a, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be a share strictly between 0 and 1, got {getattr(a, name)}")
        v, stats = G.build(open_store(a.out, create=True), banks, card, extract, a.shards, a.rerank_dtype,
                           spec, who=a.who, note=a.note, budgets=Budgets(a.false_flag_budget, a.verify_budget))
        print(json.dumps({"version": v, "banks": stats}, indent=2, default=str))
        return 0
    if a.gcmd == "add":
        new_bank = None
        if a.banks:
            new_bank = {b.name: b for b in load_banks(a.banks)}.get(a.bank)
        uris, note = _add_source(a)
        v, stats = G.add(open_store(a.gallery), a.bank, uris, card, extract, new_bank, who=a.who, note=note)
        print(json.dumps({"version": v, **stats}, indent=2))
        return 0
    raise UsageError(f"unknown gallery command {a.gcmd!r}")


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--note", default=None, help="why: kept in the gallery's audit log")
    p.add_argument("--who", default=None, help="operator for the audit log (default: $MODSCAN_OPERATOR or the OS user)")


def _add_build_parser(gs: argparse._SubParsersAction) -> None:
    p = gs.add_parser("build", help="extract features for every bank and publish a new version")
    p.add_argument("--banks", required=True, help="banks TOML file")
    p.add_argument("--out", required=True, help="gallery root URI")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--model", default=None)
    p.add_argument("--rerank-dtype", choices=["float32", "float16", "int8"], default="float16")
    p.add_argument("--coarse-index", choices=["flat", "hnsw", "ivf"], default="flat",
                   help="coarse 128-d index per shard: flat (exact), hnsw or ivf (approximate, for large galleries)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph degree")
    p.add_argument("--ivf-nlist", type=int, default=None, help="ivf: lists per shard (default 4*sqrt(n))")
    p.add_argument("--nprobe", type=int, default=32, help="ivf: lists searched per query (stored; [job] overrides)")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: search breadth (stored; [job] overrides)")
    p.add_argument("--false-flag-budget", type=float, default=0.001,
                   help="expected falsely flagged share of unrelated uploads the sized thresholds aim at (default 0.001)")
    p.add_argument("--verify-budget", type=float, default=0.10,
                   help="share of unrelated uploads that may pay geometric verification (default 0.10)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model trunk precision (auto: bf16 on CUDA or a CPU with native bf16, else fp32)")
    p.add_argument("--ray-address", default=None)
    _add_audit_args(p)
    p.set_defaults(fn=run)


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gallery", help="build, update and inspect gallery versions")
    gs = g.add_subparsers(dest="gcmd", required=True)
    _add_build_parser(gs)
    p = gs.add_parser("add", help="add images (a folder or prefix) to a bank, or a newer list file to a hash bank")
    p.add_argument("gallery")
    p.add_argument("--bank", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="folder or s3:// prefix of images; for a pdq/md5 bank, its list file")
    src.add_argument("--from-wave", metavar="CLUSTER_ID", default=None,
                     help="the representative (first upload) of a committed wave; needs --flags and --date (docs/waves.md)")
    p.add_argument("--flags", default=None, help="with --from-wave: the flags root the wave was committed under")
    p.add_argument("--date", default=None, help="with --from-wave: the wave's day YYYY-MM-DD")
    p.add_argument("--hour", type=int, default=None, help="with --from-wave: the wave's hour, for an hourly partition")
    p.add_argument("--banks", default=None, help="banks TOML (needed when the bank is new)")
    p.add_argument("--model", default=None)
    p.add_argument("--ray-address", default=None)
    _add_audit_args(p)
    p.set_defaults(fn=run)
    p = gs.add_parser("remove", help="remove entries (by id, sha256 or whole bank), as a new version")
    p.add_argument("gallery")
    p.add_argument("--bank", default=None, help="remove from this bank only (all of it if no ids/shas)")
    p.add_argument("--ids", nargs="*", type=int, default=[])
    p.add_argument("--sha256", nargs="*", default=[])
    p.add_argument("--hash", nargs="*", default=[], help="hash-bank list entries to remove, by hash (needs --bank)")
    p.add_argument("--entry-id", nargs="*", default=[], help="hash-bank list entries to remove, by entry id")
    _add_audit_args(p)
    p.set_defaults(fn=run)
    p = gs.add_parser("export-hashes", help="PDQ (or MD5) of an image bank's references, as a signal file")
    p.add_argument("gallery")
    p.add_argument("--bank", required=True, help="an image bank of the gallery")
    p.add_argument("--out", required=True, help="list file to write: local path or s3://bucket/key")
    p.add_argument("--signal", choices=["pdq", "md5"], default="pdq")
    p.set_defaults(fn=run)
    p = gs.add_parser("info", help="versions, counts per bank, model id, size")
    p.add_argument("gallery")
    p.add_argument("--verify", action="store_true",
                   help="also check every file of the version against its manifest checksum (exit 1 on a mismatch)")
    p.add_argument("--version", default=None, help="with --verify: the version to check (default: CURRENT)")
    p.set_defaults(fn=run)
