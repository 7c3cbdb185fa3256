"""CIFAR ResNets (He et al. 2016, §4.2) and ``digitsnet``, a member of the same family for 8x8 digits.

A 3x3 stem (conv–BN–ReLU, no max-pool) and three stages of basic blocks; ResNet-32 is
3 stages × 5 blocks at widths 16/32/64 (docs/methods.md "Two-stage backbones").

Shortcut where a block changes shape (``model.shortcut``): option A (default, docs/methods.md "Checked
against the official code" row 3), parameter-free: the input subsampled by the stride and its channels
zero-padded, split evenly before and after, as LDAM-DRW, RIDE, NCL and BalPoE construct their CIFAR
ResNets (ResNet-32 for 10 classes: 464,154 parameters); option B, a 1x1 conv + BN projection (He et
al.'s option B, 0.47M). Convolutions are initialised with ``kaiming_normal_`` as in LDAM-DRW.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from rayexperts.models.base import Backbone, BackboneEntry, PooledStages, scale_width
from rayexperts.registry import BACKBONES


@dataclass(frozen=True)
class CifarSpec:
    stem_width: int
    widths: tuple[int, ...]
    blocks: int  # per stage
    strides: tuple[int, ...] = (1, 2, 2)


SPECS: dict[str, CifarSpec] = {
    "resnet8": CifarSpec(16, (16, 32, 64), 1),
    "resnet20": CifarSpec(16, (16, 32, 64), 3),
    "resnet32": CifarSpec(16, (16, 32, 64), 5),
    "digitsnet": CifarSpec(32, (32, 64, 128), 1),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: ``x`` subsampled by ``stride`` and zero-padded from ``in_ch`` to ``out_ch`` channels
    (half the new channels before, half after, as RIDE's ``(planes - in_planes) // 2``); no parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"shortcut A cannot narrow {in_ch} to {out_ch} channels: use model.shortcut=B")
        self.stride, self.before, self.after = stride, (out_ch - in_ch) // 2, out_ch - in_ch - (out_ch - in_ch) // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.before}, {self.after})"


class BasicBlock(nn.Module):
    """conv3x3–BN–ReLU–conv3x3–BN, plus the input (through a shortcut where the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_ch, out_ch, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
                )
            else:
                raise ValueError(f"unknown model.shortcut={shortcut!r}: choose A or B")

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


def cifar_stages(name: str, start: int, width: float, in_channels: int,
                 shortcut: str = "A") -> tuple[list[nn.Sequential], list[int]]:
    """Stages ``start..end`` of ``name`` with filters × ``width``, fed ``in_channels`` channels."""
    spec = SPECS[name]
    stages, channels = [], []
    for i in range(start, len(spec.widths)):
        out_ch = scale_width(spec.widths[i], width)
        blocks = [BasicBlock(in_channels if b == 0 else out_ch, out_ch, spec.strides[i] if b == 0 else 1, shortcut)
                  for b in range(spec.blocks)]
        stages.append(nn.Sequential(*blocks))
        channels.append(out_ch)
        in_channels = out_ch
    for stage in stages:
        _init(stage)
    return stages, channels


def cifar_resnet(name: str, in_channels: int = 3, shortcut: str = "A") -> Backbone:
    """The full network ``name`` (a key of :data:`SPECS`) for ``in_channels``-channel images."""
    spec = SPECS[name]
    stem = nn.Sequential(
        _conv3x3(in_channels, spec.stem_width), nn.BatchNorm2d(spec.stem_width), nn.ReLU(inplace=True)
    )
    _init(stem)
    stages, channels = cifar_stages(name, 0, 1.0, spec.stem_width, shortcut)
    return Backbone(stem, stages, channels)


def cifar_expert_stages(name: str, start: int, width: float, in_channels: int,
                        shortcut: str = "A") -> tuple[PooledStages, int]:
    """Stages ``start..end`` at ``width`` followed by global pooling, and their output dimension."""
    stages, channels = cifar_stages(name, start, width, in_channels, shortcut)
    return PooledStages(*stages), channels[-1] if channels else in_channels


def _build(name: str, in_channels: int = 3, download: bool = False, shortcut: str = "A") -> Backbone:
    if download:
        raise ValueError(f"backbone '{name}' has no downloadable weights; give a local file with model.weights=")
    return cifar_resnet(name, in_channels, shortcut)


for _name, _spec in SPECS.items():
    BACKBONES.register(_name, BackboneEntry(partial(_build, _name), partial(cifar_expert_stages, _name), len(_spec.widths)))


def resnet8(in_channels: int = 3, shortcut: str = "A") -> Backbone:
    """1 basic block per stage, widths 16/32/64."""
    return cifar_resnet("resnet8", in_channels, shortcut)


def resnet20(in_channels: int = 3, shortcut: str = "A") -> Backbone:
    """3 basic blocks per stage, widths 16/32/64."""
    return cifar_resnet("resnet20", in_channels, shortcut)


def resnet32(in_channels: int = 3, shortcut: str = "A") -> Backbone:
    """5 basic blocks per stage, widths 16/32/64 (the CIFAR-LT backbone of all four papers)."""
    return cifar_resnet("resnet32", in_channels, shortcut)


def digitsnet(in_channels: int = 1, shortcut: str = "A") -> Backbone:
    """For 8x8 digits: stem → 32, 1 basic block per stage, widths 32/64/128, strides 1/2/2."""
    return cifar_resnet("digitsnet", in_channels, shortcut)
