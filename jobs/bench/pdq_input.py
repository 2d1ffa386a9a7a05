"""``modscan bench pdq-input``: which image PDQ should be computed on. For each photo of a folder
of edits of one original (ThreatExchange's ``pdq/data/bridge-mods`` set is the intended input: its
original's name starts with ``aaa-orig``), the PDQ hash of four inputs, and how far each lands
from the file's own full-resolution hash (what ``threatexchange hash photo`` computes and what
programs' lists hold) and from the original's (the list entry):

- ``full``: the full-resolution decode;
- ``draft256``: the JPEG draft to a short side >= 256 px, then an integer box reduction while the
  short side stays >= 256 (:func:`pipeline.signals.hashes.pdq_from_bytes`);
- ``draft160``: the same at >= 160 px (what the job hashes: its decoder opens uploads and
  references at its high-res side);
- ``square160``: the decoder's 160 px square (``high``), resampled.

Writes ``bench-out/pdq_input.json``. Benchmarks never assert. Results: docs/operations.md, "What
PDQ is computed on".
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.bench.common import bench_args, machine, table
from pipeline.errors import UsageError

INPUTS = ("full", "draft256", "draft160", "square160")


def bench_pdq_input(folder: Path, out_dir: Path) -> dict[str, Any]:
    from pipeline.ingest.decode import DecodeConfig, Decoder
    from pipeline.signals.hashes import hamming, pdq_from_bytes, pdq_hex

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise UsageError(f"bench pdq-input: no JPEG or PNG in {folder}")
    dec = Decoder(DecodeConfig(high_res=160, low_res=128))
    fns: dict[str, Callable[[bytes], tuple[str, int]]] = {
        "full": lambda d: pdq_from_bytes(d, min_side=None), "draft256": lambda d: pdq_from_bytes(d),
        "draft160": lambda d: pdq_from_bytes(d, min_side=160), "square160": lambda d: pdq_hex(dec.decode_one(d)["high"])}
    orig = next((p for p in files if p.name.startswith("aaa-orig")), files[0])
    ref = pdq_from_bytes(orig.read_bytes(), min_side=None)[0]
    seconds = dict.fromkeys(INPUTS, 0.0)
    per_file: list[dict[str, Any]] = []
    for p in files:
        data = p.read_bytes()
        hashes = {}
        for name in INPUTS:
            t0 = time.perf_counter()
            hashes[name] = fns[name](data)[0]
            seconds[name] += time.perf_counter() - t0
        per_file.append({"file": p.name, **{f"{k} off own": hamming(hashes[k], hashes["full"]) for k in INPUTS},
                         **{f"{k} to entry": hamming(hashes[k], ref) for k in INPUTS}})
    rows = [{"input": k, "bits off own": f"{min(r[f'{k} off own'] for r in per_file)}-{max(r[f'{k} off own'] for r in per_file)}",
             "max to the list entry": max(r[f"{k} to entry"] for r in per_file),
             "ms/image": round(1000 * seconds[k] / len(files), 1)} for k in INPUTS]
    res = {"machine": machine(), "folder": str(folder), "original": orig.name, "files": len(files),
           "inputs": rows, "per_file": per_file}
    print(f"\nPDQ input on {res['machine']}: {len(files)} files, list entry = {orig.name}'s full-resolution hash\n")
    print(table(rows, list(rows[0])))
    (out_dir / "pdq_input.json").write_text(json.dumps(res, indent=2))
    return res


def cli_bench_pdq_input(a: argparse.Namespace) -> int:
    out, _ = bench_args(a)
    bench_pdq_input(Path(a.folder), out)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``pdq-input`` under ``modscan bench``."""
    q = bench_subparsers.add_parser("pdq-input", help="PDQ bits lost by each input size PDQ could be computed on")
    q.add_argument("folder", metavar="DIR", help="edits of one original (its name starting with aaa-orig, else the first file)")
    q.add_argument("--workdir", default=None, help="output folder (default bench-out)")
    q.set_defaults(fn=cli_bench_pdq_input)
