"""``modscan demo``: the embedded default, end to end on this machine.

Generates a sample gallery and one day of sample uploads from the photos scikit-image ships
(no download; the images come from :mod:`pipeline.evaluation.samples`), builds the gallery with Ray, runs
the moderation job on a local Ray cluster with the shipped model, and prints the summary and
where to look.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
from pathlib import Path

from PIL import Image

from models.augment import apply_named, crop, random_edit_names
from pipeline.evaluation.samples import UNRELATED_PHOTOS, procedural, skimage_photo

_GALLERY_PHOTOS = {
    # bank -> skimage photo names
    "sensitive_demo": ["astronaut", "rocket", "stereo_motorcycle", "coffee"],
    "spam_demo": ["camera", "chelsea"],
    "allow_demo": ["coffee"],  # known false positive: also in sensitive_demo, the allow-list wins
}

_BANKS_TOML = """# Sample banks of `modscan demo` (see configs/banks.example.toml for the full reference).
[[bank]]
name = "sensitive_demo"
source = "refs/sensitive_demo"
category = "sensitive/demo"
action = "filter"

[[bank]]
name = "spam_demo"
source = "refs/spam_demo"
category = "low_quality/spam"
action = "downrank"

[[bank]]
name = "allow_demo"
source = "refs/allow_demo"
category = "allow/known_false_positive"
action = "allow"

[[bank]]
name = "list_demo"                   # a hash-list bank: PDQ hashes, as a hash-sharing program sends them
kind = "pdq"
source = "lists/demo.pdq.txt"
category = "sensitive/demo_list"
action = "filter"
pdq_max_distance = 31
"""
# references whose PDQ hashes make the demo's hash list (lists/demo.pdq.txt)
_LIST_PHOTOS = ("astronaut", "rocket")


def _save(im: Image.Image, path: Path, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("PNG" if path.suffix == ".png" else "JPEG")
    im.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _make_sample(workdir: Path, n_uploads: int, seed: int = 0) -> dict[str, int]:
    """Write ``refs/<bank>/*.jpg``, ``banks.toml`` and ``uploads/*`` under ``workdir``."""
    rng = random.Random(seed)
    for bank, names in _GALLERY_PHOTOS.items():
        for n in names:
            _save(skimage_photo(n), workdir / "refs" / bank / f"{n}.jpg")
    (workdir / "banks.toml").write_text(_BANKS_TOML)
    from pipeline.signals.hashes import pdq_from_bytes
    from pipeline.signals.lists import write_list

    refs = [(workdir / "refs" / "sensitive_demo" / f"{n}.jpg").read_bytes() for n in _LIST_PHOTOS]
    (workdir / "lists").mkdir(parents=True, exist_ok=True)
    write_list(str(workdir / "lists" / "demo.pdq.txt"), [pdq_from_bytes(b, min_side=None)[0] for b in refs], "pdq")
    up = workdir / "uploads"
    gallery_names = sorted({n for ns in _GALLERY_PHOTOS.values() for n in ns})
    n_copies = max(1, n_uploads // 5)
    n_broken = 4
    n_unrelated = max(0, n_uploads - n_copies - n_broken)
    for i in range(n_copies):
        name = gallery_names[i % len(gallery_names)]
        edits = random_edit_names(rng)
        im = apply_named(skimage_photo(name), edits, rng)
        _save(im, up / f"copy-{i:03d}-{name}-{'+'.join(edits)}.jpg")
    for i in range(n_unrelated):
        if i % 3 == 2:
            im = procedural(rng)
        else:
            im = crop(skimage_photo(UNRELATED_PHOTOS[i % len(UNRELATED_PHOTOS)]), rng, min_area=0.3)
        _save(im, up / f"other-{i:03d}.jpg")
    # An upload that is a re-saved copy of a listed reference: matched through its PDQ hash.
    _save(skimage_photo(_LIST_PHOTOS[0]), up / f"copy-listed-{_LIST_PHOTOS[0]}.jpg")
    # Broken uploads: each must become an error row with a stable code.
    buf = io.BytesIO()
    skimage_photo("astronaut").save(buf, format="JPEG")
    (up / "broken-truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (up / "broken-empty.jpg").write_bytes(b"")
    (up / "broken-not-an-image.jpg").write_bytes(b"<html><body>not a picture</body></html>")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(up / "broken-1x1.png")
    return {"copies": n_copies, "unrelated": n_unrelated, "broken": n_broken}


def run_demo(a: argparse.Namespace) -> int:
    """The demo, its output kept to what a new user needs: the summary, progress and real warnings
    (Ray's harmless #53727 line is dropped: :mod:`jobs.runtime.ray_notices`)."""
    from jobs.runtime.ray_notices import dropping_lines

    with dropping_lines():
        return _run_demo(a)


def _run_demo(a: argparse.Namespace) -> int:
    from jobs.commands.gallery_cmd import ray_extractor
    from jobs.runtime.run import moderate, summary
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import load_banks
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.flags import read_flags

    work = Path(a.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    counts = _make_sample(work, a.uploads)
    print(f"sample data in {work}: {json.dumps(counts)} uploads; banks in {work / 'banks.toml'}")
    card = read_card(None)
    print(f"model {card.version_id} ({card.config.backbone.value}, {card.config.high_res}/{card.config.low_res} px)")
    version, stats = G.build(open_store(str(work / "gallery"), create=True), load_banks(work / "banks.toml"), card,
                             ray_extractor(None), n_shards=2)
    print(f"gallery {version}: {json.dumps(stats)}")
    info = moderate(str(work / "uploads"), str(work / "gallery"), str(work / "flags"), a.date)
    print(summary(info))
    df = read_flags(str(work / "flags"), a.date)
    copies = df[df["image_key"].str.startswith("copy-")]
    others = df[df["image_key"].str.startswith("other-")]
    print(f"  edited copies flagged or allow-listed: {int((copies['bank'].notna()).sum())}/{len(copies)}; "
          f"unrelated uploads flagged: {int((others['status'] == 'matched').sum())}/{len(others)}")
    by_signal = df[df["status"] == "matched"]["signal"].value_counts().to_dict()
    print(f"  matches by signal (descriptor | pdq | md5): {json.dumps(by_signal)}; "
          f"hash-list matches (bank list_demo): {int((df['bank'] == 'list_demo').sum())}")
    print(f"\nread the flags:\n  {sys.executable} -c \"import pandas as pd; print(pd.read_parquet('{work / 'flags'}')"
          f".query('status == \\\"matched\\\"')[['image_key','action','bank','signal','fine_score','pdq_distance']])\"")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="embedded default: sample gallery + a day of sample uploads, end to end")
    p.add_argument("--workdir", default="demo-out")
    p.add_argument("--date", default="2026-01-01")
    p.add_argument("--uploads", type=int, default=120)
    p.set_defaults(fn=run_demo)
