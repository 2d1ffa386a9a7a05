"""Regenerate the operator transcripts of ``docs/operations.md``: ``make docs-transcripts``.

Runs the operator's commands for real, with the shipped model, in a fresh work folder:

1. ``modscan demo`` (the demo's gallery ``v000001`` and its day ``2026-01-01``);
2. the operator scene: two plain pictures that someone adds to the sensitive bank by mistake, and
   a second day of uploads that also holds eight plain-background pictures;
3. ``gallery add``, ``moderate`` (with a small flood-guard limit and a metrics textfile),
   ``lookup``, ``review apply`` (a bad file, then a good one), ``lookup`` again, the audit log and
   ``gallery info``, the metrics textfile.

Each block of ``docs/operations.md`` between ``<!-- transcript:NAME -->`` and
``<!-- /transcript -->`` is then replaced by the command lines and their real standard output
(Ray's log lines, which go to standard error, are left out; the work folder is shown as
``/tmp/ops``). Which uploads the lookups show is read from the day's flags, so the blocks show the
rules the shipped model actually applies. Every command must exit as expected: otherwise the
script stops with the command's output and rewrites nothing. With Chromium installed, the review
page screenshot ``docs/review-page.png`` is rendered again too.

    .venv/bin/python docs/make_transcripts.py [--workdir DIR] [--no-screenshot]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
SCREENSHOT = ROOT / "docs" / "review-page.png"
SHOWN_ROOT = "/tmp/ops"   # how the transcripts show the work folder
DAY2 = "2026-01-02"        # the second day (the demo moderates 2026-01-01)
FLOOD_LIMIT = 5           # max_matches_per_reference of the scene (a demo day is 128 uploads)
N_PLAIN = 8               # plain-background uploads of the second day
BLOCK = re.compile(r"(<!-- transcript:([a-z0-9-]+) -->\n)(.*?)(<!-- /transcript -->)", re.S)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RAY_NOISE = re.compile(r"^(\(\w*\s*pid=\d+|\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[,.]\d+\s+(INFO|WARNING|ERROR)\b)")


class Session:
    """Runs commands in the work folder and collects each transcript block's text."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MODSCAN_OPERATOR": "ops-anna",
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("MODSCAN_MODEL", None)  # the shipped model
        exe = Path(sys.executable).with_name("modscan")
        self.modscan = [str(exe)] if exe.exists() else [sys.executable, "-m", "jobs.cli"]
        self.blocks: dict[str, list[str]] = {}

    # -- what the transcripts show -----------------------------------------------------------
    def paths(self, text: str) -> str:
        """The work folder as ``/tmp/ops``, the repository's own paths relative to it."""
        for p in sorted({str(self.work.resolve()), str(self.work)}, key=len, reverse=True):
            text = text.replace(p, SHOWN_ROOT)
        return text.replace(str(ROOT) + "/", "")

    def shown(self, text: str) -> str:
        """Output as the docs show it: no colour codes, no Ray lines, stable paths."""
        lines = [ln.rstrip() for ln in self.paths(ANSI.sub("", text)).splitlines() if not RAY_NOISE.match(ln)]
        return "\n".join(lines).strip("\n")

    def add(self, block: str, command: str, output: str) -> None:
        self.blocks.setdefault(block, []).append(f"$ {self.paths(command)}" + (f"\n{output}" if output else ""))

    def text(self, block: str) -> str:
        return "\n".join(self.blocks[block])

    # -- running things ------------------------------------------------------------------------
    def run(self, argv: list[str], shown_argv: list[str], cwd: Path, expect: int) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True)
        if proc.returncode != expect:
            sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:] + "\n")
            raise SystemExit(f"make_transcripts: `{shlex.join(shown_argv)}` exited {proc.returncode}, "
                             f"expected {expect}; nothing was rewritten")
        return proc

    def modscan_cmd(self, block: str, args: list[str], *, keep: str = "all", expect: int = 0,
                    cwd: Path | None = None) -> str:
        """Run ``modscan ARGS``; record its stdout (or, for an expected failure, its one-line error).

        ``keep``: ``all``, ``json`` (the JSON document only) or ``from:PREFIX`` (from the first
        line starting with PREFIX)."""
        proc = self.run(self.modscan + args, ["modscan", *args], cwd or self.work, expect)
        command = shlex.join(["modscan", *args])
        if expect:
            err = [ln for ln in proc.stderr.splitlines() if ln.startswith("modscan ")]
            self.add(block, f'{command}; echo "exit $?"', self.shown("\n".join(err + [f"exit {expect}"])))
            return proc.stderr
        out = self.shown(proc.stdout)
        lines = out.splitlines()
        first = "{" if keep == "json" else keep[len("from:"):] if keep.startswith("from:") else None
        if first is not None:
            start = next((i for i, ln in enumerate(lines) if ln.startswith(first)), None)
            if start is None:
                raise SystemExit(f"make_transcripts: `{command}` printed no line starting with {first!r}")
            lines = lines[start:]
        if keep == "json":  # up to the document's closing brace: nothing printed after it
            lines = lines[:max(i for i, ln in enumerate(lines) if ln == "}") + 1]
        self.add(block, command, "\n".join(lines))
        return proc.stdout

    def python_cmd(self, block: str, code: str) -> str:
        """Run ``python -c CODE`` with this interpreter (the venv's); record its output."""
        proc = self.run([sys.executable, "-c", code], ["python", "-c", code], self.work, 0)
        self.add(block, shlex.join(["python", "-c", code]), self.shown(proc.stdout))
        return proc.stdout

    def cat(self, block: str, rel: str, *, drop_comments: bool = False) -> None:
        text = (self.work / rel).read_text()
        if drop_comments:
            text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
            self.add(block, f"grep -v '^#' {rel}", self.shown(text))
        else:
            self.add(block, f"cat {rel}", self.shown(text))

    def ls(self, block: str, rel: str) -> None:
        self.add(block, f"ls {rel}", "\n".join(sorted(p.name for p in (self.work / rel).iterdir())))


