"""``modscan waves``: near-duplicate clusters among a committed partition's own uploads.

The command-line side of :mod:`jobs.runtime.waves` (see ``docs/waves.md``); ``modscan bench waves`` is
:mod:`jobs.bench.waves`. ``modscan gallery add --from-wave`` (``jobs/commands/gallery_cmd.py``) reads a
committed wave through :func:`wave_source`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def partition_arg(date: str, hour: int | None) -> str:
    """``--date D [--hour H]`` -> the partition ``D`` or ``DTHH``."""
    return date if hour is None else f"{date}T{int(hour):02d}"


def cli_waves(a: argparse.Namespace) -> int:
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.waves import summary_lines, waves

    cfg = JobConfig.from_toml(a.config, batch_size=a.batch_size, actors=a.actors, wave_min_size=a.wave_min_size)
    info = waves(a.output, partition_arg(a.date, a.hour), cfg, a.model, a.signatures, a.waves, a.ray_address,
                 review=not a.no_review)
    print(json.dumps(info, indent=2, default=str) if a.json else summary_lines(info))
    return 0


def wave_source(flags_uri: str, date: str, hour: int | None, cid: str, waves_uri: str | None = None
                ) -> tuple[list[str], str]:
    """(the wave's representative URI, an audit note) for ``gallery add --from-wave``: the cluster's
    first upload (``dup_rank`` 1) in the committed waves of the partition."""
    from pipeline.moderation.wave_output import wave_members, waves_root

    part = partition_arg(date, hour)
    rows = wave_members(waves_root(flags_uri, waves_uri), part, cid)
    rep: Any = rows.iloc[0]
    if rep["image_uri"] is None:
        from pipeline.errors import UsageError

        raise UsageError(f"cluster {cid}: its first upload {rep['image_key']!r} has no stored URI")
    note = (f"from wave {cid} of {part} ({int(rep['dup_cluster_size'])} uploads; representative "
            f"{rep['image_key']}, the first uploaded)")
    return [str(rep["image_uri"])], note


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("waves", help="near-duplicate clusters (waves) among a committed partition's own uploads")
    p.add_argument("--output", required=True, help="flags root URI (the partition must be committed)")
    p.add_argument("--date", required=True, help="the day YYYY-MM-DD")
    p.add_argument("--hour", type=int, default=None, help="an hourly partition's hour (0-23)")
    p.add_argument("--signatures", default=None, help="signatures root URI (default: OUTPUT/_signatures)")
    p.add_argument("--waves", default=None, help="waves root URI (default: OUTPUT/_waves)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--config", default=None, help="TOML job config ([job] wave_* keys; see configs/moderate.toml)")
    p.add_argument("--wave-min-size", type=int, default=None, help="uploads that make a cluster a wave (default: config, 5)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--no-review", action="store_true", help="do not re-write the run's review page")
    p.add_argument("--json", action="store_true", help="print the run's _run.json")
    p.set_defaults(fn=cli_waves)
