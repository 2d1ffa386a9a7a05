"""``modscan lookup IMAGE... --gallery URI [--json]``: why an upload matched, or did not."""

from __future__ import annotations

import argparse
from dataclasses import replace


def cli_lookup(a: argparse.Namespace) -> int:
    from jobs.moderate import JobConfig
    from models.card import read_card
    from pipeline.features import FeatureExtractor
    from pipeline.gallery import GalleryIndex
    from pipeline.ops.explain import explain, render_json, render_table

    cfg = JobConfig.from_toml(a.config)  # the job's thresholds and decode bounds, when given
    card = read_card(a.model)
    fx = FeatureExtractor(a.model, precision=cfg.precision)
    background = fx.background.f512 if fx.background is not None else None  # as the job's Moderator loads it
    gal = GalleryIndex.load(a.gallery, model_id=card.version_id, version=a.version,
                            overrides=cfg.threshold_overrides() or None, background=background)
    decode_cfg = replace(cfg.decode, low_res=card.config.low_res, high_res=card.config.high_res)
    report = explain(list(a.images), gal, fx, top_k=a.top_k, decode_cfg=decode_cfg)
    print(render_json(report) if a.json else render_table(report))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lookup", help="explain why images match the gallery or not (same code as the job)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="local paths or s3:// URIs")
    p.add_argument("--gallery", required=True, help="gallery root URI")
    p.add_argument("--version", default=None, help="gallery version (default: CURRENT)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--config", default=None, help="job TOML whose threshold overrides and decode bounds apply")
    p.add_argument("--top-k", type=int, default=10, help="coarse candidates shown per image, whatever their score")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cli_lookup)
