"""``modscan lookup IMAGE... --gallery URI [--json]``: why an upload matched, or did not."""

from __future__ import annotations

import argparse


def cli_lookup(a: argparse.Namespace) -> int:
    from jobs.runtime.job_config import JobConfig
    from pipeline.features import FeatureExtractor
    from pipeline.gallery import open_gallery
    from pipeline.ingest.decode import DecodeConfig
    from pipeline.ops.explain import explain, render_json, render_table

    cfg = JobConfig.from_toml(a.config)  # the job's thresholds, coarse search and decode bounds, when given
    fx = FeatureExtractor(a.model, precision=cfg.precision)
    # the gallery opened and the uploads decoded exactly as the job's Moderator and decoder do
    gal = open_gallery(a.gallery, fx, version=a.version, overrides=cfg.query_overrides())
    decode_cfg = DecodeConfig.for_model(fx.card.config, base=cfg.decode)
    report = explain(list(a.images), gal, fx, top_k=a.top_k, decode_cfg=decode_cfg)
    print(render_json(report) if a.json else render_table(report))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lookup", help="explain why images match the gallery or not (same code as the job)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="local paths or s3:// URIs")
    p.add_argument("--gallery", required=True, help="gallery root URI")
    p.add_argument("--version", default=None, help="gallery version (default: CURRENT)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--config", default=None, help="job TOML whose threshold overrides, coarse search settings and decode bounds apply")
    p.add_argument("--top-k", type=int, default=10, help="coarse candidates shown per image, whatever their score")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cli_lookup)