# -- the scene -----------------------------------------------------------------------------------
def _plain(rng: np.random.Generator, h: int, w: int, level: float | np.ndarray, gradient: float,
           noise: float) -> Image.Image:
    """A near-uniform picture: a flat colour, a horizontal gradient and sensor noise."""
    a = (np.ones((h, w, 3)) * level + rng.normal(0, noise, (h, w, 3))
         + np.linspace(0, gradient, w)[None, :, None])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_scene(work: Path) -> None:
    """``mistake/``: a nearly blank picture and a plain gradient; ``uploads/plain-0N.jpg``; ``ops.toml``."""
    rng = np.random.default_rng(0)
    (work / "mistake").mkdir()
    _plain(rng, 300, 400, 235, 0, 2.5).save(work / "mistake" / "nearly-blank.jpg", quality=92)
    _plain(rng, 300, 400, 210, 60, 4).save(work / "mistake" / "plain-gradient.jpg", quality=92)
    for i in range(N_PLAIN):
        _plain(rng, 240 + 10 * i, 320, rng.uniform(180, 240, 3), 40 + 10 * i, 4).save(
            work / "uploads" / f"plain-{i:02d}.jpg", quality=92)
    (work / "textfile").mkdir()
    (work / "ops.toml").write_text(
        "[job]\n"
        f"max_matches_per_reference = {FLOOD_LIMIT}     # a demo day has 128 uploads; the default, 1000, suits real days\n"
        f'metrics_textfile = "{work / "textfile" / "modscan.prom"}"\n')


def reference_ids(gallery: Path) -> dict[str, int]:
    """Reference id by source file stem, from the current version's ``entries.parquet``."""
    version = (gallery / "CURRENT").read_text().strip()
    e = pd.read_parquet(gallery / "versions" / version / "entries.parquet")
    return {Path(str(u)).stem: int(i) for i, u in zip(e["id"], e["source_uri"])}


def read_day(work: Path, day: str) -> pd.DataFrame:
    sys.path.insert(0, str(ROOT))
    from pipeline.flags import read_flags

    return read_flags(str(work / "flags"), day)


def _first(df: pd.DataFrame) -> str | None:
    return None if df.empty else str(df.sort_values("image_key")["image_key"].iloc[0])


