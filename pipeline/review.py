"""A self-contained HTML review page per run for moderators: upload beside its matched reference.

Thumbnails are embedded as ``data:`` URIs, so the page is a single file written under
``<output>/_reviews/dt=D/`` whatever the object keys look like: a key can never make the report
write or link outside its folder, and every string on the page is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import pandas as pd
from PIL import Image

from pipeline.decode import DecodeConfig, DecodeError, open_image
from pipeline.flags import partition_key
from pipeline.storage import Store, open_store, redact, split_uri

THUMB = 160


def _thumb(data: bytes) -> str:
    try:
        im = open_image(data, DecodeConfig(high_res=THUMB))
    except DecodeError as e:
        return f"<span class=err>{html.escape(e.code.value)}</span>"
    im.thumbnail((THUMB, THUMB), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _read(uri: str) -> bytes | None:
    try:
        st, name = split_uri(uri)
        return st.read_bytes(name)
    except Exception:  # noqa: BLE001 - a missing thumbnail must not break the page
        return None


def _input_uri(input_uri: str, key: str) -> str:
    if input_uri.lower().endswith((".parquet", ".csv")):
        from jobs.moderate import resolve_key

        return resolve_key(input_uri, key)
    return input_uri.rstrip("/") + "/" + key


def write_review(out: Store, dt: str, run_id: str, input_uri: str, gallery_uri: str, max_rows: int = 200) -> str:
    """Write ``_reviews/dt=D/review-<run_id>.html``; returns its URI."""
    from pipeline.flags import read_flags
    from pipeline.gallery import read_manifest

    df = read_flags(out.uri, dt)
    flagged = df[df["status"] == "matched"].sort_values("fine_score", ascending=False).head(max_rows)
    allowed = df[(df["status"] == "clean") & df["bank"].notna()].head(max_rows // 4)
    errors = df[df["status"] == "error"]
    gstore = open_store(gallery_uri)
    m = read_manifest(gstore)
    import pyarrow.parquet as pq

    entries = pq.read_table(gstore.path(f"versions/{m['version']}/entries.parquet"), filesystem=gstore.fs).to_pandas()
    src = entries.drop_duplicates("id").set_index("id")["source_uri"].to_dict()

    def rows(frame: pd.DataFrame) -> str:
        out_rows = []
        for r in frame.itertuples():
            q = _read(_input_uri(input_uri, r.image_key))
            ref_uri = src.get(int(r.reference_id)) if pd.notna(r.reference_id) else None
            ref = _read(ref_uri) if ref_uri else None
            out_rows.append(
                "<tr><td>{q}</td><td>{ref}</td><td><b>{action}</b><br>{bank}<br><small>{cat}</small></td>"
                "<td>fine {fine:.3f}<br>coarse {coarse:.3f}</td><td><code>{key}</code><br><small>ref #{rid}</small></td></tr>".format(
                    q=_thumb(q) if q else "<span class=err>unreadable</span>",
                    ref=_thumb(ref) if ref else "<span class=err>reference unavailable</span>",
                    action=html.escape(str(r.action)), bank=html.escape(str(r.bank)), cat=html.escape(str(r.category)),
                    fine=float(r.fine_score) if pd.notna(r.fine_score) else float("nan"),
                    coarse=float(r.coarse_score) if pd.notna(r.coarse_score) else float("nan"),
                    key=html.escape(str(r.image_key)), rid=html.escape(str(r.reference_id))))
        return "\n".join(out_rows) or "<tr><td colspan=5>none</td></tr>"

    err_rows = "\n".join(f"<tr><td><code>{html.escape(str(r.image_key))}</code></td><td>{html.escape(str(r.error_code))}</td>"
                         f"<td>{html.escape(redact(str(r.error_message)))}</td></tr>" for r in errors.head(max_rows).itertuples())
    counts = df["status"].value_counts().to_dict()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>modscan review {html.escape(dt)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}
img{{max-width:{THUMB}px;max-height:{THUMB}px}}.err{{color:#b00}}</style></head><body>
<h1>modscan review: dt={html.escape(dt)}</h1>
<p>run <code>{html.escape(run_id)}</code>; model <code>{html.escape(str(df['model_version'].iloc[0]) if len(df) else '-')}</code>;
gallery <code>{html.escape(m['version'])}</code>; rows: {html.escape(str(counts))}</p>
<h2>Flagged ({len(df[df['status'] == 'matched'])}, best {len(flagged)} shown)</h2>
<table><tr><th>upload</th><th>matched reference</th><th>action / bank</th><th>scores</th><th>key</th></tr>{rows(flagged)}</table>
<h2>Suppressed by an allow-list ({len(allowed)} shown)</h2>
<table><tr><th>upload</th><th>allow-list reference</th><th>bank</th><th>scores</th><th>key</th></tr>{rows(allowed)}</table>
<h2>Errors ({len(errors)})</h2><table><tr><th>key</th><th>code</th><th>message</th></tr>{err_rows}</table>
</body></html>"""
    key = f"_reviews/{partition_key(dt)}/review-{run_id}.html"
    out.write_text(key, page)
    return out.full_uri(key)
