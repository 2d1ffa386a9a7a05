"""Prometheus metrics of one moderation run, rendered from its ``_run.json`` content.

``_run.json`` stays the source of truth; this module only re-expresses it for dashboards and
alerts. :func:`run_registry` puts a run's numbers into a ``prometheus_client`` registry (one
custom collector of gauges: the values are a finished run's, not live counters), which is
published two ways:

* a **node-exporter textfile** (``metrics_textfile`` in ``[job]``): ``write_to_textfile`` writes
  a temporary name in the same folder and renames it, so the collector never reads half a file
  (it only reads ``*.prom``; the temporary name does not end in ``.prom``);
* a **Pushgateway** (``metrics_pushgateway``): ``push_to_gateway``, one HTTP ``PUT`` of the same
  text to ``<url>/metrics/job/<job>``, which replaces the group's previous metrics.
  ``user:password@`` in the URL becomes the client's basic-auth handler and is never printed.

Metrics are written only after a partition is committed, so
``modscan_last_success_timestamp_seconds`` and ``modscan_last_success_partition_timestamp_seconds``
move only on success; the README's alert rule ("no successful run for date D by hour H") keys on
the second one.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import basic_auth_handler, default_handler

from pipeline.errors import ModscanError
from pipeline.ingest.storage import redact

log = logging.getLogger(__name__)


class MetricsPushError(ModscanError, RuntimeError):
    """The Pushgateway refused or could not be reached (the partition is committed regardless)."""


def _gauge(name: str, help_: str, samples: list[tuple[dict[str, Any], Any]] | Any) -> GaugeMetricFamily:
    """One gauge family: a bare value (``None`` is NaN) or ``[(labels, value), ...]``."""
    if not isinstance(samples, list):
        samples = [({}, samples)]
    labelnames = list(samples[0][0]) if samples else []
    family = GaugeMetricFamily(name, help_, labels=labelnames)
    for labels, value in samples:
        family.add_metric([str(labels[k]) for k in labelnames], float(value) if value is not None else float("nan"))
    return family


def _epoch(iso: str) -> float:
    return _dt.datetime.fromisoformat(iso).timestamp()


def _families(run_info: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Every gauge of a committed run's ``_run.json`` content, in exposition order."""
    c = run_info["counts"]
    flood = run_info.get("flood_guard") or {}
    yield _gauge("modscan_run_info", "Provenance of the last committed run (value 1).",
                 [({"dt": run_info["dt"], "run_id": run_info["run_id"], "model_version": run_info["model_version"],
                    "gallery_version": run_info["gallery_version"]}, 1)])
    yield _gauge("modscan_run_images", "Input objects of the last run (one flag row each).", run_info["inputs"])
    yield _gauge("modscan_run_rows", "Flag rows written by the last run.", c["rows"])
    yield _gauge("modscan_run_rows_by_status", "Flag rows by status.", [({"status": k}, v) for k, v in sorted(c["by_status"].items())])
    yield _gauge("modscan_run_rows_by_action", "Flag rows by action.", [({"action": k}, v) for k, v in sorted(c["by_action"].items())])
    yield _gauge("modscan_run_error_rows", "Error rows by stable error code.",
                 [({"error_code": k}, v) for k, v in sorted(c["by_error_code"].items())])
    # without a flood-guard section (older runs), rows per bank (allow-list suppressions included)
    per_bank = flood["matches_per_bank"] if flood else c.get("by_bank", {})
    yield _gauge("modscan_run_matches", "Blocking matches per bank.", [({"bank": k}, v) for k, v in sorted(per_bank.items())])
    if flood:
        yield _gauge("modscan_run_allowed", "Matches suppressed by each allow bank.",
                     [({"bank": k}, v) for k, v in sorted(flood.get("allowed_per_bank", {}).items())])
        yield _gauge("modscan_run_held_references", "References held by the flood guard.", len(flood.get("held", [])))
        yield _gauge("modscan_run_held_rows", "Rows set to action=review by the flood guard.", flood.get("held_rows", 0))
    yield _gauge("modscan_run_survivors", "Uploads that passed the coarse stage (got the 512-d pass).", run_info.get("survivors", 0))
    yield _gauge("modscan_run_images_per_second", "Pipeline throughput of the last run.", run_info.get("images_per_second"))
    yield _gauge("modscan_run_steady_state_images_per_second", "Throughput from first to last model batch.",
                 run_info.get("steady_state_images_per_second"))
    yield _gauge("modscan_run_duration_seconds", "Wall time of the last run.", run_info.get("wall_seconds"))
    yield _gauge("modscan_last_success_timestamp_seconds", "When the last run committed its partition (Unix time).",
                 _epoch(run_info["finished_at"]))
    yield _gauge("modscan_last_success_partition_timestamp_seconds",
                 "Start (UTC) of the partition the last successful run committed: 00:00 of its date, or its hour (Unix time).",
                 _dt.datetime.combine(_dt.date.fromisoformat(run_info["dt"]), _dt.time(run_info.get("hour") or 0),
                                      _dt.UTC).timestamp())


