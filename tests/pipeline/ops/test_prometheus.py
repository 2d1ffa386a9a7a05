"""pipeline/ops/prometheus.py: Prometheus metrics of a run: exposition format parsed back, atomic textfile, Pushgateway PUT
(prometheus_client's) against a real HTTP server on 127.0.0.1, failures reported, not raised past the commit."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families
from pushgateway_stub import pushgateway

from pipeline.ops.prometheus import MetricsPushError, publish, push, render, run_registry, write_textfile

RUN = {  # the shape moderate() commits as _run.json
    "run_id": "20261125T031502-ab12cd34", "dt": "2026-11-25", "model_version": "resnet18-160x112-1fa986fea88d",
    "gallery_version": "v000007", "inputs": 120, "survivors": 117, "images_per_second": 2.5,
    "steady_state_images_per_second": 3.1, "wall_seconds": 61.2, "finished_at": "2026-11-25T03:16:03.5+00:00",
    "counts": {"rows": 120, "by_status": {"clean": 100, "matched": 16, "error": 4},
               "by_action": {"none": 104, "filter": 8, "downrank": 3, "review": 5},
               "by_error_code": {"truncated": 1, "empty_file": 1, "not_an_image": 1, "image_too_small": 1},
               "by_bank": {"violence": 13, "spam": 3, "fp": 2}},
    "flood_guard": {"max_matches_per_reference": 1000, "matched_rows": 16, "references_matched": 4,
                    "matches_per_bank": {"spam": 3, "violence": 13}, "matches_per_reference": {"3": 5},
                    "allowed_per_bank": {"fp": 2}, "held": [{"reference_id": 3, "bank": "violence", "category": "s",
                                                             "matches": 5, "held_action": "filter"}],
                    "held_rows": 5, "files_rewritten": 1},
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_render_is_valid_exposition_format_with_every_count() -> None:
    s = _samples(render(RUN))
    assert s[("modscan_run_images", ())] == 120
    assert s[("modscan_run_rows_by_status", (("status", "error"),))] == 4
    assert s[("modscan_run_rows_by_action", (("action", "review"),))] == 5
    assert s[("modscan_run_error_rows", (("error_code", "truncated"),))] == 1
    assert s[("modscan_run_matches", (("bank", "violence"),))] == 13
    assert s[("modscan_run_allowed", (("bank", "fp"),))] == 2
    assert s[("modscan_run_held_references", ())] == 1 and s[("modscan_run_held_rows", ())] == 5
    assert s[("modscan_run_survivors", ())] == 117 and s[("modscan_run_images_per_second", ())] == 2.5
    assert s[("modscan_run_duration_seconds", ())] == 61.2
    assert s[("modscan_last_success_timestamp_seconds", ())] == pytest.approx(1795576563.5)
    assert s[("modscan_last_success_partition_timestamp_seconds", ())] == 1795564800.0  # 2026-11-25T00:00Z
    info = [k for k in s if k[0] == "modscan_run_info"][0]
    assert dict(info[1])["gallery_version"] == "v000007"
    hourly = _samples(render({**RUN, "hour": 13}))  # an hourly partition: the start of its hour
    assert hourly[("modscan_last_success_partition_timestamp_seconds", ())] == 1795564800.0 + 13 * 3600


def test_label_values_are_escaped() -> None:
    run = {**RUN, "counts": {**RUN["counts"], "by_action": {}, "by_status": {}, "by_error_code": {}},
           "flood_guard": {**RUN["flood_guard"], "matches_per_bank": {'we"ird\\bank\nname': 2}}}
    s = _samples(render(run))
    assert s[("modscan_run_matches", (("bank", 'we"ird\\bank\nname'),))] == 2



def test_an_older_run_without_flood_guard_or_throughput_still_renders() -> None:
    run = {k: v for k, v in RUN.items() if k not in ("flood_guard", "images_per_second")}
    text = render(run)
    s = _samples(text)
    assert s[("modscan_run_matches", (("bank", "fp"),))] == 2  # rows per bank, allow suppressions included
    assert s[("modscan_run_images_per_second", ())] != s[("modscan_run_images_per_second", ())]  # NaN, not left out
    assert "modscan_run_held_rows" not in text and "modscan_run_allowed" not in text

def test_textfile_is_replaced_atomically(tmp_path) -> None:
    p = tmp_path / "collector" / "modscan.prom"
    write_textfile(str(p), run_registry({**RUN, "inputs": 7}))
    assert write_textfile(str(p), run_registry(RUN)) == str(p)
    assert p.read_text() == render(RUN) and _samples(p.read_text())[("modscan_run_images", ())] == 120
    assert os.listdir(p.parent) == ["modscan.prom"]  # no temporary file left behind


def test_push_puts_the_text_to_the_pushgateway_group() -> None:
    text = render(RUN)
    with pushgateway() as gw:
        url = push(gw.url.replace("http://", "http://ops:s3cret@") + "/", run_registry(RUN))
        # a job name with a space goes as Pushgateway's base64 grouping key ("modscan nightly")
        spaced = push(gw.url, run_registry(RUN), job="modscan nightly")
    assert url == f"{gw.url}/metrics/job/modscan" and "s3cret" not in url
    assert spaced == f"{gw.url}/metrics/job@base64/bW9kc2NhbiBuaWdodGx5"
    assert gw.requests == [("PUT", "/metrics/job/modscan", text), ("PUT", "/metrics/job@base64/bW9kc2NhbiBuaWdodGx5", text)]
    assert gw.headers[0]["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert gw.headers[0]["Authorization"] == "Basic b3BzOnMzY3JldA=="  # ops:s3cret
    assert "Authorization" not in gw.headers[1]  # no credentials in the URL: no auth header


def test_push_failures_are_clear_errors(tmp_path) -> None:
    with pushgateway(status=500) as gw:
        with pytest.raises(MetricsPushError, match=r"answered HTTP 500"):
            push(gw.url, run_registry(RUN))
    with pushgateway() as gw:
        dead = gw.url
    with pytest.raises(MetricsPushError, match="unreachable"):
        push(dead, run_registry(RUN), timeout=2)
    with pytest.raises(MetricsPushError, match="must be an http"):
        push("ftp://gw", run_registry(RUN))
    # publish writes the textfile before trying the push, so a dead gateway costs only the push
    with pytest.raises(MetricsPushError):
        publish(RUN, str(tmp_path / "m.prom"), dead)
    assert (tmp_path / "m.prom").exists()
    assert publish(RUN) == {}


PROMTOOL = shutil.which("promtool")
RULES = ROOT / "infra" / "prometheus"


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian: apt-get install prometheus)")
def test_alert_rule_fires_only_when_yesterdays_partition_is_missing_by_the_deadline() -> None:
    """promtool's own rule unit tests (infra/prometheus/modscan.rules.test.yml): quiet when the
    nightly run committed D (even after a later backfill push of an older date), quiet before the
    deadline, firing after it when D is missing, and an alert when the metric is gone."""
    for cmd in (["check", "rules", "modscan.rules.yml"], ["test", "rules", "modscan.rules.test.yml"]):
        r = subprocess.run([PROMTOOL, *cmd], cwd=RULES, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    # the rule keys on the metric the job writes
    assert "modscan_last_success_partition_timestamp_seconds" in render(RUN)