def pick_lookups(flags: pd.DataFrame) -> dict[str, str | None]:
    """One upload per rule the day shows: held or matched, allow-listed, below the fine threshold."""
    others = flags[flags["image_key"].str.startswith("other-")]
    held = _first(others[others["action"] == "review"]) or _first(flags[flags["action"] == "review"])
    matched = held or _first(flags[flags["action"].isin(["filter", "downrank"])])
    allowed = _first(flags[(flags["status"] == "clean") & flags["bank"].notna()])
    clean = others[(others["status"] == "clean") & others["bank"].isna()]
    below = _first(clean[clean["fine_score"].notna()]) or _first(clean)
    if held is None:
        print(f"make_transcripts: warning: the flood guard held no reference on {DAY2}; "
              "docs/operations.md describes a held one", file=sys.stderr)
    return {"held": held, "matched": matched, "allowed": allowed, "below": below}


def _upload(work: Path, pattern: str) -> str:
    found = sorted(p.name for p in (work / "uploads").glob(pattern))
    if not found:
        raise SystemExit(f"make_transcripts: no upload matches {pattern!r}")
    return found[0]


def _ids(work: Path, *names: str) -> dict[str, int]:
    ids = reference_ids(work / "gallery")
    missing = [n for n in names if n not in ids]
    if missing:
        raise SystemExit(f"make_transcripts: references {missing} are not in the gallery (have {sorted(ids)})")
    return ids


