"""Where the published numbers depend on the authors' code (docs/methods.md "Checked against the official
code"): NBOD's normaliser, the hard set's size, option-A CIFAR ResNets, RIDE's trunk for MLLT, CBD_ENS's
projection, and ``compat=official``, which switches each of them; ``python -m rayexperts.models summary``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rayexperts.config import ConfigError, load_config
from rayexperts.methods.cbd import ClassBalancedDistillation
from rayexperts.methods.ncl import NestedCollaborative
from rayexperts.models import L2Normalize, MultiExpertNet, build_backbone
from rayexperts.models.__main__ import build
from rayexperts.models.summary import parameter_table


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("classes, ratio, paper, official", [
    (100, 0.3, 30, 29),  # β·C = 30: 30 others + the target, or 30 classes in all
    (365, 0.3, 110, 108),  # Places-LT: β·C = 109.5 rounds to 110 (int: 109 with the target)
    (10, 0.26, 3, 1),  # β·C = 2.6
])
def test_hard_set_size_paper_and_official(classes, ratio, paper, official):
    for count, expected in (("paper", paper), ("official", official)):
        cfg = load_config(None, ["method=ncl", f"ncl.hard_ratio={ratio}", f"ncl.hard_count={count}"])
        assert NestedCollaborative(cfg, torch.ones(classes)).num_hard == expected


def test_the_ncl_method_divides_l_dis_as_configured():
    from rayexperts import losses as L
    from rayexperts.models import ContrastiveOutput

    g = torch.Generator().manual_seed(0)
    out = ContrastiveOutput([torch.randn(4, 3, generator=g)] * 3, [torch.randn(4, 5, generator=g) for _ in range(3)])
    y, counts = torch.tensor([0, 1, 2, 3]), torch.tensor([40.0, 20, 10, 5, 2])
    terms = {}
    for norm in ("official", "paper"):
        cfg = load_config(None, ["method=ncl", "ncl.contrastive=false", f"ncl.distill_norm={norm}"])
        terms[norm] = NestedCollaborative(cfg, counts).loss(out, y).terms["dis"]
    torch.testing.assert_close(terms["official"], 3 * terms["paper"])  # K = 3: ÷(K−1) vs ÷K(K−1)
    mask = L.hard_category_mask(out.logits[0], y, 2)  # round(0.3 · 5) = 2
    torch.testing.assert_close(terms["official"], 0.6 * L.nbod_loss(out.logits, counts, mask, norm="official"))
    with pytest.raises(ConfigError, match="renamed: use 'ncl.distill_norm'"):
        load_config(None, ["method=ncl", "loss.bod_norm=paper"])


def test_cifar_resnets_have_option_a_shortcuts_by_default():
    a = MultiExpertNet(backbone="resnet32", num_classes=10)
    assert n_params(a) == 464_154  # the reference count of LDAM-DRW / RIDE / NCL's ResNet-32
    b = MultiExpertNet(backbone="resnet32", num_classes=10, backbone_options={"shortcut": "B"})
    assert n_params(b) == 464_154 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1x1 conv + BN projections
    x = torch.randn(2, 3, 32, 32)
    assert a(x).logits[0].shape == b(x).logits[0].shape == (2, 10)
    block = build_backbone("resnet8").stages[1][0]
    padded = block.shortcut(torch.ones(1, 16, 8, 8))  # stride-2 subsample, 8 zero channels either side
    assert padded.shape == (1, 32, 4, 4) and padded[0, 8:24].eq(1).all() and padded[0, :8].eq(0).all()
    with pytest.raises(ValueError, match="model.shortcut='A'.*projection shortcuts \\(B\\) only"):
        build_backbone("resnet50", shortcut="A")
    cfg = load_config(None, ["data.name=imagenet-lt"])
    assert cfg.model.shortcut == "B" and cfg.model.shared_stages == 2


def test_mllt_cifar_preset_is_rides_layout():
    cfg = load_config("cifar100_lt_if100_mllt")
    model, shape = build(cfg)
    assert shape == (3, 32, 32) and model.num_experts == 3
    parts = parameter_table(model).set_index("part")["trainable"].to_dict()
    stem_and_stage1 = (3 * 16 * 9 + 32) + 5 * 2 * (16 * 16 * 9 + 32)
    stage2 = (16 * 24 * 9 + 48) + (24 * 24 * 9 + 48) + 4 * 2 * (24 * 24 * 9 + 48)  # 0.75 × 32 = 24 channels
    stage3 = (24 * 48 * 9 + 96) + (48 * 48 * 9 + 96) + 4 * 2 * (48 * 48 * 9 + 96)  # 0.75 × 64 = 48 channels
    assert parts == {"trunk": stem_and_stage1, **{f"expert{k}": stage2 + stage3 for k in range(3)},
                     **{f"head{k}": 100 * 48 for k in range(3)}}  # cosine classifiers: no bias
    assert [s[0].conv1.out_channels for s in model.experts[0]] == [24, 48]
    literal = build(load_config("cifar100_lt_if100_mllt", ["model.shared_stages=2"]))[0]
    assert n_params(literal.trunk) > stem_and_stage1 and literal.feature_dim == 48


def test_compat_official_switches_every_row_with_an_official_form():
    paper = load_config(None, ["method=ncl"])
    assert (paper.compat, paper.ncl.hard_count, paper.ncl.hard_mode, paper.ncl.distill_norm) == \
        ("paper", "paper", "restrict", "official")
    ncl = load_config(None, ["method=ncl", "compat=official"])
    assert (ncl.ncl.hard_count, ncl.ncl.hard_mode, ncl.ncl.distill_norm) == ("official", "mask", "official")
    assert "compat official (ncl)" in ncl.layers and ncl.model.shortcut == "A"
    cbd = load_config("cbd_digits", ["compat=official"])
    assert (cbd.cbd.projection, cbd.model.cosine_scale) == ("mlp", 20.0)
    assert load_config("cbd_digits").cbd.projection == "linear"
    assert load_config(None, ["method=ncl", "compat=official", "ncl.hard_mode=restrict"]).ncl.hard_mode == "restrict"
    with pytest.raises(ConfigError, match="'authors' for 'compat': choose paper or official"):
        load_config(None, ["compat=authors"])


def test_cbd_ens_projection_linear_or_the_codes_mlp():
    for compat, kind in (("paper", torch.nn.Linear), ("official", torch.nn.Sequential)):
        cfg = load_config("cbd_digits", [f"compat={compat}"])
        student = ClassBalancedDistillation(cfg, torch.ones(10), 1).build_model()  # h sized from cbd.teachers
        h = student.necks[0]
        assert isinstance(h, kind) and student.feature_dim == 4 * 128
    assert isinstance(h[1], torch.nn.ReLU) and isinstance(h[2], L2Normalize) and student.heads[0].scale == 20.0
    v = student(torch.randn(5, 1, 8, 8)).features[0]
    torch.testing.assert_close(v.norm(dim=1), torch.ones(5))
    assert (v >= 0).all()


def test_summary_command_prints_the_reference_count():
    done = subprocess.run([sys.executable, "-m", "rayexperts.models", "summary", "method=ce", "data.name=cifar10-lt"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "total parameters: 464154" in done.stdout and "expert0" in done.stdout and "head0" in done.stdout
    assert "multiply-accumulates per image: 6886" in done.stdout  # about 69 M for ResNet-32
    bad = subprocess.run([sys.executable, "-m", "rayexperts.models", "summary", "model.backbone=resnet33"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model.backbone='resnet33'" in bad.stderr
