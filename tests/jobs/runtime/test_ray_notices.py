"""jobs/runtime/ray_notices.py: Ray's #53727 line dropped from a file descriptor, everything else kept.

A child process writes to the descriptor the way Ray's native logger does (os.write on fd 2, not
through Python's sys.stderr), so the filter is tested where the real line comes from."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

from jobs.runtime.ray_notices import RAY_53727

RAY_LINE = ("[2026-12-05 00:56:20,171 E 16896 16896] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(Fetcher))' and ID: 'ffd4' has constructor arguments in the object store and "
            "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
            "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\n")


def _run(body: str, tmp_path: Path) -> str:
    """``body`` run inside ``dropping_lines()`` in a fresh interpreter whose stderr is a file. -> that file."""
    script = tmp_path / "child.py"
    script.write_text("import os, sys, time\nfrom jobs.runtime.ray_notices import dropping_lines\n"
                      "with dropping_lines():\n" + textwrap.indent(textwrap.dedent(body), "    ") + "print('after', file=sys.stderr)\n")
    err = tmp_path / "err.txt"
    with err.open("wb") as f:
        subprocess.run([sys.executable, str(script)], stderr=f, check=True, timeout=60, cwd=ROOT)
    return err.read_bytes().decode()  # bytes as written: a progress bar's \r kept


def test_the_ray_line_is_dropped_and_everything_else_kept_in_order(tmp_path) -> None:
    out = _run(f"""
        print("INFO before", file=sys.stderr, flush=True)
        os.write(2, {RAY_LINE.encode()!r}[:40])      # the native line arrives in pieces
        os.write(2, {RAY_LINE.encode()!r}[40:])
        os.write(2, b"[2026-12-05 E 1 1] core_worker.cc:1: a real error\\n")
        print("progress 50%\\r", end="", file=sys.stderr, flush=True)
        print("progress 100%", file=sys.stderr, flush=True)
    """, tmp_path)
    assert RAY_53727.decode() not in out and "constructor arguments" not in out
    assert out == "INFO before\n[2026-12-05 E 1 1] core_worker.cc:1: a real error\nprogress 50%\rprogress 100%\nafter\n"


def test_a_partial_line_passes_at_once(tmp_path) -> None:
    """A progress bar's line without its newline reaches the terminal before the block ends."""
    seen = tmp_path / "seen.txt"
    out = _run(f"""
        os.write(2, b"12/40 batches")
        time.sleep(0.5)
        open({str(seen)!r}, "w").write(open({str(tmp_path / "err.txt")!r}).read())
    """, tmp_path)
    assert seen.read_text() == "12/40 batches" and out == "12/40 batches" + "after\n"
