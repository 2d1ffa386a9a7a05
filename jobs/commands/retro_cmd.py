"""``modscan retro``: re-decide past days after a gallery change, from their stored signatures.

The command-line side of :mod:`jobs.runtime.retro` (see ``docs/operations.md``, "Retro-matching").
"""

from __future__ import annotations

import argparse
import json


def cli_retro(a: argparse.Namespace) -> int:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.retro import retro, summary_lines

    cfg = JobConfig.from_toml(a.config, batch_size=a.batch_size, actors=a.actors)
    rep = retro(a.gallery, a.since, a.date_from, a.date_to, a.output, a.signatures, a.model, cfg, a.ray_address)
    print(json.dumps(rep, indent=2, default=str) if a.json else summary_lines(rep))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retro", help="re-decide past days after a gallery change, re-reading only the survivors")
    p.add_argument("--gallery", required=True, help="gallery root URI; its CURRENT version is the new one")
    p.add_argument("--since", required=True, metavar="VERSION", help="the gallery version the days were decided against")
    p.add_argument("--from", dest="date_from", required=True)
    p.add_argument("--to", dest="date_to", required=True)
    p.add_argument("--output", required=True, help="flags root URI (the partitions re-committed)")
    p.add_argument("--signatures", default=None, help="signatures root URI (default: OUTPUT/_signatures)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--config", default=None, help="TOML job config (see configs/moderate.toml)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--json", action="store_true", help="print the run's report as JSON")
    p.set_defaults(fn=cli_retro)