class _RunCollector:
    """A ``prometheus_client`` custom collector over one run's ``_run.json`` content."""

    def __init__(self, run_info: dict[str, Any]) -> None:
        self.run_info = run_info

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return _families(self.run_info)


def run_registry(run_info: dict[str, Any]) -> CollectorRegistry:
    """A committed run's ``_run.json`` content -> a registry holding its gauges (and nothing else)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RunCollector(run_info))
    return registry


def render(run_info: dict[str, Any]) -> str:
    """A committed run's ``_run.json`` content -> Prometheus text format (what is written and pushed)."""
    return generate_latest(run_registry(run_info)).decode("utf-8")


def write_textfile(path: str, registry: CollectorRegistry) -> str:
    """Atomically replace ``path`` (a node-exporter textfile, ``*.prom``) with ``registry``'s metrics."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_to_textfile(path, registry)
    return path


def _auth_handler(parts: urllib.parse.SplitResult, sent: list[str]) -> Callable[..., Callable[[], None]]:
    """The client's handler for ``parts``' credentials (basic auth when the URL has a user), which
    also records the URL it sends to."""
    user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password or "")

    def handler(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Callable[[], None]:
        sent.append(url)
        if user is None:
            return default_handler(url, method, timeout, headers, data)
        return basic_auth_handler(url, method, timeout, headers, data, user, password)
    return handler


def push(url: str, registry: CollectorRegistry, job: str = "modscan", timeout: float = 10.0) -> str:
    """``PUT`` ``registry``'s metrics to a Pushgateway as group ``job``; returns the URL pushed to (no secrets)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MetricsPushError(f"metrics_pushgateway must be an http(s) URL, got {redact(url)!r}")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    gateway = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    sent: list[str] = []
    try:
        push_to_gateway(gateway, job=job, registry=registry, timeout=timeout, handler=_auth_handler(parts, sent))
    except urllib.error.HTTPError as e:
        body = e.read(300).decode("utf-8", "replace").strip()
        raise MetricsPushError(f"Pushgateway {sent[-1]} answered HTTP {e.code}: {body}") from None
    except OSError as e:  # URLError, a refused connection, a timeout, or the client's own ">= 400" error
        raise MetricsPushError(f"Pushgateway {sent[-1] if sent else gateway} unreachable: "
                               f"{redact(str(getattr(e, 'reason', e)))}") from None
    return sent[-1]


def publish(run_info: dict[str, Any], textfile: str | None = None, pushgateway: str | None = None,
            job: str = "modscan") -> dict[str, str]:
    """Write and/or push a committed run's metrics; returns where they went. Raises on failure:
    the caller records it (the partition is already committed)."""
    if not textfile and not pushgateway:
        return {}
    registry = run_registry(run_info)
    out: dict[str, str] = {}
    if textfile:
        out["textfile"] = write_textfile(textfile, registry)
    if pushgateway:
        out["pushgateway"] = push(pushgateway, registry, job)
    log.info("metrics of run %s: %s", run_info.get("run_id"), out)
    return out
