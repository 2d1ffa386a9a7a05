"""Ray's one known-harmless error line, kept out of ``modscan demo``'s output.

Ray 2.60's core worker logs, once per driver process and at ERROR level, ``Actor ...
MapWorker(MapBatches(Fetcher)) has constructor arguments in the object store and max_restarts > 0 ...
the actor restart will fail`` (ray-project/ray#53727). Every Ray Data actor pool triggers it: Ray
Data puts each operator's serialized map transformer into the object store once
(``MapOperator._map_transformer_ref``) and passes that reference to every ``MapWorker`` it
creates, with ``max_restarts=-1``. A restart fails only if that object is gone; its owner is the
driver, whose executor holds the reference for as long as the dataset runs, so it is lost only
with the driver's node, and then the run is lost anyway. ``tests/jobs/runtime/test_run_faults.py::
test_actor_killed_mid_job_every_row_once`` kills a Moderator actor mid-job and gets every upload
exactly once, through a restart. Turning restarts off (``max_restarts=0``) would silence Ray and
lose that.

The line comes from native code writing to file descriptor 2, past Python's logging, so
:func:`dropping_lines` filters the descriptor itself. Only the demo uses it: operators' logs keep
Ray's output whole (docs/clusters.md says what the line means).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

RAY_53727 = b"ray-project/ray/issues/53727"  # in the line, and in no other
RAY_LOG_PREFIX = b"["  # Ray's native log lines start with "[date time level pid tid]"


def _pump(read_fd: int, write_fd: int, marker: bytes) -> None:
    """Copy ``read_fd`` to ``write_fd`` until EOF, without the lines that contain ``marker``. Output
    passes as it comes (a progress bar's partial line too), except a partial line that may be a Ray
    log line, held until its end."""
    pending = b""
    while chunk := os.read(read_fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(line + b"\n" for line in lines if marker not in line)
        if pending and not pending.startswith(RAY_LOG_PREFIX):
            out, pending = out + pending, b""
        if out:
            os.write(write_fd, out)
    if pending and marker not in pending:
        os.write(write_fd, pending)


@contextlib.contextmanager
def dropping_lines(marker: bytes = RAY_53727, fd: int = 2) -> Iterator[None]:
    """Inside the block, lines written to ``fd`` (by Python or by native code in this process) that
    contain ``marker`` are dropped; everything else reaches the original ``fd`` unchanged and in order."""
    sys.stderr.flush()
    original = os.dup(fd)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, fd)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, original, marker), name="stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, fd)  # closes this process's last write end: the pump reads EOF
        # processes started inside the block (Ray's) may hold a copy of the write end: never wait for them
        pump.join(timeout=2.0)
        if not pump.is_alive():  # else it goes on forwarding what those processes write, to the original
            os.close(read_fd)
            os.close(original)
