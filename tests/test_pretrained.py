"""Pretrained backbones (issue 38 items 1, 2, 8; docs/pretrained.md): timm models by name, weights files,
fine-tuning modes. Tiny timm models with random weights; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quick_overrides
from omegaconf import OmegaConf
from safetensors.torch import save_file

from rayexperts.cli import main
from rayexperts.config import ConfigError, load_config
from rayexperts.engine.schedule import build_optimizer
from rayexperts.models.backbones import build_backbone, check_backbone
from rayexperts.models.experts import MultiExpertNet
from rayexperts.models.finetune import Adapter, LoRALinear, is_adapter, optimizer_groups
from rayexperts.models.weights import WeightsError
from rayexperts.rundir import CheckpointMismatch, check_identity, identity

VIT = "timm/vit_tiny_patch16_224"
SMALL = {"img_size": 8, "patch_size": 2, "depth": 1, "embed_dim": 64, "num_heads": 2}  # digits' 8x8 images
SMALL_CLI = "model.timm_kwargs={img_size: 8, patch_size: 2, depth: 1, embed_dim: 64, num_heads: 2}"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _net(mode: str = "full", seed: int = 0, **kw) -> MultiExpertNet:
    torch.manual_seed(seed)
    return MultiExpertNet(backbone=VIT, num_classes=10, in_channels=1, timm_kwargs=SMALL, finetune={"mode": mode}, **kw)


@pytest.mark.parametrize("mode,adapter", [("lora", LoRALinear), ("adaptformer", Adapter)])
def test_adapters_start_as_the_plain_model(mode, adapter):
    """Zero-initialised LoRA B / AdaptFormer up-projection: step 0 gives the plain model's logits; once the
    zero part moves, the logits move (the adapters are in the forward pass)."""
    plain, tuned, x = _net(), _net(mode), torch.randn(4, 1, 8, 8)
    assert sum(isinstance(m, adapter) for m in tuned.modules()) == (2 if mode == "lora" else 1)  # qkv+proj / 1 block
    assert torch.allclose(tuned(x).logits[0], plain(x).logits[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("lora_b", "adapter.up.weight")):
                p.add_(torch.randn_like(p) * 0.1)  # random: a constant shift would vanish in LayerNorm
    assert not torch.allclose(tuned(x).logits[0], plain(x).logits[0], atol=1e-3)


@pytest.mark.parametrize("mode", ["lora", "adaptformer", "linear", "bias"])
def test_exactly_the_adapters_and_heads_get_gradients_and_the_optimizer(mode):
    net = _net(mode, weights=None)
    net(torch.randn(4, 1, 8, 8)).logits[0].sum().backward()
    graded = {n for n, p in net.named_parameters() if p.grad is not None}
    expected = {n for n, _ in net.named_parameters()
                if n.startswith("heads.") or is_adapter(n) or (mode == "bias" and n.endswith(".bias")
                                                                 and not n.startswith("heads."))}
    assert graded == expected and any(n.startswith("heads.") for n in graded)
    if mode in ("lora", "adaptformer"):
        assert any(is_adapter(n) for n in graded) and not any(n.endswith(".bias") and not is_adapter(n)
                                                              and not n.startswith("heads.") for n in graded)
    cfg = load_config(None, ["train.optimizer=adamw"])
    opt = build_optimizer(optimizer_groups(net), cfg.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters() if p.requires_grad}
    assert isinstance(opt, torch.optim.AdamW)


def _save(state: dict, path: Path, kind: str) -> Path:
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "pth_nested":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:  # .bin under "model"
        torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("kind,suffix", [("safetensors", ".safetensors"), ("pth_nested", ".pth"), ("bin", ".bin")])
def test_weights_round_trip(tmp_path, kind, suffix):
    """A timm model's own state dict (with its classifier, which is dropped) loads through model.weights, and
    model.backbone_lr_scale applies to exactly those loaded parameters."""
    import timm

    torch.manual_seed(1)
    source = timm.create_model(VIT[5:], num_classes=7, in_chans=1, **SMALL)
    path = _save(source.state_dict(), tmp_path / f"w{suffix}", kind)
    net = _net("full", seed=2, weights=str(path))
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(net.experts[0].net.state_dict()[name], value), name
    groups = optimizer_groups(net, backbone_lr_scale=0.1)
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.heads.parameters()}


def test_a_cifar_backbone_takes_the_same_weights_keys(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("resnet8", in_channels=3)
    path = _save(source.state_dict(), tmp_path / "r.pth", "pth_nested")
    loaded = build_backbone("resnet8", in_channels=3, weights=str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_wrong_weights_are_refused_in_one_line_naming_the_file(tmp_path, capsys):
    import timm

    other = tmp_path / "other.safetensors"  # another architecture: wider embedding
    save_file(timm.create_model(VIT[5:], num_classes=0, in_chans=1, **{**SMALL, "embed_dim": 32}).state_dict(), str(other))
    good = tmp_path / "good.pth"
    torch.save(timm.create_model(VIT[5:], num_classes=0, in_chans=1, **SMALL).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in torch.load(good, weights_only=True).items() if not k.startswith("norm.")}, partial)
    cfg = load_config(None, [f"model.backbone={VIT}", SMALL_CLI])
    for path, words in ((other, "another architecture"), (truncated, "truncated"), (partial, "2 missing keys")):
        with pytest.raises(WeightsError) as e:
            check_backbone(OmegaConf.merge(cfg.model, {"weights": str(path)}), 1)
        assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    # not strict: loads, and says what was missing
    net = _net(weights=str(partial), weights_strict=False)
    assert "2 missing keys (net.norm.weight, net.norm.bias)" in capsys.readouterr().out
    assert torch.equal(net.experts[0].net.cls_token, torch.load(good, weights_only=True)["cls_token"])
    # through the CLI: exit 2, one line, before anything is written
    runs = tmp_path / "runs"
    for path in (other, truncated):
        rc = main(["train", f"model.backbone={VIT}", SMALL_CLI, f"model.weights={path}", "run.ray=false",
                   f"run.storage_path={runs}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and str(path) in err and len(err.splitlines()) == 1
    assert not runs.exists()


def test_pretrained_without_download_names_the_weights_and_the_key(tmp_path):
    """The config composes (``--print-config`` shows a pretrained preset); the run's preflight refuses it in one
    line, before Ray starts and before anything is written."""
    from rayexperts.launch.train import preflight

    cfg = load_config(None, ["model.backbone=timm/vit_base_patch16_clip_224.openai", "model.pretrained=true",
                             f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"model\.pretrained=true: the weights of timm/vit_base_patch16_clip_224"
                                          r"\.openai .*model\.allow_download=true.*model\.weights=PATH"):
        preflight(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_refuses_other_weights(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"x": torch.zeros(2)}, a)
    torch.save({"x": torch.ones(2)}, b)
    saved = identity(load_config(None, [f"model.weights={a}"]), 10)
    check_identity(saved, identity(load_config(None, [f"model.weights={a}"]), 10), "ckpt")
    with pytest.raises(CheckpointMismatch, match="model.weights_sha256"):
        check_identity(saved, identity(load_config(None, [f"model.weights={b}"]), 10), "ckpt")


@pytest.mark.slow
def test_a_tiny_vit_learns_digits_in_process(tmp_path):
    """A depth-1 ViT at digits' 8x8 (patch 2) learns well above chance (10%) in 6 epochs, without Ray."""
    from rayexperts.launch.train import run_training

    cfg = load_config(None, quick_overrides(tmp_path, "vit", **{
        "run.ray": False, "train.epochs": 6, "train.batch_size": 32, "model.backbone": VIT, "train.optimizer": "adamw",
        "train.lr": 0.002, "train.weight_decay": 0.05, "data.imbalance_factor": 1, "data.augment": "none",
        "scaling.cpus_per_worker": 1, "run.tensorboard": False}) + [SMALL_CLI])
    run_training(cfg)
    import pandas as pd

    m = pd.read_parquet(tmp_path / "runs" / "vit" / "metrics.parquet")
    last = m[m["epoch"] == m["epoch"].max()]
    assert float(last["top1"].iloc[0]) > 0.4


