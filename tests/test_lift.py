"""LIFT (``method=lift``, docs/methods.md "LIFT") and test-time crop ensembling (``eval.tta``): the loss, the
adapters, the classifier's initialisation and the crop views by hand; a tiny-ViT run through ``rayexperts train``
(random weights saved to a file, loaded through ``model.weights``). Nothing is downloaded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import quick_overrides
from safetensors.torch import save_file

from rayexperts.config import ConfigError, list_presets, load_config
from rayexperts.data import build_dataset
from rayexperts.engine.tta import (
    CropViews,
    ensembled_logits,
    flip_batches,
    is_tta_view,
    merge_views,
    tta_name,
)
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.methods import get_method
from rayexperts.methods.lift import (
    lift_adapter_width,
    logit_adjusted_loss,
    set_adapters,
    text_feature_weights,
)
from rayexperts.models.output import ModelOutput

VIT = "timm/vit_tiny_patch16_224"
SMALL = {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2}  # digits' 8x8 images
SMALL_CLI = "model.timm_kwargs={img_size: 8, patch_size: 2, depth: 2, embed_dim: 32, num_heads: 2}"
LIFT_PRESETS = ("imagenet_lt_clip_b16_lift", "places_lt_clip_b16_lift", "inat2018_clip_b16_lift", "cifar100_lt_if100_lift")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _lift(tmp_path: Path, *extra: str):
    """LIFT on digits-lt with a depth-2 ViT of random weights: (method, its model)."""
    cfg = load_config(None, quick_overrides(tmp_path, "lift", **{"method": "lift", "model.backbone": VIT,
                                                                  "run.ray": False}) + [SMALL_CLI, *extra])
    data = build_dataset(cfg.data)
    method = get_method("lift")(cfg, torch.as_tensor(data.train_counts, dtype=torch.float32), data.in_channels)
    torch.manual_seed(0)
    model = method.build_model()
    method.setup(torch.device("cpu"), torch.contiguous_format)
    return method, model, data


def test_the_loss_is_ce_on_logits_plus_log_prior_by_hand():
    """CE(z + τ log π, y), π = n / N: z = (1, 2, 0), n = (6, 3, 1), y = 1."""
    z, counts, y = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([6.0, 3.0, 1.0]), torch.tensor([1])
    adjusted = [1 + math.log(0.6), 2 + math.log(0.3), 0 + math.log(0.1)]
    expected = -adjusted[1] + math.log(sum(math.exp(a) for a in adjusted))  # -0.7960 + log 3.9478
    assert float(logit_adjusted_loss(z, y, counts)) == pytest.approx(expected, abs=1e-6)
    half = [1 + 0.5 * math.log(0.6), 2 + 0.5 * math.log(0.3), 0.5 * math.log(0.1)]
    assert float(logit_adjusted_loss(z, y, counts, tau=0.5)) == pytest.approx(
        -half[1] + math.log(sum(math.exp(a) for a in half)), abs=1e-6)
    assert expected == pytest.approx(0.57710, abs=1e-4)


def test_the_method_loss_and_the_test_logits(tmp_path):
    method, _, data = _lift(tmp_path)
    z = torch.randn(4, 10)
    y = torch.tensor([0, 3, 9, 9])
    prior = torch.as_tensor(data.train_counts, dtype=torch.float32)
    out = method.loss(ModelOutput(features=[torch.zeros(4, 1)], logits=[z]), y)
    assert float(out.total) == pytest.approx(float(F.cross_entropy(z + (prior / prior.sum()).log(), y)), abs=1e-6)
    assert set(out.terms) == {"la"}
    views = method.views()
    assert list(views) == ["expert0"] and torch.equal(views["expert0"](ModelOutput([z], [z])), z)  # raw at test time


def test_the_adapter_width_is_the_codes():
    """2^max(0, floor(log2(C / 2L))) with L = 12 (docs/methods.md "LIFT": 32 / 8 / 256 / 4)."""
    assert [lift_adapter_width(c, 12) for c in (1000, 365, 8142, 100)] == [32, 8, 256, 4]
    assert lift_adapter_width(10, 12) == 1


def test_the_clip_b16_adapter_counts_are_the_codes():
    """docs/methods.md "LIFT": AdaptFormer parameters of ViT-B/16, ImageNet-LT (r = 32) 617,868, CIFAR-100 (r = 4)
    101,436 (built on the meta device: no memory, no weights)."""
    import timm

    from rayexperts.methods.lift import add_lift_adapters

    for classes, params in ((1000, 617_868), (100, 101_436)):
        with torch.device("meta"):
            net = timm.create_model("vit_base_patch16_clip_quickgelu_224", num_classes=0)
            add_lift_adapters(net, classes)
        assert sum(p.numel() for n, p in net.named_parameters() if ".adapter." in n) == params


def test_the_adapters_start_as_the_frozen_model_and_only_they_and_the_head_train(tmp_path):
    method, model, _ = _lift(tmp_path)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(["heads.0.weight"] + [
        f"experts.0.net.blocks.{i}.mlp.adapter.{p}" for i in range(2)
        for p in ("scale", "ln.weight", "ln.bias", "down_proj.weight", "down_proj.bias", "up_proj.weight",
                  "up_proj.bias")])
    assert method.adapter_width == 2  # 10 classes, 2 blocks: 2^floor(log2 2.5)
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    on = model(x).logits[0]
    set_adapters(model, False)
    assert torch.equal(model(x).logits[0], on)  # W_up = 0: step 0 is the frozen model
    set_adapters(model, True)
    # the block by hand: h + MLP(LN2(h)) + s · W_up ReLU(W_down LN_new(h)), on the block's stream h
    block = model.experts[0].net.blocks[0]
    a = block.mlp.adapter
    with torch.no_grad():
        a.up_proj.weight.normal_()
        a.scale.fill_(0.5)
    h = torch.randn(2, 17, 32)
    by_hand = block.mlp.mlp(block.mlp.norm(h)) + 0.5 * a.up_proj(torch.relu(a.down_proj(F.layer_norm(h, (32,)))))
    assert torch.allclose(block.mlp(h), by_hand, atol=1e-6)
    assert isinstance(block.norm2, torch.nn.Identity)


def test_the_classifier_starts_from_the_class_means_of_the_adapter_free_features(tmp_path):
    """Per class: the mean of the frozen features of its training images under the plain view, L2-normalised
    (digits: no resize; (x/255 − 0.3053)/0.3759), whatever the adapters hold."""
    method, model, data = _lift(tmp_path)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "up_proj"):
                m.up_proj.weight.normal_()  # adapters that would change the features: the init must not see them
    method.on_epoch(0)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))]).float()
    labels = torch.as_tensor(data.train.labels)
    model.eval()
    set_adapters(model, False)
    with torch.no_grad():
        feats = model.experts[0]((images / 255 - 0.3053) / 0.3759)
    set_adapters(model, True)
    means = torch.stack([feats[labels == c].mean(0) for c in range(10)])
    assert torch.allclose(model.heads[0].weight, F.normalize(means, dim=1), atol=1e-5)
    before = model.heads[0].weight.clone()
    method.on_epoch(1)  # a later epoch (or a resume) leaves the classifier alone
    assert torch.equal(model.heads[0].weight, before)


def test_text_feature_initialisation_by_hand_and_its_refusals(tmp_path):
    t, proj = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    # normalise, map by CLIP's visual projection (t @ proj.T: timm's head.weight), normalise again
    expected = F.normalize(torch.tensor([[0.6, 0.8, 1.2], [1.0, 0.0, 2.0]]), dim=1)
    assert torch.allclose(text_feature_weights(t, 3, proj), expected)
    assert torch.allclose(text_feature_weights(t, 2, None), F.normalize(t, dim=1))  # already image-space
    with pytest.raises(ConfigError, match=r"head\.weight in model\.weights"):
        text_feature_weights(t, 3, None)
    with pytest.raises(ConfigError, match="lift.text_features=FILE"):
        load_config(None, ["method=lift", f"model.backbone={VIT}", "lift.init=text_features"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, ["method=lift", f"model.backbone={VIT}", "lift.init=text_features",
                           f"lift.text_features={tmp_path / 'none.pt'}"])
    rows = torch.randn(10, 32)
    torch.save(rows, tmp_path / "text.pt")
    method, model, _ = _lift(tmp_path, "lift.init=text_features", f"lift.text_features={tmp_path / 'text.pt'}")
    method.on_epoch(0)
    assert torch.allclose(model.heads[0].weight, F.normalize(rows, dim=1), atol=1e-6)


def test_lift_refuses_what_it_cannot_run():
    for overrides, key in ((["model.num_experts=2"], "model.num_experts"), ([], "timm ViT"),
                           ([f"model.backbone={VIT}", "model.finetune=lora"], "model.finetune must be linear"),
                           ([f"model.backbone={VIT}", "model.classifier=linear"], "cosine")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["method=lift", *overrides])


def test_five_and_ten_crops_by_hand():
    """Resize the short side to size + expand (here a no-op: 6 → 6), then torchvision's order: top-left, top-right,
    bottom-left, bottom-right, centre (tencrop: then the same of the mirror image)."""
    img = torch.arange(36, dtype=torch.uint8).view(1, 6, 6)
    five = CropViews("fivecrop", 4, 2, "bilinear", lambda c: c.float())(img)
    assert five.shape == (5, 1, 4, 4)
    crops = [img[:, :4, :4], img[:, :4, 2:], img[:, 2:, :4], img[:, 2:, 2:], img[:, 1:5, 1:5]]
    assert torch.equal(five, torch.stack(crops).float())
    ten = CropViews("tencrop", 4, 2, "bilinear", lambda c: c.float())(img)
    mirror = img.flip(-1)
    assert torch.equal(ten[:5], five) and torch.equal(ten[5], mirror[:, :4, :4].float())
    assert torch.equal(ten[9], mirror[:, 1:5, 1:5].float())
    wide = CropViews("fivecrop", 4, 2, "bilinear", lambda c: c.float())(torch.zeros(1, 3, 12, dtype=torch.uint8))
    assert wide.shape == (5, 1, 4, 4)  # short side 3 → 6, long side 12 → 24


def test_crop_ensembling_is_the_mean_of_the_per_crop_logits(tmp_path):
    method, model, _ = _lift(tmp_path)
    model.eval()
    views = torch.randn(3, 5, 1, 8, 8)
    got = ensembled_logits(method, model, views)
    with torch.no_grad():
        by_hand = sum(model(views[:, k]).logits[0] for k in range(5)) / 5
    assert list(got) == ["expert0"] and torch.allclose(got["expert0"], by_hand, atol=1e-6)
    assert not torch.allclose(got["expert0"], model(views[:, 4]).logits[0])  # not the centre crop alone
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    (pair, targets), = list(flip_batches([(x, y)]))  # eval.tta=flip: the test view and its mirror image
    assert torch.equal(pair[:, 0], x) and torch.equal(pair[:, 1], x.flip(-1)) and torch.equal(targets, y)
    assert tta_name("expert0", "fivecrop") == "expert0_fivecrop" and is_tta_view("expert0_fivecrop")
    assert not is_tta_view("expert0") and not is_tta_view("tta_aggregate") and not is_tta_view("expert0_pc")
    acc, extra = EvalAccumulator(["expert0"], 3), EvalAccumulator(["expert0_flip"], 3)
    extra.update("expert0_flip", torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([1]))
    merge_views(acc, extra)
    assert acc.views == ["expert0", "expert0_flip"] and acc.per_class_accuracy("expert0_flip")[1] == 1.0
    with pytest.raises(ValueError, match="twice"):
        merge_views(acc, extra)


def test_the_lift_presets_resolve_without_a_download():
    assert set(LIFT_PRESETS) <= set(list_presets())
    for name in LIFT_PRESETS:
        for extra in ([], ["compat=official"]):
            cfg = load_config(name, extra)
            assert (cfg.method, cfg.model.backbone) == ("lift", "timm/vit_base_patch16_clip_quickgelu_224.openai")
            assert (cfg.model.cosine_scale, cfg.train.lr, cfg.train.batch_size, cfg.eval.tta) == (25.0, 0.01, 128,
                                                                                                  "fivecrop")
            assert cfg.train.epochs == (20 if name.startswith("inat") else 10)
            assert cfg.eval.tta_expand == 24 and cfg.train.lr_step == "epoch" and not cfg.data.drop_last
    assert load_config("cifar100_lt_if100_lift").data.imbalance_factor == 100


def _pretrained_tiny_vit(path: Path) -> Path:
    """A depth-1 ViT trained for a few epochs on digits-lt's training split (a stand-in for a foundation model:
    LIFT freezes it, so a random trunk gives near-constant class-token features), saved as timm's state dict."""
    import timm

    data = build_dataset(load_config(None, []).data)
    x = (torch.stack([data.train[i][0] for i in range(len(data.train))]).float() / 255 - 0.3053) / 0.3759
    y = torch.as_tensor(data.train.labels)
    torch.manual_seed(0)
    net = timm.create_model(VIT[5:], num_classes=10, in_chans=1, **TRUNK)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=0.05)
    for _ in range(6):
        for b in torch.randperm(len(y)).split(16):
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    save_file(net.state_dict(), str(path))  # its classifier (head.*) is dropped on load
    return path


