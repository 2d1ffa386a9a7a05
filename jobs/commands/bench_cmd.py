"""``modscan bench ...``: the benchmarks of :mod:`jobs.bench`, one sub-command each; every benchmark
module registers its own (``add_parser``), in the order listed here."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jobs.bench import decode, hashes, job, memory, model, pdq_input, pipeline, resume, retro, scale, search, waves

    p = sub.add_parser("bench", help="benchmarks: search, decode, pipeline, memory, job, model, retro, hashes, pdq-input, scale, resume, waves")
    bs = p.add_subparsers(dest="bcmd", required=True)
    for bench in (search, decode, pipeline, memory, model, retro, hashes, pdq_input, scale, resume, waves, job):
        bench.add_parser(bs)
