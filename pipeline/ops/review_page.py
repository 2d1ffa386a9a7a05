"""A self-contained HTML review page per run for moderators: upload beside its matched reference.

Thumbnails are embedded as ``data:`` URIs, so the page is a single file written under
``<output>/_reviews/dt=D/`` whatever the object keys look like: a key can never make the report
write or link outside its folder, and every string on the page is HTML-escaped.

Reviewer safety (as Discourse and Mastodon do for moderators): thumbnails of matches in banks whose
category starts with ``sensitive/`` are blurred and greyed by default; a click reveals one. The
reveal is a CSS checkbox, not script, so it works with JavaScript off, and the page loads nothing
from the network (no external CSS, fonts or images). Matches are grouped by reference with their
counts, so one reference matching hundreds of uploads is one line, not the whole page, and
references held by the flood guard (:mod:`pipeline.moderation.floodguard`) get a banner at the top.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any

import pandas as pd
from PIL import Image

from pipeline.errors import plain_message
from pipeline.ingest.decode import DecodeConfig, DecodeError, open_image
from pipeline.ingest.storage import Store, open_store, redact, resolve_key, split_uri
from pipeline.moderation.flags import partition_key

log = logging.getLogger(__name__)

THUMB = 160
SENSITIVE_PREFIX = "sensitive/"
GROUP_EXAMPLES = 6  # uploads shown per reference group
CSS = f"""body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}img{{max-width:{THUMB}px;max-height:{THUMB}px}}
.err{{color:#b00}}.held{{background:#b00;color:#fff;padding:1em;font-size:1.2em;border:4px solid #600}}
.held code{{color:#fff}}.ex{{display:inline-block;margin:2px;text-align:center;font-size:.8em}}
.sens{{position:relative;display:inline-block;overflow:hidden;cursor:pointer;line-height:0}}
.sens input{{position:absolute;opacity:0;width:0;height:0}}
.sens img{{filter:blur(14px) grayscale(1)}}.sens input:checked~img{{filter:none}}
.sens .veil{{position:absolute;inset:0;display:flex;align-items:center;justify-content:center;text-align:center;
line-height:1.2;font-size:.8em;color:#fff;background:rgba(0,0,0,.35)}}.sens input:checked~.veil{{display:none}}"""


def is_sensitive(category: object) -> bool:
    return isinstance(category, str) and category.startswith(SENSITIVE_PREFIX)


def _thumb(data: bytes, sensitive: bool = False) -> str:
    """An embedded JPEG thumbnail; ``sensitive`` ones are blurred and greyed until clicked."""
    try:
        im = open_image(data, DecodeConfig(high_res=THUMB))
    except DecodeError as e:
        return f"<span class=err>{html.escape(e.code.value)}</span>"
    im.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    img = f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    if not sensitive:
        return img
    return (f'<label class="sens" title="sensitive: click to reveal"><input type="checkbox">{img}'
            f'<span class="veil">sensitive<br>click to reveal</span></label>')


# S3 buckets that failed a thumbnail read with something other than "no such object" while the
# current page is written: they are not tried again (reset by write_review)
UNREACHABLE_BUCKETS: set[str] = set()
THUMB_S3_RETRIES = 2  # a thumbnail is worth a short wait, not a job's 8 retries per object


def read_source(uri: str) -> bytes | None:
    """The object's bytes, or None (the page says "unreadable"; the log says why). A bucket that
    fails once for another reason than a missing object (unreachable endpoint, no credentials,
    access denied) is not tried again for the rest of the page, so a gallery whose references live
    where this node cannot reach costs the page one timeout, not one per thumbnail."""
    bucket = uri[len("s3://"):].split("/", 1)[0] if uri.startswith("s3://") else ""
    if bucket in UNREACHABLE_BUCKETS:
        return None
    try:
        st, name = split_uri(uri, retries=THUMB_S3_RETRIES)
        return st.read_bytes(name)
    except Exception as e:
        if bucket and not isinstance(e, FileNotFoundError):
            UNREACHABLE_BUCKETS.add(bucket)
            log.warning("review page: s3://%s cannot be read (%s); its other thumbnails are skipped", bucket,
                        plain_message(e, 300))
        else:
            log.warning("review page: %s cannot be read for a thumbnail: %s", redact(uri), plain_message(e, 300))
        return None


def _input_uri(input_uri: str, key: str) -> str:
    if input_uri.lower().endswith((".parquet", ".csv")):
        return resolve_key(input_uri, key)
    return input_uri.rstrip("/") + "/" + key


def _held_banner(matched: pd.DataFrame) -> str:
    """A loud banner naming every reference the flood guard held (rows with action = review)."""
    held = matched[matched["action"] == "review"]
    if held.empty:
        return ""
    items = []
    for rid, g in held.groupby("reference_id", sort=False):
        reason = g["reason"].dropna().iloc[0] if "reason" in g and g["reason"].notna().any() else ""
        items.append(f"<li>reference <code>#{int(rid)}</code> ({html.escape(str(g['bank'].iloc[0]))}): "
                     f"<b>{len(g)}</b> uploads held &mdash; {html.escape(str(reason))}</li>")
    return (f'<div class="held"><b>&#9888; {held["reference_id"].nunique()} reference(s) HELD by the flood guard: '
            f'{len(held)} uploads were NOT filtered or down-ranked and wait for review.</b>'
            f'<ul>{"".join(items)}</ul>Check the reference; if it is over-broad, disable it with '
            f'<code>modscan review apply</code>.</div>')


def _score(r: Any) -> str:
    """A match's fine score and how it was confirmed (the flag row's ``match_rule`` / ``inliers``)."""
    out = "-" if r.fine_score is None or pd.isna(r.fine_score) else f"{float(r.fine_score):.3f}"
    rule = getattr(r, "match_rule", None)
    inl = getattr(r, "inliers", None)
    if rule == "verified" and inl is not None and not pd.isna(inl):
        out += f" &middot; {int(inl)} inliers"
    elif isinstance(rule, str) and rule != "fine":
        out += f" &middot; {html.escape(rule)}"
    return out


def _groups_html(matched: pd.DataFrame, src: dict, input_uri: str, max_groups: int) -> str:
    """One table row per matched reference, busiest first: its thumbnail, bank, how many uploads
    matched it (by action) and the best few of them."""
    if matched.empty:
        return "<tr><td colspan=4>none</td></tr>"
    out_rows = []
    groups = sorted(matched.groupby("reference_id", sort=False), key=lambda kv: (-len(kv[1]), kv[0]))
    for rid, g in groups[:max_groups]:
        cat = g["category"].iloc[0]
        sens = is_sensitive(cat)
        ref_uri = src.get(int(rid))
        ref = read_source(ref_uri) if ref_uri else None
        actions = ", ".join(f"{a} {n}" for a, n in g["action"].value_counts().items())
        ex = []
        for r in g.sort_values("fine_score", ascending=False).head(GROUP_EXAMPLES).itertuples():
            q = read_source(_input_uri(input_uri, r.image_key))
            ex.append(f'<span class="ex">{_thumb(q, sens) if q else "<span class=err>unreadable</span>"}<br>'
                      f'{_score(r)} <code>{html.escape(str(r.image_key))}</code></span>')
        out_rows.append(
            f"<tr><td>{_thumb(ref, sens) if ref else '<span class=err>reference unavailable</span>'}"
            f"<br><small>ref #{int(rid)}</small></td><td>{html.escape(str(g['bank'].iloc[0]))}<br>"
            f"<small>{html.escape(str(cat))}</small></td><td><b>{len(g)}</b><br><small>{html.escape(actions)}</small></td>"
            f"<td>{''.join(ex)}{'<br>&hellip;' if len(g) > GROUP_EXAMPLES else ''}</td></tr>")
    if len(groups) > max_groups:
        out_rows.append(f"<tr><td colspan=4>{len(groups) - max_groups} more references not shown</td></tr>")
    return "\n".join(out_rows)


def _waves_html(out: Store, dt: str, df: pd.DataFrame, max_waves: int) -> str:
    """The Waves section, when the partition's waves are committed (``modscan waves``,
    docs/waves.md): one row per wave, biggest first: its first upload, its size, how its members
    were flagged, a sample of them and the command that banks it. A wave with a member matched in
    a sensitive bank has every thumbnail blurred."""
    from pipeline.moderation.wave_output import read_run_info, read_waves, waves_root

    root = waves_root(out.uri)
    if read_run_info(root, dt) is None:
        return ""
    w = read_waves(root, dt)
    w = w[w["wave"]]
    sens_keys = set(df.loc[df["category"].map(is_sensitive), "image_key"])
    action = df.set_index("image_key")["action"]
    groups = sorted(w.groupby("dup_cluster_id"), key=lambda kv: (-len(kv[1]), kv[0]))
    rows = []
    for cid, g in groups[:max_waves]:
        g = g.sort_values("dup_rank")
        sens = bool(sens_keys & set(g["image_key"]))
        thumb = lambda r, sens=sens: (_thumb(b, sens) if (b := read_source(str(r["image_uri"])))
                                      else "<span class=err>unreadable</span>")
        acts = ", ".join(f"{a} {n}" for a, n in action.reindex(g["image_key"]).value_counts().items())
        ex = "".join(f'<span class="ex">{thumb(r)}<br><code>{html.escape(str(r["image_key"]))}</code></span>'
                     for _, r in g.iloc[1:1 + GROUP_EXAMPLES].iterrows())
        first = g.iloc[0]
        rows.append(f'<tr class="wave"><td>{thumb(first)}<br><small>first: <code>{html.escape(str(first["image_key"]))}'
                    f'</code></small></td><td><b>{len(g)}</b> uploads<br><small>wave <code>{html.escape(str(cid))}</code>'
                    f'<br>{html.escape(acts)}</small></td><td>{ex}{"<br>&hellip;" if len(g) > GROUP_EXAMPLES + 1 else ""}'
                    f'</td><td><small><code>modscan gallery add GALLERY --bank BANK --from-wave {html.escape(str(cid))} '
                    f'--flags OUTPUT --date {html.escape(dt.split("T")[0])}</code></small></td></tr>')
    if len(groups) > max_waves:
        rows.append(f"<tr><td colspan=4>{len(groups) - max_waves} more waves not shown</td></tr>")
    return (f'<h2>Waves ({len(groups)} clusters of near-duplicate uploads, {len(w)} uploads)</h2>'
            f'<table><tr><th>first upload</th><th>size</th><th>other members</th><th>bank it</th></tr>'
            f'{"".join(rows) or "<tr><td colspan=4>none</td></tr>"}</table>')


def _reference_uris(gstore: Store, m: Any, reference_ids: pd.Series) -> dict[int, str]:
    """id -> source URI of the references the page shows, read from the version's entries with
    only those ids (row groups pruned by their statistics): a page never loads a gallery of
    millions to show a few hundred thumbnails."""
    import pyarrow.parquet as pq

    ids = sorted({int(x) for x in reference_ids.dropna()})
    if not ids:
        return {}
    t = pq.read_table(gstore.path(f"versions/{m.version}/{m.entries.file}"), filesystem=gstore.fs,
                      columns=["id", "source_uri"], filters=[("id", "in", ids)])
    return dict(zip(t.column("id").to_pylist(), t.column("source_uri").to_pylist()))


def write_review(out: Store, dt: str, run_id: str, input_uri: str, gallery_uri: str, max_rows: int = 200,
                 gallery_version: str | None = None) -> str:
    """Write ``_reviews/dt=D/review-<run_id>.html``; returns its URI. ``gallery_version`` is the
    run's pinned version (default: ``CURRENT``, which may have moved on since the run started)."""
    from pipeline.gallery import read_manifest
    from pipeline.moderation.flags import read_flags

    UNREACHABLE_BUCKETS.clear()
    df = read_flags(out.uri, dt)
    matched = df[df["status"] == "matched"]
    flagged = matched.sort_values("fine_score", ascending=False).head(max_rows)
    allowed = df[(df["status"] == "clean") & df["bank"].notna()].head(max_rows // 4)
    errors = df[df["status"] == "error"]
    gstore = open_store(gallery_uri)
    m = read_manifest(gstore, gallery_version)
    src = _reference_uris(gstore, m, df["reference_id"])

    def rows(frame: pd.DataFrame) -> str:
        out_rows = []
        for r in frame.itertuples():
            q = read_source(_input_uri(input_uri, r.image_key))
            ref_uri = src.get(int(r.reference_id)) if pd.notna(r.reference_id) else None
            ref = read_source(ref_uri) if ref_uri else None
            sens = is_sensitive(r.category)
            out_rows.append(
                "<tr><td>{q}</td><td>{ref}</td><td><b>{action}</b><br>{bank}<br><small>{cat}</small></td>"
                "<td>fine {fine:.3f}<br>coarse {coarse:.3f}</td><td><code>{key}</code><br><small>ref #{rid}</small></td></tr>".format(
                    q=_thumb(q, sens) if q else "<span class=err>unreadable</span>",
                    ref=_thumb(ref, sens) if ref else "<span class=err>reference unavailable</span>",
                    action=html.escape(str(r.action)), bank=html.escape(str(r.bank)), cat=html.escape(str(r.category)),
                    fine=float(r.fine_score) if pd.notna(r.fine_score) else float("nan"),
                    coarse=float(r.coarse_score) if pd.notna(r.coarse_score) else float("nan"),
                    key=html.escape(str(r.image_key)), rid=int(r.reference_id) if pd.notna(r.reference_id) else "-"))
        return "\n".join(out_rows) or "<tr><td colspan=5>none</td></tr>"

    err_rows = "\n".join(f"<tr><td><code>{html.escape(str(r.image_key))}</code></td><td>{html.escape(str(r.error_code))}</td>"
                         f"<td>{html.escape(redact(plain_message(str(r.error_message))))}</td></tr>" for r in errors.head(max_rows).itertuples())
    counts = df["status"].value_counts().to_dict()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>modscan review {html.escape(dt)}</title>
<style>{CSS}</style></head><body>
<h1>modscan review: dt={html.escape(dt)}</h1>
<p>run <code>{html.escape(run_id)}</code>; model <code>{html.escape(str(df['model_version'].iloc[0]) if len(df) else '-')}</code>;
gallery <code>{html.escape(m.version)}</code>; rows: {html.escape(str(counts))}</p>
{_held_banner(matched)}
{_waves_html(out, dt, df, max(1, max_rows // 4))}
<h2>Matches by reference ({matched['reference_id'].nunique()} references, {len(matched)} uploads)</h2>
<table><tr><th>reference</th><th>bank</th><th>uploads</th><th>best matches (fine score)</th></tr>
{_groups_html(matched, src, input_uri, max(1, max_rows // 4))}</table>
<h2>Flagged ({len(df[df['status'] == 'matched'])}, best {len(flagged)} shown)</h2>
<table><tr><th>upload</th><th>matched reference</th><th>action / bank</th><th>scores</th><th>key</th></tr>{rows(flagged)}</table>
<h2>Suppressed by an allow-list ({len(allowed)} shown)</h2>
<table><tr><th>upload</th><th>allow-list reference</th><th>bank</th><th>scores</th><th>key</th></tr>{rows(allowed)}</table>
<h2>Errors ({len(errors)})</h2><table><tr><th>key</th><th>code</th><th>message</th></tr>{err_rows}</table>
</body></html>"""
    key = f"_reviews/{partition_key(dt)}/review-{run_id}.html"
    out.write_text(key, page)
    return out.full_uri(key)
