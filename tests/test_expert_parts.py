"""K experts on one pretrained timm trunk (issue 38 item 5; docs/pretrained.md "Multi-expert methods on one trunk"):
``model.expert_part=head|adapter|blocks``. A tiny timm ViT with random weights saved to a file, loaded through
``model.weights``; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quick_overrides
from safetensors.torch import save_file

from rayexperts.config import ConfigError, load_config
from rayexperts.models.backbones import TimmBackbone, check_backbone
from rayexperts.models.experts import MultiExpertNet
from rayexperts.models.finetune import is_adapter

VIT = "timm/vit_tiny_patch16_224"
# digits' 8x8 images; mean-pooled tokens (a random ViT's class token hardly depends on the image)
SMALL = {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2, "global_pool": "avg"}
SMALL_CLI = "model.timm_kwargs={img_size: 8, patch_size: 2, depth: 2, embed_dim: 32, num_heads: 2, global_pool: avg}"
K = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pretrained(path: Path):
    """The plain timm model with random weights (seed 0), saved to ``path``; returned in eval mode."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model(VIT[5:], num_classes=0, in_chans=1, **SMALL)
    if not path.exists():
        save_file(net.state_dict(), str(path))
    return net.eval()


def _experts(path: Path, part: str, mode: str, seed: int = 1) -> MultiExpertNet:
    torch.manual_seed(seed)
    return MultiExpertNet(backbone=VIT, num_classes=10, in_channels=1, num_experts=K, shared_stages=1,
                          timm_kwargs=SMALL, weights=str(path), finetune={"mode": mode}, expert_part=part).eval()


def _trainable(net: MultiExpertNet, part: str, mode: str) -> set[str]:
    """The parameters that should train, by name, for each layout."""
    names = {n for n, _ in net.named_parameters()}
    heads = {n for n in names if n.startswith("heads.")}
    if part == "blocks":
        return heads | {n for n in names if n.startswith("experts.")} | {n for n in names if is_adapter(n)}
    return heads | {n for n in names if is_adapter(n)}


CASES = [("head", "lora"), ("adapter", "lora"), ("adapter", "adaptformer"), ("blocks", "linear"), ("blocks", "lora")]


@pytest.mark.parametrize("part,mode", CASES)
def test_k_experts_share_one_trunk_start_as_the_pretrained_model_and_train_only_their_parts(tmp_path, part, mode):
    path = tmp_path / "w.safetensors"
    plain = _pretrained(path)
    net = _experts(path, part, mode)
    x = torch.randn(4, 1, 8, 8)

    # One trunk: one timm model in the net, its pretrained tensors once (blocks: the experts own copies of the last).
    assert sum(isinstance(m, TimmBackbone) for m in net.modules()) == 1
    trunk = sum(p.numel() for n, p in net.trunk.named_parameters() if not is_adapter(n))
    expert = sum(p.numel() for n, p in net.experts[0].named_parameters() if not is_adapter(n))
    total = sum(p.numel() for p in plain.parameters())
    if part == "blocks":
        last = sum(p.numel() for m in (plain.blocks[-1], plain.norm, plain.fc_norm) for p in m.parameters())
        assert sum(p.numel() for p in plain.fc_norm.parameters()) > 0  # avg pooling: the experts own fc_norm
        assert (trunk, expert) == (total - last, last)
    else:
        assert (trunk, expert) == (total, 0)
    ids = [id(p) for p in net.parameters()]
    assert len(ids) == len(set(ids))

    # Step 0: every expert's feature is the pretrained model's (adapters zero-initialised, blocks copied).
    with torch.no_grad():
        want, out = plain(x), net(x)
    assert len(out.features) == K
    for v in out.features:
        assert torch.allclose(v, want, atol=1e-5, rtol=0)

    # Exactly the intended parameters train, get gradients, and nothing else does.
    expected = _trainable(net, part, mode)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    sum(z.sum() for z in net(x).logits).backward()
    graded = {n for n, p in net.named_parameters() if p.grad is not None}
    assert graded == expected
    if part == "adapter":
        assert any(is_adapter(n) and n.startswith("trunk.") for n in graded)


