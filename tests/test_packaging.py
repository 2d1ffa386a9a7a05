"""A plain `pip install .` (the Docker image) ships every package of the source tree and the model."""

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_installed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(find_packages(str(ROOT), include=cfg["packages"]["find"]["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("models", "pipeline", "jobs")
               for p in (ROOT / top).rglob("__init__.py")}
    assert "pipeline.gallery" in on_disk
    assert on_disk <= shipped, sorted(on_disk - shipped)
    assert {"default/*.json", "default/*.safetensors"} <= set(cfg["package-data"]["models"])


def test_the_commands_import_no_test_helper() -> None:
    """moto (the ``test`` and ``bench`` extras) is imported by the tests and by the S3 run of
    ``modscan bench pipeline`` only, never by importing the commands."""
    import subprocess
    import sys

    code = ("import sys, jobs.cli, jobs.runtime.run, jobs.commands.moderate_cmd, jobs.commands.gallery_cmd, jobs.bench.search, jobs.bench.memory, "
            "jobs.bench.decode, jobs.bench.pipeline, jobs.bench.baseline; print('moto' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
