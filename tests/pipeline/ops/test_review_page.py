"""pipeline/ops/review_page.py: the reviewer-safe review page of a committed, flood-guarded run
(grouped by reference, sensitive thumbnails blurred until clicked, offline), rendered by headless
Chromium where it is installed (the shared world of ``operator_world.py``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from chromium import CHROMIUM, screenshot
from operator_world import DAY, N_PLAIN
from PIL import Image


def _page_html(committed) -> str:
    return committed["out"].read_text(f"_reviews/dt={DAY}/review-{committed['run_id']}.html")


def test_review_page_groups_by_reference_blurs_sensitive_and_shouts_about_held(ops_world, committed) -> None:

    page = _page_html(committed)
    ref = ops_world["ref"]
    assert 'class="held"' in page and "HELD by the flood guard" in page
    assert f"reference <code>#{ref['plain-gradient']}</code> (violence): <b>{N_PLAIN}</b> uploads held" in page
    # grouped by reference, busiest first, with counts
    groups = re.findall(r"ref #(\d+)</small></td><td>([a-z]+)<br><small>[^<]*</small></td><td><b>(\d+)</b>", page)
    assert groups[0] == (str(ref["plain-gradient"]), "violence", str(N_PLAIN))
    assert (str(ref["rocket"]), "violence", "1") in groups and (str(ref["chelsea"]), "spam", "1") in groups
    # sensitive thumbnails are wrapped in the click-to-reveal blur; spam ones are not
    spam_row = next(r for r in page.split("<tr>") if f"ref #{ref['chelsea']}</small>" in r)
    rocket_row = next(r for r in page.split("<tr>") if f"ref #{ref['rocket']}</small>" in r)
    assert 'class="sens"' in rocket_row and 'class="sens"' not in spam_row
    assert "filter:blur(14px) grayscale(1)" in page and "input:checked~img{filter:none}" in page
    # offline: nothing fetched from anywhere, every image inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "url(" not in page
    assert page.count('src="data:image/jpeg;base64,') >= N_PLAIN


def _reveal_stats(blurred: Image.Image, revealed: Image.Image) -> dict[str, float]:
    """Compare two screenshots of the same page where they differ (the sensitive thumbnails):
    area share and colour spread (max - min channel) in each."""
    b, r = (np.asarray(im, np.int16) for im in (blurred, revealed))
    diff = np.abs(b - r).max(axis=2) > 16
    spread = lambda a: float((a.max(axis=2) - a.min(axis=2))[diff].mean())
    return {"area": float(diff.mean()), "spread_blurred": spread(b), "spread_revealed": spread(r)}


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: apt-get install chromium)")
def test_review_page_in_headless_chromium_is_blurred_until_clicked(committed, tmp_path) -> None:
    page = _page_html(committed)
    blurred_html, revealed_html = tmp_path / "review.html", tmp_path / "revealed.html"
    blurred_html.write_text(page)
    # the state after clicking every sensitive thumbnail: each reveal checkbox ticked
    revealed_html.write_text(page.replace('<input type="checkbox">', '<input type="checkbox" checked>'))
    blurred = screenshot(blurred_html, tmp_path / "blurred.png")
    revealed = screenshot(revealed_html, tmp_path / "revealed.png")
    st = _reveal_stats(blurred, revealed)
    # a click changes a good part of the page: the sensitive thumbnails (the spam cat is the same in both)
    assert st["area"] > 0.05, st
    # by default the browser shows them grey (the blur and the grey come from the same CSS rule);
    # ticked, in colour
    assert st["spread_blurred"] < 2 and st["spread_revealed"] > 5, st


def test_a_thumbnail_bucket_that_fails_is_tried_once_per_page(monkeypatch) -> None:
    """References whose bucket this node cannot read (here an endpoint answering 500 to everything)
    cost the page one bucket's retries, not one per thumbnail: the job never hangs on its page."""
    import http.server
    import threading

    from pipeline.ops import review_page as R

    hits = []

    class Broken(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            hits.append(self.path)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _fail

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    try:
        R.UNREACHABLE_BUCKETS.clear()
        assert R.read_source("s3://refs/synthetic/00000001.jpg") is None
        first = len(hits)
        assert 1 <= first <= R.THUMB_S3_RETRIES + 1 and R.UNREACHABLE_BUCKETS == {"refs"}
        assert all(R.read_source(f"s3://refs/synthetic/{i:08d}.jpg") is None for i in range(2, 20))
        assert len(hits) == first  # the bucket was not asked again
    finally:
        srv.shutdown()
        R.UNREACHABLE_BUCKETS.clear()