@pytest.mark.parametrize("mode", ["lora", "adaptformer"])
def test_each_adapter_expert_gets_gradients_in_its_own_adapter_set_only(tmp_path, mode):
    """Expert 1's loss moves slice 1 of every stacked adapter (its B / up-projection: the zero-initialised part that
    gets the gradient at step 0) and no other slice; moving slice 2 changes expert 2's feature only."""
    path = tmp_path / "w.safetensors"
    _pretrained(path)
    net = _experts(path, "adapter", mode)
    x = torch.randn(4, 1, 8, 8)
    net(x).logits[1].sum().backward()
    zero_init = [(n, p) for n, p in net.named_parameters() if n.endswith(("lora_b", "adapter.up_weight"))]
    assert zero_init
    for _, p in zero_init:
        assert p.grad[1].abs().sum() > 0 and p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0
    with torch.no_grad():
        before = net(x).features
        for _, p in zero_init:
            p[2].add_(torch.randn_like(p[2]))
        after = net(x).features
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.allclose(after[2], before[2], atol=1e-3)


def test_expert_part_keys_are_refused_in_one_line_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="model.expert_part=adapter needs a timm backbone"):
        load_config(None, ["method=balpoe", "model.expert_part=adapter"])
    with pytest.raises(ConfigError, match="model.expert_part=adapter with model.finetune=linear"):
        load_config(None, ["method=balpoe", f"model.backbone={VIT}", "model.expert_part=adapter",
                           "model.finetune=linear"])
    with pytest.raises(ConfigError, match="'model.expert_blocks' must be >= 1"):
        load_config(None, [f"model.backbone={VIT}", "model.expert_part=blocks", "model.expert_blocks=0"])
    cfg = load_config(None, ["method=balpoe", f"model.backbone={VIT}", "model.expert_part=blocks",
                             "model.expert_blocks=2", SMALL_CLI])
    with pytest.raises(ConfigError, match=r"model.expert_blocks=2: timm/vit_tiny_patch16_224 has 2 blocks.*1 \.\. 1"):
        check_backbone(cfg.model, 1)  # the driver's preflight, on the meta device
    cfg = load_config(None, ["method=balpoe", "model.backbone=timm/resnet18", "model.expert_part=blocks"])
    with pytest.raises(ConfigError, match="timm/resnet18 is not a transformer with `blocks`"):
        check_backbone(cfg.model, 1)


def _balpoe(tmp_path: Path, weights: Path, name: str, **extra) -> list[str]:
    return quick_overrides(tmp_path, name, **{
        "method": "balpoe", "model.num_experts": K, "model.backbone": VIT, "model.weights": str(weights),
        "model.finetune": "adaptformer", "model.expert_part": "adapter", "model.adapter_width": 64,
        "train.optimizer": "adamw", "train.lr": 0.01, "train.epochs": 3, "train.batch_size": 64,
        "data.imbalance_factor": 1, "data.augment": "none", "run.tensorboard": False, **extra}) + [SMALL_CLI]


