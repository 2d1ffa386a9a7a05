"""pipeline/moderation/floodguard.py: a reference (or a hash-list entry) that matches more uploads than
the limit is held for review instead of its action, on real staged Parquet files read back after the
rewrite: the descriptor cases in the shared operator world (``operator_world.py``: the shipped model's
gallery, an over-broad plain-gradient reference), the list-entry cases on hand-made rows, and the real
job on a local Ray cluster (held rows, ``_run.json``, summary, Prometheus metrics)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from operator_world import DAY, FLOOD_LIMIT, N_PLAIN, stage_rows

from pipeline.ingest.storage import open_store
from pipeline.moderation import flags as F
from pipeline.moderation.floodguard import guard_staged
from pipeline.schemas import FILE_SCHEMA


def _rows(specs: list[tuple[str, str, str | None, int | None, str]]) -> pa.Table:
    """(image_key, bank, list_entry_id, reference_id, signal) matched rows with action filter."""
    now = dt.datetime.now(dt.UTC)
    given = {"image_key": [s[0] for s in specs], "bank": [s[1] for s in specs], "list_entry_id": [s[2] for s in specs],
             "reference_id": [s[3] for s in specs], "signal": [s[4] for s in specs]}
    n = len(specs)
    fixed = {"status": "matched", "action": "filter", "category": "sensitive/x", "model_version": "m",
             "gallery_version": "v000001", "run_id": "r1", "processed_at": now}
    cols = {f.name: given.get(f.name, [fixed.get(f.name)] * n) for f in FILE_SCHEMA}
    return pa.Table.from_pydict(cols, schema=FILE_SCHEMA)


def test_a_list_entry_over_the_limit_is_held_and_the_others_are_not(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    F.write_staged(out, "r1", "a.parquet", _rows([(f"u{i}.jpg", "ncmec", "e1", None, "pdq") for i in range(3)]
                                              + [("v.jpg", "ncmec", "e2", None, "md5")]))
    F.write_staged(out, "r1", "b.parquet", _rows([("w.jpg", "ncmec", "e1", None, "pdq"), ("x.jpg", "imgs", None, 7, "descriptor")]))
    rep = guard_staged(out, "r1", max_matches_per_reference=3)
    assert [(h.bank, h.list_entry_id, h.reference_id, h.matches) for h in rep.held] == [("ncmec", "e1", None, 4)]
    assert rep.held_rows == 4 and rep.files_rewritten == 2
    data = out.child(F.staging_key("r1") + "/data")
    t = pa.concat_tables([pq.read_table(data.path(k), filesystem=out.fs) for k in sorted(data.list())]).to_pylist()
    by_key = {r["image_key"]: r for r in t}
    assert all(by_key[k]["action"] == "review" and "list entry 'e1'" in by_key[k]["reason"]
               for k in ("u0.jpg", "u1.jpg", "u2.jpg", "w.jpg"))
    assert by_key["v.jpg"]["action"] == "filter" and by_key["x.jpg"]["action"] == "filter"
    assert by_key["v.jpg"]["reason"] is None


def test_under_the_limit_nothing_is_held(tmp_path) -> None:
    out = open_store(str(tmp_path / "flags"), create=True)
    F.write_staged(out, "r1", "a.parquet", _rows([(f"u{i}.jpg", "ncmec", "e1", None, "pdq") for i in range(3)]))
    rep = guard_staged(out, "r1", max_matches_per_reference=3)
    assert rep.held == () and rep.held_rows == 0 and rep.matches_per_bank == {"ncmec": 3}


def test_flood_guard_holds_the_over_broad_reference(ops_world, committed) -> None:
    ref, rep = ops_world["ref"], committed["report"]
    assert [(h.reference_id, h.bank, h.matches, h.held_action) for h in rep.held] == [
        (ref["plain-gradient"], "violence", N_PLAIN, "filter")]
    assert rep.held_rows == N_PLAIN and rep.files_rewritten == 2  # its rows sat in both staged files
    assert rep.matches_per_reference[str(ref["plain-gradient"])] == N_PLAIN
    assert rep.matches_per_reference[str(ref["rocket"])] == 1
    assert rep.matches_per_bank == {"spam": 1, "violence": N_PLAIN + 1} and rep.allowed_per_bank == {"fp": 1}
    df = F.read_flags(committed["out"].uri, DAY)
    held = df[df["action"] == "review"]
    assert sorted(held["image_key"]) == [f"plain-{i:02d}.jpg" for i in range(N_PLAIN)]
    assert (held["status"] == "matched").all() and held["reason"].str.contains(
        f"reference #{ref['plain-gradient']} \\(violence\\) matched {N_PLAIN} uploads").all()
    assert held["reason"].str.contains(f"max_matches_per_reference={FLOOD_LIMIT}; held for review instead of filter").all()
    rocket = df[df["image_key"] == "copy-rocket-flip.jpg"].iloc[0]
    assert rocket["action"] == "filter" and pd.isna(rocket["reason"])  # one match: not held
    assert df.loc[df["action"] != "review", "reason"].isna().all()
    assert committed["counts"]["by_action"]["review"] == N_PLAIN  # the commit's counts see the final rows
    assert F.read_run(committed["out"], DAY)["flood_guard"]["held_rows"] == N_PLAIN


def test_flood_guard_off_and_under_the_limit_changes_nothing(ops_world, moderated, tmp_path) -> None:
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.floodguard import guard_staged

    for limit in (0, N_PLAIN):  # 0: off; N_PLAIN: not *more* than the limit
        out = open_store(str(tmp_path / f"o{limit}"), create=True)
        stage_rows(out, "r", moderated)
        before = {k: out.read_bytes(k) for k in out.list()}
        rep = guard_staged(out, "r", limit)
        assert rep.held == () and rep.held_rows == 0 and rep.matches_per_bank["violence"] == N_PLAIN + 1
        assert {k: out.read_bytes(k) for k in out.list()} == before




def test_job_holds_floods_and_writes_metrics(ops_world, ray_local, tmp_path) -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from pushgateway_stub import pushgateway

    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import moderate, summary
    from pipeline.ingest.storage import open_store

    with pushgateway() as gw:
        cfg = JobConfig(batch_size=8, max_matches_per_reference=FLOOD_LIMIT,
                        metrics_textfile=str(tmp_path / "textfile" / "modscan.prom"), metrics_pushgateway=gw.url)
        info = moderate(str(ops_world["uploads"]), str(ops_world["gallery"]), str(tmp_path / "flags"), DAY, cfg=cfg)
    fg = info["flood_guard"]
    assert [h["reference_id"] for h in fg["held"]] == [ops_world["ref"]["plain-gradient"]] and fg["held_rows"] == N_PLAIN
    assert info["counts"]["by_action"]["review"] == N_PLAIN
    assert "!! HELD by the flood guard" in summary(info)
    assert F.read_run(open_store(str(tmp_path / "flags")), DAY)["flood_guard"]["held_rows"] == N_PLAIN
    text = (tmp_path / "textfile" / "modscan.prom").read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    val = lambda name, **lab: next(s.value for s in fams[name].samples if all(s.labels.get(k) == v for k, v in lab.items()))
    assert val("modscan_run_images") == N_PLAIN + 7
    assert val("modscan_run_rows_by_action", action="review") == N_PLAIN
    assert val("modscan_run_error_rows", error_code="truncated") == 1
    assert val("modscan_run_matches", bank="violence") == N_PLAIN + 1
    assert val("modscan_run_held_references") == 1
    assert val("modscan_last_success_partition_timestamp_seconds") == 1775088000.0  # 2026-04-02T00:00Z
    assert gw.requests == [("PUT", "/metrics/job/modscan", text)]
    assert info["metrics"]["textfile"].endswith("modscan.prom")

