"""``modscan``: one command line with sub-commands.

Heavy imports (torch, ray, faiss) happen inside each sub-command so that ``modscan --help`` is
instant and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def _card(a: argparse.Namespace) -> int:
    from models.card import load_model

    _, card = load_model(a.model)
    print(json.dumps(card.to_dict(), indent=2))
    return 0


def _gallery(a: argparse.Namespace) -> int:
    from jobs.gallery_cmd import run

    return run(a)


def _moderate(a: argparse.Namespace) -> int:
    from jobs.moderate_cmd import cli_moderate

    return cli_moderate(a)


def _nightly(a: argparse.Namespace) -> int:
    from jobs.moderate_cmd import cli_nightly

    return cli_nightly(a)


def _hourly(a: argparse.Namespace) -> int:
    from jobs.moderate_cmd import cli_hourly

    return cli_hourly(a)


def _backfill(a: argparse.Namespace) -> int:
    from jobs.moderate_cmd import cli_backfill

    return cli_backfill(a)


def _demo(a: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(a)


def _evaluate(a: argparse.Namespace) -> int:
    from jobs.evaluate_cmd import run

    return run(a)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", required=True, help="gallery root URI (local path or s3://bucket/prefix)")
    p.add_argument("--output", required=True, help="flags root URI; partitions go under dt=YYYY-MM-DD/ (hours: .../hour=HH/)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--config", default=None, help="TOML job config (see configs/moderate.toml)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--actors", type=int, default=None, help="feature/match actors (default: config)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--signatures", default=None, help="signatures root URI (default: OUTPUT/_signatures)")
    p.add_argument("--allow-empty", action="store_true",
                   help="commit an empty partition when the input holds nothing (default: fail, so a scheduler retries)")
    p.add_argument("--restart", action="store_true",
                   help="start the partition over: do not resume the finished chunks a killed run of it left")
    p.add_argument("--allow-mixed-day", action="store_true",
                   help="write a day partition next to hourly ones of that date, or an hour next to its day "
                        "(refused by default: a day-level reader reads the rows of both)")


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--note", default=None, help="why: kept in the gallery's audit log")
    p.add_argument("--who", default=None, help="operator for the audit log (default: $MODSCAN_OPERATOR or the OS user)")


def _add_card_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="verify a model's checksum and print its model card")
    p.add_argument("--model", default=None)
    p.set_defaults(fn=_card)


def _add_gallery_build_parser(gs: argparse._SubParsersAction) -> None:
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
    p.set_defaults(fn=_gallery)


def _add_gallery_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gallery", help="build, update and inspect gallery versions")
    gs = g.add_subparsers(dest="gcmd", required=True)
    _add_gallery_build_parser(gs)
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
    p.set_defaults(fn=_gallery)
    p = gs.add_parser("remove", help="remove entries (by id, sha256 or whole bank), as a new version")
    p.add_argument("gallery")
    p.add_argument("--bank", default=None, help="remove from this bank only (all of it if no ids/shas)")
    p.add_argument("--ids", nargs="*", type=int, default=[])
    p.add_argument("--sha256", nargs="*", default=[])
    p.add_argument("--hash", nargs="*", default=[], help="hash-bank list entries to remove, by hash (needs --bank)")
    p.add_argument("--entry-id", nargs="*", default=[], help="hash-bank list entries to remove, by entry id")
    _add_audit_args(p)
    p.set_defaults(fn=_gallery)
    p = gs.add_parser("export-hashes", help="PDQ (or MD5) of an image bank's references, as a signal file")
    p.add_argument("gallery")
    p.add_argument("--bank", required=True, help="an image bank of the gallery")
    p.add_argument("--out", required=True, help="list file to write: local path or s3://bucket/key")
    p.add_argument("--signal", choices=["pdq", "md5"], default="pdq")
    p.set_defaults(fn=_gallery)
    p = gs.add_parser("info", help="versions, counts per bank, model id, size")
    p.add_argument("gallery")
    p.add_argument("--verify", action="store_true",
                   help="also check every file of the version against its manifest checksum (exit 1 on a mismatch)")
    p.add_argument("--version", default=None, help="with --verify: the version to check (default: CURRENT)")
    p.set_defaults(fn=_gallery)


def _add_moderate_parsers(sub: argparse._SubParsersAction) -> None:
    """moderate, nightly, hourly and backfill: the job, for one day or hour, yesterday, the last hour, or a range."""
    p = sub.add_parser("moderate", help="check one day (or hour) of uploads and write its flags partition")
    p.add_argument("--input", required=True, help="prefix (local/s3://) or a .parquet/.csv manifest of keys")
    p.add_argument("--date", required=True, help="partition date YYYY-MM-DD")
    p.add_argument("--hour", default=None, help="an hour of --date (00-23, UTC): write dt=D/hour=HH instead of the day")
    _add_job_args(p)
    p.set_defaults(fn=_moderate)

    p = sub.add_parser("nightly", help="moderate yesterday's uploads (idempotent)")
    p.add_argument("--input-template", required=True,
                   help="input URI with {date}, e.g. s3://uploads/{date}/ or manifests/{date}.parquet")
    p.add_argument("--date", default=None, help="default: yesterday (UTC)")
    _add_job_args(p)
    p.set_defaults(fn=_nightly)

    p = sub.add_parser("hourly", help="moderate the last full hour's uploads (UTC) into dt=D/hour=HH (idempotent)")
    p.add_argument("--input-template", required=True,
                   help="input URI with {date} and {hour}, e.g. s3://uploads/{date}/{hour}/")
    p.add_argument("--at", default=None, help="the hour YYYY-MM-DDTHH (default: the last full hour, UTC)")
    _add_job_args(p)
    p.set_defaults(fn=_hourly)

    p = sub.add_parser("backfill", help="moderate a range of days or hours, one partition each, resumable")
    p.add_argument("--input-template", required=True, help="input URI with {date} (and {hour} for a range of hours)")
    p.add_argument("--from", dest="date_from", required=True, help="YYYY-MM-DD, or YYYY-MM-DDTHH for hourly partitions")
    p.add_argument("--to", dest="date_to", required=True, help="YYYY-MM-DD, or YYYY-MM-DDTHH (same form as --from)")
    p.add_argument("--force", action="store_true", help="redo days that are already committed")
    _add_job_args(p)
    p.set_defaults(fn=_backfill)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="embedded default: sample gallery + a day of sample uploads, end to end")
    p.add_argument("--workdir", default="demo-out")
    p.add_argument("--date", default="2026-01-01")
    p.add_argument("--uploads", type=int, default=120)
    p.set_defaults(fn=_demo)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="copy-detection metrics, cascade vs exhaustive vs PDQ")
    p.add_argument("--photos", default=None, help="mode 2: build a benchmark from a photo folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries-per-image", type=int, default=4,
                   help="mode 2: edited queries per reference and per negative photo")
    p.add_argument("--gallery", default=None, help="mode 1: folder of reference images")
    p.add_argument("--queries", default=None, help="mode 1: folder of query images")
    p.add_argument("--ground-truth", default=None, help="mode 1: CSV query_id,reference_id")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--target-precision", type=float, default=0.99)
    p.add_argument("--coarse-flag-budget", type=float, default=0.01,
                   help="share of exhaustive search's true flags the coarse stage may lose (calibration half)")
    p.add_argument("--everyday-uploads", type=int, default=200,
                   help="mode 2: generated unrelated everyday uploads added as negative queries")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model trunk precision (auto: bf16 on CUDA or a CPU with native bf16, else fp32)")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the calibrated thresholds in the model card")
    p.set_defaults(fn=_evaluate)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``modscan bench ...``: each benchmark module registers its own sub-command (``add_parser``)."""
    from jobs.bench_decode import add_parser as add_bench_decode
    from jobs.bench_hashes import add_parser as add_bench_hashes
    from jobs.bench_job import add_parser as add_bench_job
    from jobs.bench_memory import add_parser as add_bench_memory
    from jobs.bench_model import add_parser as add_bench_model
    from jobs.bench_pipeline import add_parser as add_bench_pipeline
    from jobs.bench_resume import add_parser as add_bench_resume
    from jobs.bench_retro import add_parser as add_bench_retro
    from jobs.bench_scale import add_parser as add_bench_scale
    from jobs.bench_search import add_parser as add_bench_search
    from jobs.bench_waves import add_parser as add_bench_waves

    p = sub.add_parser("bench", help="benchmarks: search, decode, pipeline, memory, job, model, retro, hashes, scale, resume, waves")
    bs = p.add_subparsers(dest="bcmd", required=True)
    for add in (add_bench_search, add_bench_decode, add_bench_pipeline, add_bench_memory, add_bench_model,
                add_bench_retro, add_bench_hashes, add_bench_scale, add_bench_resume, add_bench_waves, add_bench_job):
        add(bs)


