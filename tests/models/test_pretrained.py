"""models/pretrained.py: the ImageNet import of the Lite0 trunk (key map, checks, classification)."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_dir
from PIL import Image

from models.descriptor import MEAN, STD
from models.efficientnet import EfficientNetLite0
from models.pretrained import (
    WHEEL_SHA256,
    PretrainedWeightsError,
    block_names,
    classify,
    imagenet_top1,
    load_lite0_imagenet,
    map_key,
    map_state_dict,
    wheel_weights_path,
)


@pytest.fixture(scope="module")
def imported() -> tuple[EfficientNetLite0, dict[str, torch.Tensor]]:
    trunk = EfficientNetLite0(MEAN, STD)
    head, init = load_lite0_imagenet(trunk)
    assert init.sha256 == WHEEL_SHA256 and init.licence == "Apache-2.0" and init.version == "0.1.0"
    return trunk.eval(), head


def test_key_map_follows_the_stage_layout() -> None:
    blocks = block_names()
    assert len(blocks) == 16 and blocks[0] == "blocks.0.0" and blocks[-1] == "blocks.6.0"
    assert map_key("_blocks.0._depthwise_conv.weight", blocks) == "blocks.0.0.conv_dw.weight"
    assert map_key("_blocks.0._bn2.running_mean", blocks) == "blocks.0.0.bn2.running_mean"
    assert map_key("_blocks.3._expand_conv.weight", blocks) == "blocks.2.0.conv_pw.weight"
    assert map_key("_blocks.4._project_conv.weight", blocks) == "blocks.2.1.conv_pwl.weight"
    assert map_key("_blocks.15._bn2.bias", blocks) == "blocks.6.0.bn3.bias"
    assert map_key("_bn1.weight", blocks) == "bn2.weight" and map_key("_fc.bias", blocks) == "classifier.bias"
    with pytest.raises(PretrainedWeightsError, match="squeeze-excitation"):
        map_key("_blocks.2._se_reduce.weight", blocks)
    with pytest.raises(PretrainedWeightsError, match="beyond"):
        map_key("_blocks.16._bn0.weight", blocks)


def test_the_import_refuses_a_wrong_shape_or_a_missing_key() -> None:
    trunk = EfficientNetLite0(MEAN, STD)
    src = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    bad = dict(src)
    bad["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(PretrainedWeightsError, match="shape"):
        map_state_dict(bad, trunk)
    missing = {k: v for k, v in src.items() if not k.startswith("_conv_head")}
    with pytest.raises(PretrainedWeightsError, match="not in the checkpoint"):
        map_state_dict(missing, trunk)


def test_every_trunk_tensor_comes_from_the_checkpoint(imported) -> None:
    trunk, head = imported
    src = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(trunk.conv_stem.weight, src["_conv_stem.weight"].float())
    assert torch.equal(trunk.blocks[5][3].conv_pwl.weight, src["_blocks.14._project_conv.weight"].float())
    assert head["weight"].shape == (1000, 1280)


def test_imported_trunk_recognises_bundled_photos(imported) -> None:
    """No shared data needed: scikit-image ships a cat photo and a cup of coffee."""
    from skimage import data

    trunk, head = imported
    pred = classify(trunk, head, [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())])
    assert int(pred[0]) in range(281, 286)   # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(pred[1]) in (967, 968)        # espresso, cup


def test_imported_trunk_scores_imagenet_top1(imported) -> None:
    photos = shared_dir("photos/imagenet-sample")
    trunk, head = imported
    top1, n = imagenet_top1(trunk, head, photos, every=5)
    assert n == 200 and top1 >= 0.85  # a broken import scores near 0