@pytest.mark.slow
def test_balpoe_with_k_adapters_on_one_trunk_trains_through_rayexperts_train_and_teaches_cbd(tmp_path, capsys):
    """`rayexperts train` (in-process) of BalPoE with 3 AdaptFormer experts on one frozen trunk: it learns (above
    chance), its checkpoint holds the adapters but no frozen trunk weight, and a CBD student on another backbone
    distils from it (one target part per expert, 32 wide)."""
    import pandas as pd

    from rayexperts.cli import main
    from rayexperts.engine.run import Run
    from rayexperts.methods.base import Batch
    from rayexperts.rundir import load_checkpoint

    weights = tmp_path / "w.safetensors"
    _pretrained(weights)
    overrides = _balpoe(tmp_path, weights, "balpoe", **{"run.ray": False, "scaling.cpus_per_worker": 1})
    assert main(["train", *overrides]) == 0
    run_dir = tmp_path / "runs" / "balpoe"
    m = pd.read_parquet(run_dir / "metrics.parquet")
    assert float(m[(m["view"] == "ensemble") & (m["epoch"] == 2)]["top1"].iloc[0]) > 0.2  # chance: 0.1 (28.67% seen)
    state = load_checkpoint(max(p for p in run_dir.glob("checkpoint_*") if p.is_dir()))["model"]
    assert any("adapter.up_weight" in k for k in state) and not [k for k in state if "trunk" in k and not is_adapter(k)]

    cfg = load_config(None, ["method=cbd", f"cbd.teacher_runs=[{run_dir}]", "model.backbone=digitsnet",
                             "train.epochs=1", f"run.storage_path={tmp_path / 'runs'}", "run.name=student"])
    student = Run(cfg)
    assert student.method.teacher_feature_dims() == [32] * K
    student.sampler.set_epoch(0)
    x, y = next(iter(student.train_loader))
    assert student.method.training_step(student.model, Batch(x, y)).total.isfinite()


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_trial_sweep_of_balpoe_with_k_adapters_on_one_trunk(ray_cluster, tmp_path):
    import pandas as pd

    from rayexperts.launch.sweep_space import load_space
    from rayexperts.launch.tune import run_sweep

    weights, space = tmp_path / "w.safetensors", tmp_path / "space.yaml"
    _pretrained(weights)
    space.write_text("train.lr: {choice: [0.001, 0.003]}\n")
    cfg = load_config(None, _balpoe(tmp_path, weights, "sweep", **{
        "train.epochs": 1, "tune.num_samples": 2, "tune.scheduler": "fifo", "scaling.cpus_per_worker": 1}))
    run_sweep(cfg, load_space(space, cfg))
    trials = pd.read_parquet(tmp_path / "runs" / "sweep" / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all() and (trials["val_top1"] > 0).all()


def test_k_adapters_train_under_bf16_autocast_and_sync_bn_touches_only_batchnorm(tmp_path):
    """bf16 autocast (the engine's on CUDA, train.amp; here the CPU's): the stacked adapters run in bf16 and their
    fp32 parameters get fp32 gradients, logits within bf16 precision of fp32. SyncBatchNorm conversion (model.sync_bn)
    finds no BatchNorm in a ViT trunk and changes nothing; a CNN's BatchNorm layers are converted."""
    from torch import nn

    from rayexperts.engine.run import Run

    path = tmp_path / "w.safetensors"
    _pretrained(path)
    net, x = _experts(path, "adapter", "lora"), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.1)
        want = torch.stack(net(x).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.stack(net(x).logits)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=0.1, rtol=0.05)
    got.float().sum().backward()
    lora_b = [p for n, p in net.named_parameters() if n.endswith("lora_b")]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in lora_b)

    vit = load_config(None, _balpoe(tmp_path, path, "syncbn", **{"model.sync_bn": True, "scaling.num_workers": 2}))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in Run(vit, 0, 2).model.modules())
    cnn = load_config(None, quick_overrides(tmp_path, "cnn", **{"model.sync_bn": True, "scaling.num_workers": 2}))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in Run(cnn, 0, 2).model.modules())


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_train_workers_fine_tune_k_adapters_on_a_frozen_trunk_under_ddp(ray_cluster, tmp_path):
    """2 Ray Train workers (DDP over gloo, find_unused_parameters=False): BalPoE with 3 LoRA experts on a frozen
    timm trunk trains an epoch (22 steps of 2 x 32 images); DDP leaves the frozen trunk out (requires_grad=False)
    and every adapter and head is used in each step, so no unused-parameter error; the adapters moved from zero."""
    from rayexperts.launch.train import run_training
    from rayexperts.rundir import load_checkpoint

    weights = tmp_path / "w.safetensors"
    _pretrained(weights)
    cfg = load_config(None, _balpoe(tmp_path, weights, "ddp", **{
        "model.finetune": "lora", "scaling.num_workers": 2, "scaling.cpus_per_worker": 1, "train.epochs": 1}))
    run_training(cfg)
    run_dir = tmp_path / "runs" / "ddp"
    state = load_checkpoint(max(p for p in run_dir.glob("checkpoint_*") if p.is_dir()))["model"]
    assert state and all(is_adapter(k) or k.startswith("heads.") for k in state)
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_b"))
    import pandas as pd

    assert list(pd.read_parquet(run_dir / "metrics.parquet")["epoch"].unique()) == [0]
