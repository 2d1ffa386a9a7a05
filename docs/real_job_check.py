"""The real job against real pictures: false flags among unrelated photos and recall of copies.

Builds a gallery from reference photos (``--references DIR``, e.g. coco256 + kodak24), makes a
day of uploads out of every photo of ``--unrelated DIR`` (never a reference) and ``--copies N``
edited copies of references (1-3 edits of the evaluation's suite), and moderates the day twice
with ``modscan moderate`` on a local Ray cluster: once with the gallery's own rule (thresholds
sized for its size, geometric verification), once with the card's fine threshold alone
(``[job] fine_threshold`` and ``sure_threshold`` set to it: every candidate that reaches it matches, the
rule without verification, at the card's fine threshold). Prints, for each run, the unrelated uploads flagged and the copies
flagged (to their own reference), and writes ``WORKDIR/real_job_check.json``.

    .venv/bin/python docs/real_job_check.py --references ../shared/data/coco256 --references ../shared/data/kodak24 \\
        --unrelated ../shared/data/photos/imagenet-sample --unrelated ../shared/data/photos/bsds500 --copies 150
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODSCAN = str(ROOT / ".venv" / "bin" / "modscan")
DAY = "2026-12-04"


def _files(dirs: list[str]) -> list[Path]:
    from models.preprocess import IMAGE_SUFFIXES

    return [p for d in dirs for p in sorted(Path(d).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def make_day(work: Path, refs: list[Path], unrelated: list[Path], n_copies: int, seed: int) -> dict[str, str]:
    """Reference bank folder and the day's uploads (links for the unrelated photos); -> copy key -> reference stem."""
    from models.augment import apply_named, random_edit_names

    (work / "refs").mkdir(parents=True)
    for p in refs:
        os.symlink(p.resolve(), work / "refs" / p.name)
    up = work / "uploads"
    (up / "unrelated").mkdir(parents=True)
    (up / "copy").mkdir()
    for p in unrelated:
        os.symlink(p.resolve(), up / "unrelated" / f"{p.parent.name}-{p.name}")
    rng = random.Random(seed)
    truth = {}
    for i, p in enumerate(rng.sample(refs, n_copies)):
        with Image.open(p) as im:
            apply_named(im.convert("RGB"), random_edit_names(rng), rng).save(up / "copy" / f"{i:04d}.jpg", quality=90)
        truth[f"copy/{i:04d}.jpg"] = p.name
    return truth


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def counts(flags: pd.DataFrame, truth: dict[str, str], source: dict[int, str]) -> dict[str, object]:
    m = flags[flags.status == "matched"]
    un = flags[flags.image_key.str.startswith("unrelated/")]
    cp = flags[flags.image_key.str.startswith("copy/")]
    right = [k for k, r in zip(m.image_key, m.reference_id) if k in truth and source.get(int(r)) == truth[k]]
    return {"unrelated": len(un), "unrelated_flagged": int((un.status == "matched").sum()),
            "unrelated_flagged_keys": sorted(m.image_key[m.image_key.str.startswith("unrelated/")]),
            "copies": len(cp), "copies_flagged_right": len(right), "copy_recall": len(right) / max(len(cp), 1),
            "errors": int((flags.status == "error").sum()),
            "match_rules": flags.match_rule.value_counts(dropna=True).to_dict()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--references", action="append", required=True)
    ap.add_argument("--unrelated", action="append", required=True)
    ap.add_argument("--copies", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/modscan-real-job")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    work = Path(a.workdir)
    if work.exists():
        sys.exit(f"{work} exists: pick another --workdir")
    truth = make_day(work, _files(a.references), _files(a.unrelated), a.copies, a.seed)
    (work / "banks.toml").write_text(f'[[bank]]\nname = "refs"\nsource = "{work / "refs"}"\n'
                                     'category = "sensitive/test"\naction = "filter"\n')
    run([MODSCAN, "gallery", "build", "--banks", str(work / "banks.toml"), "--out", str(work / "gallery"), "--shards", "2"])
    from pipeline import gallery as G
    from pipeline.ingest.storage import open_store

    store = open_store(str(work / "gallery"))
    m = G.read_manifest(store)
    e = G.read_content(store).content.entries
    source = {int(i): Path(u).name for i, u in zip(e["id"], e["source_uri"])}
    from models.card import read_card

    card_fine = float(read_card(None).thresholds["fine"])  # the card's thresholds, no verification: the rule before it
    (work / "fine-alone.toml").write_text(f"[job]\nfine_threshold = {card_fine}\nsure_threshold = {card_fine}\n")
    out: dict[str, object] = {"references": m.counts.images, "thresholds": m.model.thresholds() | {"calibration": None}}
    for name, extra in (("gallery rule (verification)", []), ("card fine threshold alone", ["--config", str(work / "fine-alone.toml")])):
        flags_dir = work / ("flags-" + name.split()[1])
        run([MODSCAN, "moderate", "--input", str(work / "uploads"), "--gallery", str(work / "gallery"),
             "--output", str(flags_dir), "--date", DAY, *extra])
        from pipeline.flags import read_flags

        out[name] = counts(read_flags(str(flags_dir), DAY), truth, source)
        c = out[name]
        print(f"{name}: {c['unrelated_flagged']} of {c['unrelated']} unrelated uploads flagged; "
              f"{c['copies_flagged_right']} of {c['copies']} copies flagged to their reference ({c['copy_recall']:.3f}); "
              f"rules {c['match_rules']}")
    (work / "real_job_check.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
