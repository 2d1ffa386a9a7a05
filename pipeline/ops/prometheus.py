"""Prometheus metrics of one moderation run, rendered from its ``_run.json`` content.

``_run.json`` stays the source of truth; this module only re-expresses it for dashboards and
alerts, in the Prometheus text exposition format (0.0.4), two ways:

* a **node-exporter textfile** (``metrics_textfile`` in ``[job]``): written to a temporary name
  in the same folder and renamed, so the collector never reads half a file (it only reads
  ``*.prom``; the temporary name does not end in ``.prom``);
* a **Pushgateway** (``metrics_pushgateway``): one HTTP ``PUT`` of the same text to
  ``<url>/metrics/job/<job>``, which replaces the group's previous metrics. Plain ``urllib``: no
  client library, so the job has no extra dependency. ``user:password@`` in the URL becomes a
  basic-auth header and is never printed.

Metrics are written only after a partition is committed, so
``modscan_last_success_timestamp_seconds`` and ``modscan_last_success_partition_timestamp_seconds``
move only on success; the README's alert rule ("no successful run for date D by hour H") keys on
the second one.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pipeline.errors import ModscanError
from pipeline.ingest.storage import redact

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsPushError(ModscanError, RuntimeError):
    """The Pushgateway refused or could not be reached (the partition is committed regardless)."""


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: Any) -> str:
    return repr(float(v)) if v is not None else "NaN"


class _Doc:
    """Collects metric families in exposition format, one HELP/TYPE header per family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def gauge(self, name: str, help_: str, samples: list[tuple[dict[str, Any], Any]] | Any) -> None:
        if not isinstance(samples, list):
            samples = [({}, samples)]
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _epoch(iso: str) -> float:
    return _dt.datetime.fromisoformat(iso).timestamp()


def render(run_info: dict[str, Any]) -> str:
    """A committed run's ``_run.json`` content -> Prometheus text format."""
    c = run_info["counts"]
    flood = run_info.get("flood_guard") or {}
    d = _Doc()
    d.gauge("modscan_run_info", "Provenance of the last committed run (value 1).",
            [({"dt": run_info["dt"], "run_id": run_info["run_id"], "model_version": run_info["model_version"],
               "gallery_version": run_info["gallery_version"]}, 1)])
    d.gauge("modscan_run_images", "Input objects of the last run (one flag row each).", run_info["inputs"])
    d.gauge("modscan_run_rows", "Flag rows written by the last run.", c["rows"])
    d.gauge("modscan_run_rows_by_status", "Flag rows by status.", [({"status": k}, v) for k, v in sorted(c["by_status"].items())])
    d.gauge("modscan_run_rows_by_action", "Flag rows by action.", [({"action": k}, v) for k, v in sorted(c["by_action"].items())])
    d.gauge("modscan_run_error_rows", "Error rows by stable error code.",
            [({"error_code": k}, v) for k, v in sorted(c["by_error_code"].items())])
    # without a flood-guard section (older runs), rows per bank (allow-list suppressions included)
    per_bank = flood["matches_per_bank"] if flood else c.get("by_bank", {})
    d.gauge("modscan_run_matches", "Blocking matches per bank.", [({"bank": k}, v) for k, v in sorted(per_bank.items())])
    if flood:
        d.gauge("modscan_run_allowed", "Matches suppressed by each allow bank.",
                [({"bank": k}, v) for k, v in sorted(flood.get("allowed_per_bank", {}).items())])
        d.gauge("modscan_run_held_references", "References held by the flood guard.", len(flood.get("held", [])))
        d.gauge("modscan_run_held_rows", "Rows set to action=review by the flood guard.", flood.get("held_rows", 0))
    d.gauge("modscan_run_survivors", "Uploads that passed the coarse stage (got the 512-d pass).", run_info.get("survivors", 0))
    d.gauge("modscan_run_images_per_second", "Pipeline throughput of the last run.", run_info.get("images_per_second"))
    d.gauge("modscan_run_steady_state_images_per_second", "Throughput from first to last model batch.",
            run_info.get("steady_state_images_per_second"))
    d.gauge("modscan_run_duration_seconds", "Wall time of the last run.", run_info.get("wall_seconds"))
    d.gauge("modscan_last_success_timestamp_seconds", "When the last run committed its partition (Unix time).",
            _epoch(run_info["finished_at"]))
    d.gauge("modscan_last_success_partition_timestamp_seconds",
            "00:00 UTC of the partition date the last successful run committed (Unix time).",
            _dt.datetime.combine(_dt.date.fromisoformat(run_info["dt"]), _dt.time(), _dt.UTC).timestamp())
    return d.text()


def write_textfile(path: str, text: str) -> str:
    """Atomically replace ``path`` (a node-exporter textfile, ``*.prom``)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, name))
    return os.path.join(folder, name)


def push(url: str, text: str, job: str = "modscan", timeout: float = 10.0) -> str:
    """``PUT`` the metrics to a Pushgateway as group ``job``; returns the URL pushed to (no secrets)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise MetricsPushError(f"metrics_pushgateway must be an http(s) URL, got {redact(url)!r}")
    headers = {"Content-Type": CONTENT_TYPE}
    if parts.username is not None:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    target = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") +
                                      f"/metrics/job/{urllib.parse.quote(job, safe='')}", "", ""))
    req = urllib.request.Request(target, data=text.encode("utf-8"), method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status // 100 != 2:
                raise MetricsPushError(f"Pushgateway {target} answered HTTP {resp.status}")
    except urllib.error.HTTPError as e:
        body = e.read(300).decode("utf-8", "replace").strip()
        raise MetricsPushError(f"Pushgateway {target} answered HTTP {e.code}: {body}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MetricsPushError(f"Pushgateway {target} unreachable: {redact(str(getattr(e, 'reason', e)))}") from None
    return target


def publish(run_info: dict[str, Any], textfile: str | None = None, pushgateway: str | None = None,
            job: str = "modscan") -> dict[str, str]:
    """Write and/or push a committed run's metrics; returns where they went. Raises on failure:
    the caller records it (the partition is already committed)."""
    if not textfile and not pushgateway:
        return {}
    text = render(run_info)
    out: dict[str, str] = {}
    if textfile:
        out["textfile"] = write_textfile(textfile, text)
    if pushgateway:
        out["pushgateway"] = push(pushgateway, text, job)
    log.info("metrics of run %s: %s", run_info.get("run_id"), out)
    return out