TRUNK = {"img_size": 8, "patch_size": 2, "depth": 1, "embed_dim": 32, "num_heads": 2}
TRUNK_CLI = "model.timm_kwargs={img_size: 8, patch_size: 2, depth: 1, embed_dim: 32, num_heads: 2}"


@pytest.mark.slow
def test_a_tiny_vit_lift_run_learns_and_reports_its_five_crop_view(tmp_path, capsys):
    """``rayexperts train method=lift`` in process on digits-lt, the trunk loaded through ``model.weights``: the
    loss falls, the plain view is well above chance (10%), the adapters moved, and ``expert0_fivecrop`` is a view
    of its own, at the last evaluation only, not transductive. No training augmentation: the trunk saw none (a 1-px
    shift is another image to a patch-2 ViT)."""
    import pandas as pd

    from rayexperts.cli import main
    from rayexperts.rundir import load_checkpoint

    weights = _pretrained_tiny_vit(tmp_path / "trunk.safetensors")
    argv = quick_overrides(tmp_path, "lift", **{
        "method": "lift", "model.backbone": VIT, "model.weights": str(weights), "run.ray": False, "train.epochs": 3,
        "train.batch_size": 32, "train.lr": 0.01, "train.lr_step": "epoch", "train.lr_epoch_clock": "start",
        "data.drop_last": False, "data.augment": "none", "eval.tta": "fivecrop", "eval.tta_expand": 0,
        "scaling.cpus_per_worker": 1, "run.tensorboard": False})
    assert main(["train", *argv, TRUNK_CLI]) == 0
    m = pd.read_parquet(tmp_path / "runs" / "lift" / "metrics.parquet")
    last = m[m["epoch"] == 2].set_index("view")
    assert list(last.index) == ["expert0", "expert0_fivecrop"]
    assert not last["transductive"].any()
    assert last.loc["expert0", "top1"] > 0.3
    # eval.tta_expand=0 at digits' own size: the five crops are the whole image, normalised as the test view is,
    # so their ensemble is the plain view (the crops' geometry: test_five_and_ten_crops_by_hand)
    assert last.loc["expert0_fivecrop", "top1"] == last.loc["expert0", "top1"]
    assert last.loc["expert0_fivecrop", "ece"] == pytest.approx(last.loc["expert0", "ece"], abs=1e-6)
    assert set(m[m["epoch"] < 2]["view"]) == {"expert0"}  # the crops only at the last evaluation
    loss = m[m["view"] == "expert0"].sort_values("epoch")["loss"]
    assert loss.iloc[-1] < loss.iloc[0]  # the adapters and the classifier learn
    state = load_checkpoint(tmp_path / "runs" / "lift" / "checkpoint_000003")["model"]
    assert not [k for k in state if "net." in k and ".adapter." not in k and "heads." not in k and
                k.endswith(("weight", "bias"))]  # the frozen trunk is in the weights file, not the checkpoint
    assert state["experts.0.net.blocks.0.mlp.adapter.up_proj.weight"].abs().sum() > 0



