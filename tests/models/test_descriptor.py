"""models/descriptor.py: shapes, norms, GeM; with the training stages that shape it (frozen stages,
the feature cache, PCA init, resume, progress on Kodak: models/training/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared_dir, tiny_trainer

from models.card import load_model, resize_square, to_batch
from models.descriptor import Backbone, DescriptorConfig, DescriptorModel, GeM
from models.preprocess import batched_features
from models.training import TrainConfig, Trainer


def test_output_shapes_and_unit_norms() -> None:
    torch.manual_seed(0)
    m = DescriptorModel(DescriptorConfig(high_res=64, low_res=48)).eval()
    hi, lo = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        f128, f512 = m.gallery_features(hi)
        q128 = m.query_coarse(lo)
        r512 = m.rerank_features(hi)
    assert f128.shape == (3, 128) and q128.shape == (3, 128)
    assert f512.shape == (3, 512) and r512.shape == (3, 512)
    for t in (f128, f512, q128, r512):
        assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(f512, r512)


@pytest.mark.parametrize("backbone", [Backbone.RESNET18, Backbone.RESNET50, Backbone.MOBILENET_V3_LARGE])
def test_other_backbones_give_the_same_dims(backbone: Backbone) -> None:
    m = DescriptorModel(DescriptorConfig(backbone=backbone, high_res=64, low_res=48)).eval()
    with torch.no_grad():
        f128, f512 = m.gallery_features(torch.randn(2, 3, 64, 64))
    assert f128.shape == (2, 128) and f512.shape == (2, 512)


def test_gem_p1_is_average_pooling_and_large_p_approaches_max() -> None:
    x = torch.rand(2, 5, 7, 7) + 0.01
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)
    big = GeM(p=80.0)(x)
    mx = x.amax(dim=(-2, -1))
    assert torch.all(big <= mx + 1e-5) and torch.allclose(big, mx, rtol=0.08)
    assert GeM(p=3.0).p.requires_grad


@pytest.mark.parametrize("views", [1, 2])
def test_stage2_freezes_backbone_and_stage3_freezes_adapter1(tmp_path, gen_images, views) -> None:
    tr = tiny_trainer(tmp_path / "run", gen_images, cache_views=views)
    tr.stage_backbone()
    snap = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.stage_adapter1()
    after2 = tr.model.state_dict()
    frozen = [k for k in snap if k.startswith(("backbone.", "pool.", "reduction."))]
    assert frozen and all(torch.equal(snap[k], after2[k]) for k in frozen), "stage 2 changed the backbone"
    assert not torch.equal(snap["adapter1.fc.weight"], after2["adapter1.fc.weight"]), "stage 2 did not train adapter 1"
    snap2 = {k: v.clone() for k, v in after2.items()}
    tr.stage_adapter2()
    after3 = tr.model.state_dict()
    frozen3 = [k for k in snap2 if k.startswith(("backbone.", "pool.", "reduction.", "adapter1."))]
    assert all(torch.equal(snap2[k], after3[k]) for k in frozen3), "stage 3 changed backbone or adapter 1"
    assert not torch.equal(snap2["adapter2.widen.weight"], after3["adapter2.widen.weight"])
    c = tr.pooled_cache()
    assert c["gallery"].shape[0] == c["query_low"].shape[0] == views * (16 + 4)  # photos + generated pictures
    assert c["ids"].tolist() == list(range(20)) * views
    assert all(np.isfinite(tr.history[k]).all() and len(tr.history[k]) == 2 for k in ("adapter1", "adapter2"))


def test_the_feature_cache_is_keyed_to_the_settings_that_shape_it(tmp_path, gen_images) -> None:
    tr = tiny_trainer(tmp_path / "run", gen_images, cache_views=1)
    tr.stage_backbone()
    tr.pooled_cache()
    tr2 = tiny_trainer(tmp_path / "run", gen_images, cache_views=2)
    tr2.stage_backbone()  # resumes the same stage-1 weights
    c2 = tr2.pooled_cache()
    assert c2["gallery"].shape[0] == 2 * 20, "a changed cache_views reused a stale cache"
    assert len(list((tmp_path / "run" / "checkpoints").glob("pooled_cache-*.pt"))) == 2


def test_query_grayscale_turns_that_share_of_query_views_gray_and_keys_the_cache(tmp_path, gen_images) -> None:
    import numpy as np
    from PIL import Image

    from models.training import PairDataset

    imgs = [Image.open(p).convert("RGB") for p in sorted(gen_images.glob("*.png"))[:8]]

    def gray_share(p: float) -> tuple[float, list[np.ndarray]]:
        ds = PairDataset(imgs * 8, 64, 48, seed=0, grayscale_p=p)
        items = [ds[i] for i in range(len(ds))]
        # a grayscale view may get coloured text or stickers later in the chain: count mostly-gray views
        gray = [float(np.mean(np.ptp(q.astype(int), axis=2) <= 2)) > 0.8 for _, _, q, _ in items]
        return float(np.mean(gray)), [g for g, _, _, _ in items]

    none, g0 = gray_share(0.0)
    every, g1 = gray_share(1.0)
    assert every > 0.7 and every > none + 0.5
    assert all(np.array_equal(a, b) for a, b in zip(g0, g1)), "the gallery view must not depend on query_grayscale"
    keys = {tiny_trainer(tmp_path / "k", gen_images, query_grayscale=p).cache_key() for p in (0.25, 0.45)}
    assert len(keys) == 2, "a changed query_grayscale must build a new feature cache"


def test_full_run_ships_fp16_weights_a_background_bank_and_a_card(tmp_path, gen_images) -> None:
    from safetensors.torch import load_file

    from models.card import load_background

    tr = tiny_trainer(tmp_path / "run", gen_images)
    card = tr.run()
    out = tmp_path / "run"
    stored = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    m, card2 = load_model(out)
    assert card2.version_id == card.version_id and next(m.parameters()).dtype == torch.float32
    bank = load_background(out)
    assert bank is not None and bank.f512.shape == (4 + 3, 512) and bank.f128.shape == (7, 128)
    assert bank.kind.count("photo") == 4 and card.background["count"] == 7
    np.testing.assert_allclose(np.linalg.norm(bank.f512, axis=1), 1.0, atol=2e-3)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    stage1 = [r for r in log if r.get("stage") == "backbone" and "epoch" in r]
    assert stage1 and {"infonce", "entropy", "loss"} <= set(stage1[0])  # each loss term logged apart
    adapter2 = [r for r in log if r.get("stage") == "adapter2"]
    assert adapter2[0]["epoch"] == 0 and {"cosine", "kl"} <= set(adapter2[-1])


def test_stages_2_3_on_a_committed_backbone_reproduce_the_same_bytes(tmp_path, gen_images) -> None:
    """The shipped model's claim: ``init_from=<model> epochs_backbone=0`` retrains adapters and
    bank byte for byte (weights, bank and so the card's sha256 and version id)."""
    from models.card import sha256_file

    first = tiny_trainer(tmp_path / "base", gen_images).run()
    runs = []
    for name in ("a", "b", "c"):
        tr = tiny_trainer(tmp_path / name, gen_images, init_from=str(tmp_path / "base"), epochs_backbone=0,
                           threads=2)
        card = tr.run()
        runs.append((card.version_id, sha256_file(tmp_path / name / "model.safetensors"),
                     sha256_file(tmp_path / name / "background.safetensors")))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] != first.version_id  # adapters were retrained, not copied
    assert card.training["init_from"]["version_id"] == first.version_id  # the card names the backbone's origin
    assert card.training["init_from"]["its_training"]["command"] == "test"


