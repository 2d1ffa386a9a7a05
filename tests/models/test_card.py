"""models/card.py: the model on disk, its checksums and its background bank."""

from __future__ import annotations

import pytest
import torch

from models.card import ModelIntegrityError, load_model


def test_tampered_background_bank_fails_with_a_clear_message(tmp_path, tiny_model_dir) -> None:
    """A model saved with a background bank (as training saves it: save_model) loads it; one byte
    changed in the bank is refused. (A bank made by real training: test_descriptor.py's full run.)"""
    from models.card import load_background, save_model

    model, card = load_model(tiny_model_dir)
    unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(d)), dim=1)
    save_model(model, tmp_path / "run", card, background={"f512": unit(7, 512), "f128": unit(7, 128),
                                                           "kind": ["photo"] * 4 + ["chart"] * 3})
    bank = load_background(tmp_path / "run")
    assert bank is not None and bank.f512.shape == (7, 512) and bank.kind.count("chart") == 3
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
