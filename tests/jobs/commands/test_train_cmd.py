"""``modscan train --set key=value`` (jobs/commands/train_cmd.py): values take their field's declared type,
old names of renamed settings are read under their new ones; bad ones are refused (exit 2)."""

import pytest

from jobs.commands.train_cmd import parse_overrides
from models.descriptor import Backbone
from models.training import Adapter1Init, TrainConfig
from pipeline.errors import UsageError


def test_values_take_the_declared_field_type():
    model_over, train_over = parse_overrides(
        ["low_res=128", "epochs_backbone=4", "lr_backbone=5e-4", "init_from=runs/r1-model",
         "max_images=none", "backbone=resnet18", "lr_adapter2=1", "device=cpu"])
    assert model_over == {"low_res": 128, "backbone": Backbone.RESNET18}
    assert train_over == {"epochs_backbone": 4, "lr_backbone": 5e-4, "init_from": "runs/r1-model",
                          "max_images": None, "lr_adapter2": 1.0, "device": "cpu"}
    # a float field given an integer literal is a float, a str field given digits stays a str
    assert isinstance(train_over["lr_adapter2"], float)
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
    ("adapter1_init=pcaa", "--set adapter1_init=pcaa: expected one of ['auto', 'pca', 'whiten', 'random']"),
    ("precision=fp16", "--set precision=fp16: expected one of ['auto', 'bf16', 'fp32']"),
])
def test_bad_values_are_refused_with_the_key(pair, message):
    with pytest.raises(UsageError) as e:
        parse_overrides([pair])
    assert message in str(e.value)


@pytest.mark.parametrize("pair", ["epochs_backbone=4.5", "epoch_backbone=4", "epochs_backbone"])
def test_a_bad_set_is_a_usage_error_of_the_cli(pair, tmp_path, capsys):
    from jobs.cli import main

    assert main(["train", "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--set", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modscan train: error: --set ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_old_names_of_renamed_settings_are_read_under_their_new_names():
    """A run started with ``batch_size_adapter2`` / ``lr_adapter`` resumes with the same command."""
    _, t = parse_overrides(["batch_size_adapter2=128", "lr_adapter=0.01", "adapter1_init=pca"])
    assert t == {"batch_size_adapters": 128, "lr_adapter2": 0.01, "adapter1_init": Adapter1Init.PCA}
    with pytest.raises(UsageError, match="--set lr_adapter: the old name of lr_adapter2"):
        parse_overrides(["lr_adapter2=0.01", "lr_adapter=0.02"])


@pytest.mark.parametrize("pair, message", [
    ("cache_views=0", "cache_views must be >= 1, got 0"),
    ("low_res=300", "need 32 <= low_res <= high_res"),
])
def test_a_value_the_config_refuses_is_a_usage_error_before_any_work(pair, message, tmp_path, capsys):
    from jobs.cli import main

    assert main(["train", "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--set", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modscan train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