def build_parser() -> argparse.ArgumentParser:
    # train, lookup, review and gpu-check define their own sub-parsers; they import their heavy parts lazily
    from jobs.gpu_check import add_parser as add_gpu_check
    from jobs.hashes_cmd import add_parser as add_hashes
    from jobs.lookup_cmd import add_parser as add_lookup
    from jobs.retro_cmd import add_parser as add_retro
    from jobs.review_cmd import add_parser as add_review
    from jobs.train_cmd import add_parser as add_train
    from jobs.waves_cmd import add_parser as add_waves

    ap = argparse.ArgumentParser(prog="modscan", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (add_train, _add_card_parser, _add_gallery_parser, _add_moderate_parsers, _add_demo_parser,
                _add_evaluate_parser, _add_bench_parser, add_lookup, add_review, add_gpu_check,
                add_retro, add_hashes, add_waves):
        add(sub)
    return ap


def _add_debug(p: argparse.ArgumentParser, top: bool) -> None:
    """``--debug`` on every (sub-)command; a sub-command's flag never resets the top-level one."""
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show the full traceback of a failure (also MODSCAN_DEBUG=1)")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _add_debug(sp, False)


class _CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record is emitted: a caller that
    runs ``main`` in-process (a test capturing output) may swap the stream and close the old one,
    and a handler holding the old one would fail every later record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run a command. A :class:`~pipeline.errors.ModscanError` prints one line and exits with its
    code (2 usage, 1 runtime); any other exception is a bug or an infrastructure failure: one line
    too, exit 1. ``--debug`` (or ``MODSCAN_DEBUG=1``) shows the traceback instead."""
    from pipeline.errors import ModscanError, plain_message

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ap = build_parser()
    _add_debug(ap, True)
    a = ap.parse_args(argv)
    debug = bool(a.debug) or os.environ.get("MODSCAN_DEBUG", "") not in ("", "0")
    if debug:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    fn: Callable[[argparse.Namespace], int] = a.fn
    prog = f"modscan {a.cmd}"
    try:
        return int(fn(a) or 0)
    except ModscanError as e:
        if debug:
            raise
        print(f"{prog}: error: {plain_message(str(e), 4000)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        from pipeline.ingest.storage import redact

        print(f"{prog}: unexpected error: {redact(plain_message(e, 2000))} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