@pytest.mark.slow
def test_balpoe_trains_on_a_shared_timm_trunk_with_lora_and_resumes_only_with_its_weights(tmp_path, capsys):
    """BalPoE's 3 experts as heads on one LoRA-adapted timm trunk loaded from a weights file: one epoch; the
    checkpoint holds no frozen trunk weight; the run extends from it, and refuses another weights file."""
    import timm

    from rayexperts.launch.train import run_training
    from rayexperts.rundir import load_checkpoint

    weights, other = tmp_path / "w.safetensors", tmp_path / "other.safetensors"
    for seed, path in ((0, weights), (1, other)):
        torch.manual_seed(seed)
        save_file(timm.create_model(VIT[5:], num_classes=0, in_chans=1, **SMALL).state_dict(), str(path))

    def cfg(epochs, path):
        return load_config(None, quick_overrides(tmp_path, "balpoe", **{
            "method": "balpoe", "model.num_experts": 3, "model.finetune": "lora", "run.ray": False,
            "train.epochs": epochs, "train.batch_size": 32, "model.backbone": VIT, "train.optimizer": "adamw",
            "train.lr": 0.002, "scaling.cpus_per_worker": 1, "run.tensorboard": False, "run.allow_extend": True,
            "model.weights": str(path)}) + [SMALL_CLI])

    run_training(cfg(1, weights))
    state = load_checkpoint(tmp_path / "runs" / "balpoe" / "checkpoint_000001")["model"]
    assert {k.split("heads.", 1)[1][0] for k in state if "heads." in k} == {"0", "1", "2"}
    assert not [k for k in state if "trunk." in k and "lora_" not in k]  # the weights file holds them
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_b"))  # B moved from 0
    capsys.readouterr()
    run_training(cfg(2, weights))
    assert "resuming from" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "runs" / "balpoe" / "checkpoint_000002")["epoch"] == 2
    with pytest.raises(CheckpointMismatch, match="model.weights_sha256"):
        run_training(cfg(3, other))

