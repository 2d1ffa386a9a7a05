"""models/card.py: the model on disk, its checksums and its background bank."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer

from models.card import ModelIntegrityError, load_model


def test_tampered_background_bank_fails_with_a_clear_message(tmp_path, gen_images) -> None:
    from models.card import load_background

    tr = tiny_trainer(tmp_path / "run", gen_images)
    tr.run()
    p = tmp_path / "run" / "background.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        load_background(tmp_path / "run")


def test_safetensors_round_trip_reproduces_outputs(tiny_model_dir) -> None:
    m1, card = load_model(tiny_model_dir)
    m2, _ = load_model(tiny_model_dir)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = m1.gallery_features(x), m2.gallery_features(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert card.version_id.startswith("resnet18-64x48-")


def test_tampered_weights_fail_with_a_clear_message(tiny_model_dir, tmp_path, capsys) -> None:
    import shutil

    from jobs.cli import main

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        load_model(d)
    assert main(["card", "--model", str(d)]) == 1  # a ModscanError: the user reads its message, on one line
    err = capsys.readouterr().err
    assert err.startswith("modscan card: error: checksum mismatch for ") and err.count("\n") == 1, err


def test_a_folder_without_a_model_card_is_a_usage_error(tmp_path, capsys) -> None:
    from jobs.cli import main
    from models.card import read_card
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="no model card at") as e:
        read_card(tmp_path)
    assert isinstance(e.value, FileNotFoundError)  # what callers that catch one still get
    assert main(["card", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modscan card: error: no model card at ") and err.count("\n") == 1, err
