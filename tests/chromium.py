"""Headless Chromium for the tests that look at a rendered review page (``pipeline/ops/test_review_page.py``
and the Waves section in ``pipeline/moderation/test_waves.py``): ``CHROMIUM`` (``None`` where it is not
installed: those tests skip) and :func:`screenshot`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_path: Path, png: Path, size: tuple[int, int] = (1280, 1400)) -> Image.Image:
    """Render a local HTML file with headless Chromium, with a dead proxy so nothing could load from the
    network, and return the screenshot."""
    profile = png.parent / f".profile-{png.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--proxy-server=http://127.0.0.1:9", f"--window-size={size[0]},{size[1]}",
           f"--screenshot={png}", html_path.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return Image.open(png).convert("RGB")