def test_a_timm_models_mean_and_std_reach_both_pipelines_unless_data_mean_is_set(tmp_path):
    """The model's pretrained mean/std (here overlaid: 1 channel, as digits have) normalise the batched and the
    per-image test views; data.mean/data.std win over them."""
    from rayexperts.data.augment.batched.core import BatchRng
    from rayexperts.engine.run import Run

    overlay = "model.timm_kwargs.pretrained_cfg_overlay={mean: [0.3], std: [0.2], crop_pct: 1.0, interpolation: bicubic}"
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8) * 3
    for extra, (mean, std) in (([], (0.3, 0.2)), (["data.mean=[0.5]", "data.std=[0.25]", "data.crop_pct=0.5", "data.interpolation=bilinear"],
                                      (0.5, 0.25))):
        cfg = load_config(None, quick_overrides(tmp_path, "p", **{"model.backbone": VIT}) + [SMALL_CLI, overlay, *extra])
        run = Run(cfg)
        assert run.model_data["mean"] == (0.3,) and run.loaders.augment_options().mean == (mean,)
        opts = run.loaders.augment_options()
        assert (opts.crop_pct, opts.interpolation) == ((1.0, "bicubic") if not extra else (0.5, "bilinear"))
        want = (x.float() / 255 - mean) / std
        batched_test = run.loaders.transforms(batched=True)[2]
        per_image_test = run.loaders.transforms(batched=False)[2]
        assert torch.allclose(batched_test(x.clone(), BatchRng(0, torch.device("cpu"))), want, atol=1e-6)
        assert torch.allclose(per_image_test(x[0].clone()), want[0], atol=1e-6)


