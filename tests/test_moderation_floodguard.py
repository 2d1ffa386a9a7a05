"""pipeline/moderation/floodguard.py on hash-list matches: a list entry that matches more uploads
than the limit is held like a reference (real staged Parquet files, read back after the rewrite)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq

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