def test_pca_init_makes_adapter1_the_top_principal_directions_of_the_512d_head() -> None:
    from models.descriptor import CompressAdapter, RerankReduction
    from models.training import pca_init

    torch.manual_seed(0)
    red, ad = RerankReduction(64, 32), CompressAdapter(64, 4)
    pooled = torch.randn(2000, 64) @ torch.diag(torch.linspace(3, 0.1, 64))
    with torch.no_grad():
        f = red(pooled)
        pca_init(ad, f, red, pooled)
        _, _, v = torch.linalg.svd(f - f.mean(0), full_matrices=False)
        proj = (f - f.mean(0)) @ v[:4].t()
        lin = ad.fc(pooled)
    for i in range(4):  # each adapter unit tracks one principal component (up to the normalisation)
        c = torch.corrcoef(torch.stack([proj[:, i], lin[:, i]]))[0, 1]
        assert c > 0.95, (i, float(c))
    assert float(torch.tanh(lin).abs().mean()) < 0.6  # tanh starts in its near-linear range


def test_training_resumes_from_checkpoint(tmp_path, gen_images) -> None:
    tr = tiny_trainer(tmp_path / "run", gen_images)
    tr.stage_backbone(epochs=1)
    w1 = tr.model.state_dict()["backbone.0.weight"].clone()
    tr2 = tiny_trainer(tmp_path / "run", gen_images)
    hist = tr2.stage_backbone(epochs=1)  # already done: loads, trains nothing
    assert len(hist) == 1 and torch.equal(tr2.model.state_dict()["backbone.0.weight"], w1)
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["stage"] == "backbone" and log[0]["epoch"] == 1


def test_a_few_training_steps_on_kodak_lower_the_loss(tmp_path) -> None:
    from models.losses import info_nce
    from models.preprocess import resize_pair

    kodak = shared_dir("kodak24")
    torch.manual_seed(0)
    cfg = TrainConfig(model=DescriptorConfig(backbone=Backbone.RESNET18, high_res=64, low_res=48), batch_size=12, temperature=0.1,
                      entropy_weight=0.0, synthetic_images=0)
    tr = Trainer(kodak, tmp_path, cfg, command="test")
    pairs = [resize_pair(im, 48, 64) for im in tr.images[:12]]  # fixed batch: the loss must fall
    hi = to_batch(np.stack([p[1] for p in pairs]))
    lo = to_batch(np.stack([p[0] for p in pairs]))
    m = tr.model.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = info_nce(m.rerank_features(hi), m.rerank_features(lo), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_shipped_model_ranks_edited_copies_above_unrelated_photos(shipped_model_dir) -> None:
    mods = shared_dir("edge-cases/pdq-bridge-mods")
    kodak = shared_dir("kodak24")
    from PIL import Image

    m, card = load_model(shipped_model_dir)
    hr = card.config.high_res

    def square(p):
        with Image.open(p) as im:
            return resize_square(im, hr)

    edited = [p for p in sorted(mods.glob("*.jpg")) if p.name != "aaa-orig.jpg"]
    paths = [mods / "aaa-orig.jpg", *edited, *sorted(kodak.glob("*.png"))]
    f = batched_features(m.rerank_features, paths, prepare=square)  # one pass, in micro-batches
    orig, edits, others = f[0], f[1:1 + len(edited)], f[1 + len(edited):]
    assert len(edits) >= 10 and len(others) == 24
    worst_copy = min(float(orig @ e) for e in edits)
    best_other = max(float(orig @ o) for o in others)
    assert worst_copy > best_other, (worst_copy, best_other)