@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_over_lift_tau(ray_cluster, tmp_path):
    """Two trials of ``lift.tau`` (a grid), one epoch each, each in its own run directory with its value."""
    import timm

    from rayexperts.launch.tune import load_space, run_sweep

    torch.manual_seed(0)
    weights = tmp_path / "trunk.safetensors"
    save_file(timm.create_model(VIT[5:], num_classes=0, in_chans=1, **TRUNK).state_dict(), str(weights))
    space_file = tmp_path / "space.yaml"
    space_file.write_text("lift.tau: {grid: [0.5, 1.0]}\n")
    cfg = load_config(None, ["method=lift", f"model.backbone={VIT}", TRUNK_CLI, f"model.weights={weights}",
                             f"run.storage_path={tmp_path}", "run.name=tau", "run.verbose=false", "train.epochs=1",
                             "train.batch_size=32", "tune.num_samples=1", "tune.max_concurrent=2",
                             "tune.scheduler=fifo", "scaling.cpus_per_worker=1", "run.tensorboard=false"])
    out = run_sweep(cfg, load_space(space_file, cfg))
    trials = out["trials"]
    assert sorted(trials["lift.tau"]) == [0.5, 1.0] and trials["run"].is_unique
    for run in trials["run"]:
        assert load_config(tmp_path / "tau" / run / "config.yaml").lift.tau in (0.5, 1.0)