def _write_csv(path: Path, rows: list[tuple[object, ...]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image_key", "reference_id", "decision", "reviewer", "note", "bank", "until", "run_id"])
        w.writerows(rows)


def write_decisions(work: Path, run_id: str) -> tuple[str, str]:
    """``bad.csv`` (three bad rows of four) and ``DECISIONS.csv``; -> (camera copy, motorcycle copy)."""
    ids = _ids(work, "plain-gradient", "camera", "astronaut", "stereo_motorcycle")
    camera, astronaut = _upload(work, "copy-*-camera-*"), _upload(work, "copy-*-astronaut-*")
    motorcycle = _upload(work, "copy-*-stereo_motorcycle-*")
    _write_csv(work / "bad.csv", [
        ("plain-01.jpg", ids["plain-gradient"], "false_positive", "rita", "plain background", "", "", ""),
        ("plain-02.jpg", 42, "false_positive", "rita", "plain background", "", "", ""),
        (camera, ids["camera"], "false_positive", "", "licensed stock photo", "allow_demo", "", ""),
        ("", ids["stereo_motorcycle"], "disable_reference", "rita", "licence dispute", "", "2020-12-31", ""),
    ])
    until = f"{dt.date.today().year + 1}-01-01"
    _write_csv(work / "DECISIONS.csv", [
        ("plain-00.jpg", ids["plain-gradient"], "false_positive", "rita",
         "plain gradient from the vendor batch, matches every plain background", "", "", run_id),
        (camera, ids["camera"], "false_positive", "sam", "licensed stock photo of the camera shot", "allow_demo", "",
         run_id),
        (astronaut, ids["astronaut"], "confirmed", "sam", "re-upload of a known picture", "", "", run_id),
        ("", ids["stereo_motorcycle"], "disable_reference", "rita", "licence dispute: off until legal decides", "",
         until, ""),
    ])
    return camera, motorcycle


FLOOD_REASONS = (f'from pipeline.flags import read_flags; f = read_flags("flags", "{DAY2}"); '
                 'print(*f.loc[f.action == "review", "reason"].unique(), sep="\\n")')


def record(s: Session) -> None:
    """Run the whole walkthrough; fills ``s.blocks``."""
    w = s.work
    s.modscan_cmd("demo", ["demo", "--workdir", str(w)], cwd=w.parent)
    make_scene(w)
    s.modscan_cmd("gallery-add", ["gallery", "add", "gallery", "--bank", "sensitive_demo", "--source", "mistake",
                                  "--note", "vendor batch 2026-01"], keep="json")
    s.cat("moderate", "ops.toml")
    s.modscan_cmd("moderate", ["moderate", "--input", "uploads", "--gallery", "gallery", "--output", "flags",
                               "--date", DAY2, "--config", "ops.toml"], keep="from:modscan: dt=")
    flags = read_day(w, DAY2)
    s.python_cmd("flood-reason", FLOOD_REASONS)

    picks = pick_lookups(flags)
    first = [f"uploads/{k}" for k in (picks["matched"], picks["allowed"], picks["below"]) if k]
    s.modscan_cmd("lookup", ["lookup", *first, "uploads/broken-truncated.jpg", "--gallery", "gallery",
                             "--top-k", "3"])
    s.modscan_cmd("lookup-low-content", ["lookup", "mistake/nearly-blank.jpg", "--gallery", "gallery",
                                         "--top-k", "2"])

    camera, motorcycle = write_decisions(w, str(flags["run_id"].iloc[0]))
    s.cat("review-bad", "bad.csv")
    s.modscan_cmd("review-bad", ["review", "apply", "bad.csv", "--gallery", "gallery", "--input", "uploads"],
                  expect=2)
    s.cat("review-apply", "DECISIONS.csv")
    s.modscan_cmd("review-apply", ["review", "apply", "DECISIONS.csv", "--gallery", "gallery", "--input", "uploads"],
                  keep="json")
    after = [f"uploads/{k}" for k in (picks["matched"], camera, motorcycle) if k]
    s.modscan_cmd("lookup-after-review", ["lookup", *after, "--gallery", "gallery", "--top-k", "2"])

    s.ls("audit", "gallery/audit/")
    s.modscan_cmd("audit", ["gallery", "info", "gallery"], keep="json")
    s.cat("metrics", "textfile/modscan.prom", drop_comments=True)


# -- outputs ---------------------------------------------------------------------------------------
def screenshot(work: Path) -> None:
    """The day's review page in headless Chromium, no network, scaled to 70 %, 96 colours."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print(f"chromium not found: {SCREENSHOT.relative_to(ROOT)} left as it is")
        return
    page = next((work / "flags" / "_reviews" / f"dt={DAY2}").glob("review-*.html"))
    raw = work / "review-page-full.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--proxy-server=http://127.0.0.1:9", "--window-size=1280,1900", f"--screenshot={raw}",
                    page.as_uri()], check=True, capture_output=True)
    with Image.open(raw) as im:
        im = im.convert("RGB")
        im = im.resize((int(im.width * 0.7), int(im.height * 0.7)), Image.Resampling.LANCZOS)
        im.quantize(96).save(SCREENSHOT, optimize=True)
    print(f"wrote {SCREENSHOT.relative_to(ROOT)}")


def rewrite(doc: Path, blocks: dict[str, str]) -> None:
    """Replace every transcript block of ``doc``; each block must have a transcript and vice versa."""
    text = doc.read_text()
    names = [m.group(2) for m in BLOCK.finditer(text)]
    missing, unused = sorted(set(names) - set(blocks)), sorted(set(blocks) - set(names))
    if missing or unused:
        raise SystemExit(f"make_transcripts: {doc}: blocks without a transcript {missing}, "
                         f"transcripts without a block {unused}; nothing was rewritten")
    doc.write_text(BLOCK.sub(lambda m: f"{m.group(1)}```text\n{blocks[m.group(2)]}\n```\n{m.group(4)}", text))
    print(f"rewrote {len(names)} transcript blocks in {doc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="keep the walkthrough here (default: a temporary folder, removed)")
    ap.add_argument("--no-screenshot", action="store_true", help="leave docs/review-page.png as it is")
    ap.add_argument("--doc", default=str(DOC), help="the Markdown file whose transcript blocks are rewritten")
    a = ap.parse_args(argv)
    tmp = None if a.workdir else tempfile.mkdtemp(prefix="modscan-transcripts-")
    work = Path(a.workdir or tmp).resolve() / "ops"
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        s = Session(work)
        record(s)
        rewrite(Path(a.doc), {name: s.text(name) for name in s.blocks})
        if not a.no_screenshot:
            screenshot(work)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"blocks": sorted(s.blocks), "workdir": str(work) if a.workdir else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