TIMM_160 = "timm/test_vit.r160_in1k"  # timm's tiny test ViT: input_size (3, 160, 160) in its pretrained config


def test_data_image_size_follows_a_timm_models_input_size_unless_the_config_sets_it():
    """imagefolder's default 224 gives way to the model's 160, shown as its own layer; data.image_size set in the
    config wins, and so does model.timm_kwargs.img_size (the size the model is built at); other backbones keep 224."""
    from rayexperts.config import explain

    base = ["data.name=imagefolder", f"model.backbone={TIMM_160}"]
    assert load_config(None, base).data.image_size == 160
    assert f"data.image_size: 160  # model {TIMM_160} input size" in explain(None, base).splitlines()
    assert load_config(None, [*base, "data.image_size=64"]).data.image_size == 64
    assert load_config(None, [*base, "model.timm_kwargs={img_size: 96}"]).data.image_size == 96
    overlay = "model.timm_kwargs.pretrained_cfg_overlay={input_size: [3, 48, 48]}"
    assert load_config(None, [*base, overlay]).data.image_size == 48
    assert load_config(None, ["data.name=imagefolder"]).data.image_size == 224


@pytest.mark.slow
def test_a_timm_models_input_size_reaches_every_data_path(tmp_path):
    """20x20 images, a ViT that takes 160x160 only: one epoch trains and evaluates through the device cache (batched
    test view), the per-image DataLoader and the file decoder, and config.yaml records the size."""
    from data_fixtures import make_image_tree

    from rayexperts.launch.train import run_training

    make_image_tree(tmp_path, "train", {"a": 3, "b": 2}, size=20)
    make_image_tree(tmp_path, "test", {"a": 1, "b": 1}, size=20)
    for cache, decode in (("device", "auto"), ("off", "auto"), ("off", "device")):
        cfg = load_config(None, quick_overrides(tmp_path, f"{cache}-{decode}", **{
            "run.ray": False, "train.epochs": 1, "train.batch_size": 4, "data.test_batch_size": 4,
            "data.name": "imagefolder", "data.root": str(tmp_path), "data.imbalance_type": "none",
            "data.num_workers": 0, "data.cache": cache, "data.decode": decode, "model.backbone": TIMM_160,
            "scaling.cpus_per_worker": 1, "run.tensorboard": False}))
        run_training(cfg)
        saved = OmegaConf.load(tmp_path / "runs" / f"{cache}-{decode}" / "config.yaml")
        assert saved.data.image_size == 160


def test_the_batched_test_view_resizes_a_device_cache_as_the_per_image_view_does():
    """A device cache holds images as stored: the batched test view resizes and centre-crops them like the per-image
    view (to the pixel here), images already at the size too (Resize(16 / 0.8) + CenterCrop(16) is no identity)."""
    from rayexperts.data import build_transform
    from rayexperts.data.augment.batched.core import BatchRng
    from rayexperts.data.augment.batched.pipelines import batch_transform
    from rayexperts.data.augment.recipes import AugmentOptions

    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opts = AugmentOptions(crop_pct=0.8, interpolation="bicubic")
    batched = batch_transform("imagenet", "none", train=False, image_size=16, options=opts)
    rng = BatchRng(0, torch.device("cpu"))
    per_image_view = build_transform("imagenet", "none", train=False, image_size=16, options=opts)
    per_image = per_image_view(img)
    assert torch.equal(batched(img[None].clone(), rng)[0], per_image)
    small = img[:, :16, :16].clone()
    assert torch.equal(batched(small[None].clone(), rng)[0], per_image_view(small))


