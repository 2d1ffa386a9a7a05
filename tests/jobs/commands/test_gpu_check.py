"""``modscan gpu-check`` is importable and, without a CUDA device, reports that and exits 1."""

from __future__ import annotations

import pytest


def test_gpu_check_without_cuda(capsys, tmp_path):
    import torch

    from jobs.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full check is run by hand (see jobs/commands/gpu_check.py)")
    assert main(["gpu-check", "--out", str(tmp_path / "gpu_check.json")]) == 1
    assert "no CUDA device: nothing to check" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.json").exists()