def _cifar_like_parquet(path: Path, per_class: int = 4, classes: int = 4) -> Path:
    """A Parquet file of 32x32 PNGs (``image_kind`` cifar): ``per_class`` training and 2 test images per class."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"image": [], "label": [], "split": []}
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            for _ in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                rows["image"].append(buf.getvalue())
                rows["label"].append(c)
                rows["split"].append(split)
    pq.write_table(pa.table(rows), path)
    return path


@pytest.mark.parametrize("cache", ["device", "off"])
def test_cifar_images_are_up_sampled_to_the_models_size_on_both_back_ends(tmp_path, cache):
    """``data.augment=lift_crop`` on a CIFAR-kind set (32-px images) with a ViT built at 48 px (``data.image_size``
    follows it): the training, test and class-mean views up-sample to 48 (the batched back end: ``data.cache=device``;
    the per-image one: ``off``), so the run trains and evaluates; a 32-px batch is refused by the model."""
    import pandas as pd

    from rayexperts.cli import main

    data = _cifar_like_parquet(tmp_path / "tiny.parquet")
    argv = quick_overrides(tmp_path, "lift", **{
        "method": "lift", "model.backbone": VIT, "run.ray": False, "train.epochs": 1, "train.batch_size": 8,
        "data.name": "parquet", "data.root": str(data), "data.augment": "lift_crop", "data.cache": cache,
        "data.num_workers": 0, "data.drop_last": False, "scaling.cpus_per_worker": 1, "run.tensorboard": False})
    vit48 = "model.timm_kwargs={img_size: 48, patch_size: 16, depth: 1, embed_dim: 32, num_heads: 2}"
    cfg = load_config(None, [*argv, vit48])
    assert build_dataset(cfg.data).image_kind == "cifar" and int(cfg.data.image_size) == 48
    assert main(["train", *argv, vit48]) == 0
    m = pd.read_parquet(tmp_path / "runs" / "lift" / "metrics.parquet")
    assert list(m["view"]) == ["expert0"] and m["loss"].notna().all()
    method = get_method("lift")(cfg, torch.ones(4), 3)
    with pytest.raises(Exception, match="(?i)input (height|image|size)|48"):
        method.build_model()(torch.zeros(1, 3, 32, 32))