def test_a_fine_tuning_checkpoint_holds_the_trainable_part_and_loads_back(tmp_path):
    """finetune=lora on loaded weights: the checkpoint leaves out the frozen pretrained parameters (the weights
    file has them) but keeps adapters, heads and buffers; a model built from the same config loads it."""
    import timm

    from rayexperts.rundir import load_model_state, model_state

    path = tmp_path / "w.safetensors"
    save_file(timm.create_model(VIT[5:], num_classes=0, in_chans=1, **SMALL).state_dict(), str(path))
    net = _net("lora", weights=str(path))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    state = model_state(net)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(state)
    assert set(state) == {n for n, p in net.named_parameters() if p.requires_grad}  # ViT: no buffers
    fresh = _net("lora", seed=5, weights=str(path))
    load_model_state(fresh, state)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model_state(fresh, {k: v for k, v in state.items() if not k.startswith("heads.")})
    full = _net("full", weights=str(path))
    assert set(model_state(full)) == set(full.state_dict())  # full fine-tuning keeps everything


def test_grad_checkpointing_and_modes_that_find_nothing_are_refused_before_anything_runs(tmp_path, capsys):
    net = _net("full", grad_checkpointing=True)
    assert net.experts[0].net.grad_checkpointing is True
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    net(x).logits[0].sum().backward()  # recomputed blocks still give gradients
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.grad_checkpointing=true needs a timm backbone"):
        load_config(None, ["model.grad_checkpointing=true"])
    runs = tmp_path / "runs"
    for args, words in ((["model.finetune=adaptformer"], "model.finetune=adaptformer: the backbone has no transformer"),
                        (["model.backbone=timm/no_such_net"], "timm has no model 'no_such_net'"),
                        ([f"model.backbone={VIT}", SMALL_CLI, "model.finetune=lora", "model.lora_targets=[fc9]"],
                         "no nn.Linear named by model.lora_targets=['fc9']")):
        assert main(["train", *args, "run.ray=false", f"run.storage_path={runs}"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not runs.exists()


def test_the_imagenet_test_view_resizes_to_size_over_crop_pct_with_its_interpolation():
    """Resize(round(size / crop_pct), interpolation) + CenterCrop(size); the default 224/256 is the former
    Resize(size·256/224) (256 for 224)."""
    from torchvision.transforms.v2 import functional as TF

    from rayexperts.data.augment.per_image import build_transform
    from rayexperts.data.augment.recipes import AugmentOptions, eval_resize_side

    assert eval_resize_side(224) == 256 and eval_resize_side(224, AugmentOptions(crop_pct=0.9)) == 249
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opts = AugmentOptions(crop_pct=0.8, interpolation="bicubic")
    got = build_transform("imagenet", "none", train=False, image_size=8, options=opts)(img)
    by_hand = TF.center_crop(TF.resize(img, [10], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [8, 8])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (opts.mean or (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert got.shape == (3, 8, 8)
    assert torch.allclose(got, (by_hand.float() / 255 - mean) / std, atol=1e-5)
    bilinear = build_transform("imagenet", "none", train=False, image_size=8, options=AugmentOptions(crop_pct=0.8))(img)
    assert not torch.allclose(got, bilinear)


def test_the_device_decoded_test_view_uses_the_same_crop_pct_and_interpolation():
    from torchvision.transforms.v2 import functional as TF

    from rayexperts.data.augment.batched.core import BatchRng
    from rayexperts.data.augment.batched.pipelines import BatchPipeline, normalise
    from rayexperts.data.augment.recipes import AugmentOptions
    from rayexperts.data.encoded import EncodedLoader

    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = object.__new__(EncodedLoader)  # only the crop stage: no source to read
    loader.image_size, loader.options = 8, AugmentOptions(crop_pct=0.8, interpolation="bicubic")
    batch, _ = loader._first_stage(BatchPipeline([], normalise("imagenet")), [img], BatchRng(0, torch.device("cpu")))
    by_hand = TF.center_crop(TF.resize(img, [10], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [8, 8])
    assert torch.equal(batch[0], by_hand)
