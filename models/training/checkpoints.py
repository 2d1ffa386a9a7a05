"""What a run keeps in its output folder to be resumed and compared: ``checkpoints/`` (one file per
finished stage, stage 1 after every epoch, the adapters' feature cache) and ``train_log.jsonl``.

Checkpoints are tensors only, written atomically and loaded with ``torch.load(weights_only=True)``:
nothing executable. A checkpoint is named after its :class:`~models.training.config.Stage`
(``backbone.pt``, ``backbone_best.pt``, ``adapter1.pt``, ``adapter2.pt``); the names an older
version wrote (``stage1.pt``, ``stage1_best.pt``, ``stage2.pt``, ``stage3.pt``) are still read, so a
run started before the rename resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.training.config import Stage

BEST_BACKBONE = "backbone_best.pt"  # stage 1's best epoch by the monitor
# current name -> the name an older version wrote for the same checkpoint
LEGACY_NAMES = {"backbone.pt": "stage1.pt", BEST_BACKBONE: "stage1_best.pt",
                "adapter1.pt": "stage2.pt", "adapter2.pt": "stage3.pt"}


def checkpoint_name(stage: Stage) -> str:
    """The checkpoint of a finished (or, for stage 1, an ongoing) stage."""
    return f"{stage.value}.pt"


class Checkpoints:
    """The run's ``checkpoints/`` folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def find(self, name: str) -> Path | None:
        """The file to read for ``name``: itself, else what an older version named it, else None."""
        for candidate in (name, LEGACY_NAMES.get(name)):
            if candidate is not None and (self.folder / candidate).exists():
                return self.folder / candidate
        return None

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def save(self, name: str, payload: dict[str, Any]) -> None:
        """Write ``payload`` (tensors, numbers, strings) to ``name``, atomically."""
        tmp = self.folder / f".{name}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.folder / name)

    def load(self, name: str) -> dict[str, Any] | None:
        """``name`` (or its legacy file) on the CPU, tensors only; None when there is none."""
        p = self.find(name)
        return torch.load(p, map_location="cpu", weights_only=True) if p is not None else None


class TrainLog:
    """``train_log.jsonl``: one JSON line per record, ``{"time", "stage", ...}``, appended (a
    resumed run continues the same file) and echoed above the progress bars."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, stage: Stage | str, **rec: Any) -> None:
        tag = stage.value if isinstance(stage, Stage) else stage
        line = json.dumps({"time": round(time.time(), 1), "stage": tag, **rec})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        tqdm.write(line)
