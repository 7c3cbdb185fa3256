"""Backbones, heads and multi-expert layouts of ``rayexperts.models`` (MoCo: test_models_moco.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from rayexperts.config import ModelSection
from rayexperts.models import (
    CosineClassifier,
    LinearClassifier,
    MocoConfig,
    MocoExperts,
    MultiExpertNet,
    WithExtraHeads,
    build_backbone,
    build_classifier,
    build_experts,
    expert_stages,
    find_experts,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,blocks", [("resnet8", 1), ("resnet20", 3), ("resnet32", 5)])
def test_cifar_backbones(name: str, blocks: int) -> None:
    net = build_backbone(name)
    assert net.stage_channels == [16, 32, 64] and net.out_dim == 64
    assert [len(s) for s in net.stages] == [blocks] * 3
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_resnet32_size_and_reduced_width() -> None:
    assert 0.46e6 < n_params(build_backbone("resnet32")) < 0.47e6
    expert, dim = expert_stages("resnet32", 2, 0.75, 32)  # RIDE's reduced dimension: 64 × 0.75
    assert dim == 48
    assert expert(torch.randn(2, 32, 16, 16)).shape == (2, 48)


def test_digitsnet() -> None:
    net = build_backbone("digitsnet", in_channels=1)
    assert net.stage_channels == [32, 64, 128] and net.stem[0].out_channels == 32
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 128)


def test_cosine_classifier_by_hand() -> None:
    head = CosineClassifier(2, 2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -3.0]]))
    z = head(torch.tensor([[3.0, 4.0]]))  # normalize(v) = (0.6, 0.8); normalize(W) rows = e1, -e2
    assert torch.allclose(z, torch.tensor([[6.0, -8.0]]))
    z = CosineClassifier(16, 5, scale=7.0)(100 * torch.randn(8, 16))
    assert z.abs().max() <= 7.0 + 1e-5
    assert isinstance(build_classifier("linear", 4, 3), LinearClassifier)
    with pytest.raises(ValueError, match="cosine"):
        build_classifier("mlp", 4, 3)


def test_shared_trunk_params_between_one_and_two_networks() -> None:
    single = MultiExpertNet(backbone="resnet32", num_classes=10)
    mllt = MultiExpertNet(backbone="resnet32", num_classes=10, num_experts=3, shared_stages=2,
                          expert_width=0.75, classifier="cosine")
    assert 1.0 < n_params(mllt) / n_params(single) < 2.0
    assert mllt.feature_dim == 48
    out = mllt(torch.randn(2, 3, 32, 32))
    assert out.num_experts == 3 and out.aux == {}
    assert [f.shape for f in out.features] == [(2, 48)] * 3 and [z.shape for z in out.logits] == [(2, 10)] * 3


def test_independent_experts_are_k_whole_networks() -> None:
    net = MultiExpertNet(backbone="resnet8", num_classes=10, num_experts=3)
    backbone, head = n_params(build_backbone("resnet8")), 64 * 10 + 10
    assert n_params(net) == 3 * (backbone + head)
    assert not torch.equal(net.experts[0].stem[0].weight, net.experts[1].stem[0].weight)


def test_single_expert_ignores_shared_stages() -> None:
    net = MultiExpertNet(backbone="resnet8", num_classes=10, shared_stages=2, expert_width=0.75)
    assert n_params(net) == n_params(build_backbone("resnet8")) + 64 * 10 + 10


def test_extra_heads_and_a_neck() -> None:
    x = torch.randn(2, 1, 8, 8)
    net = MultiExpertNet(backbone="digitsnet", in_channels=1, num_classes=10, num_experts=2)
    extra = WithExtraHeads(net, "ref", torch.nn.ModuleList(torch.nn.Linear(128, 10) for _ in range(2)))
    out = extra(x)
    assert len(out.aux["ref"]) == 2 and out.aux["ref"][0].shape == (2, 10)
    assert torch.allclose(out.aux["ref"][1], extra.aux_heads[1](out.features[1]))
    assert find_experts(extra) is net and extra.feature_dim == 128 and extra.num_experts == 2
    necked = MultiExpertNet(backbone="digitsnet", in_channels=1, num_classes=10, classifier="cosine",
                            neck=lambda d: (torch.nn.Linear(d, 256), 256))
    out = necked(x)
    assert out.features[0].shape == (2, 256) and necked.heads[0].weight.shape == (10, 256)
    assert torch.allclose(out.logits[0], necked.heads[0](out.features[0]))


def test_build_experts_reads_model_config() -> None:
    cfg = OmegaConf.structured(ModelSection(backbone="resnet8", num_experts=3, classifier="cosine"))
    mllt = build_experts(cfg, 10, 3, shared_trunk=True)
    assert isinstance(mllt.trunk, torch.nn.Sequential) and mllt.feature_dim == 48
    assert isinstance(mllt.heads[0], CosineClassifier)
    ncl = MocoExperts(build_experts(cfg, 10, 3, shared_trunk=False), MocoConfig(queue_size=32))
    assert isinstance(ncl.net.trunk, torch.nn.Identity) and ncl.net.feature_dim == 64
    branch = ncl.branches[0]
    assert branch.queue.shape == (32, 64) and branch.proj[0].out_features == 64 and branch.momentum == 0.999


def test_unknown_backbone_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet32.*resnext50_32x4d"):
        build_backbone("resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        expert_stages("vgg", 1, 1.0, 3)


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def test_torchvision_backbones_build_without_download(no_download: None) -> None:
    net = build_backbone("resnet50")
    assert net.stage_channels == [256, 512, 1024, 2048] and list(net.stem) == [
        net.stem.conv1, net.stem.bn1, net.stem.relu, net.stem.maxpool]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    expert, dim = expert_stages("resnext50_32x4d", 3, 0.75, 1024)  # planes 512 → 384, × 4 expansion
    assert dim == 1536 and expert[0][0].conv2.groups == 32
    assert expert(torch.randn(1, 1024, 4, 4)).shape == (1, 1536)
    _, dim = expert_stages("resnet152", 4, 0.75, 2048)  # nothing left: pooling only
    assert dim == 2048


def test_weights_file_round_trip(tmp_path, no_download: None) -> None:
    tv = torchvision.models.resnet50()  # torchvision layout, fc head included
    torch.save(tv.state_dict(), tmp_path / "r50.pt")
    net = build_backbone("resnet50", weights=tmp_path / "r50.pt")
    assert torch.equal(net.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(net.stages[3][2].conv3.weight, tv.layer4[2].conv3.weight)

    small = build_backbone("resnet8")  # this package's layout
    torch.save(small.state_dict(), tmp_path / "r8.pt")
    loaded = build_backbone("resnet8", weights=str(tmp_path / "r8.pt"))
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="r8.pt"):
        build_backbone("resnet20", weights=tmp_path / "r8.pt")
    with pytest.raises(ValueError, match="missing.pt.*does not exist"):  # WeightsError: a ConfigError (exit 2)
        build_backbone("resnet8", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="no downloadable weights"):
        build_backbone("resnet8", allow_download=True)


def test_allow_download_fetches_imagenet_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    tv = torchvision.models.resnet50()
    fetched = []

    def fake_fetch(weights: torchvision.models.WeightsEnum, *args: object, **kwargs: object) -> dict:
        fetched.append(weights)
        return tv.state_dict()

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_fetch)
    net = build_backbone("resnet50", allow_download=True)
    assert fetched == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1]
    assert torch.equal(net.stages[0][0].conv1.weight, tv.layer1[0].conv1.weight)
