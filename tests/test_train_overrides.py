"""``modscan train --set key=value``: values take their field's declared type; bad ones are refused."""

import pytest

from models.descriptor import Backbone
from models.train import TrainConfig, parse_overrides


def test_values_take_the_declared_field_type():
    model_over, train_over = parse_overrides(
        ["low_res=128", "epochs_backbone=4", "lr_backbone=5e-4", "init_from=runs/r1-model",
         "max_images=none", "backbone=resnet18", "lr_adapter=1", "device=cpu"])
    assert model_over == {"low_res": 128, "backbone": Backbone.RESNET18}
    assert train_over == {"epochs_backbone": 4, "lr_backbone": 5e-4, "init_from": "runs/r1-model",
                          "max_images": None, "lr_adapter": 1.0, "device": "cpu"}
    # a float field given an integer literal is a float, a str field given digits stays a str
    assert isinstance(train_over["lr_adapter"], float)
    _, t = parse_overrides(["init_from=123"])
    assert t == {"init_from": "123"}
    cfg = TrainConfig(**train_over)
    assert cfg.epochs_backbone == 4 and cfg.max_images is None


@pytest.mark.parametrize("pair, message", [
    ("epochs_backbone=4.5", "--set epochs_backbone=4.5: expected an integer"),
    ("lr_backbone=fast", "--set lr_backbone=fast: expected a number"),
    ("backbone=vgg", "--set backbone=vgg: expected one of ['efficientnet_lite0', 'resnet18'"),
    ("epoch_backbone=4", "--set epoch_backbone: unknown key"),
    ("epochs_backbone", "--set epochs_backbone: expected key=value"),
])
def test_bad_values_are_refused_with_the_key(pair, message):
    with pytest.raises(ValueError) as e:
        parse_overrides([pair])
    assert message in str(e.value)


@pytest.mark.parametrize("pair", ["epochs_backbone=4.5", "epoch_backbone=4", "epochs_backbone"])
def test_a_bad_set_is_a_usage_error_of_the_cli(pair, tmp_path, capsys):
    from jobs.cli import main

    assert main(["train", "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--set", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modscan train: error: --set ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before any work
