"""Backbones by name (``rayexperts.registry.BACKBONES``): the CIFAR family (``resnet_cifar``) and
torchvision's ImageNet ResNets (registered here).

torchvision models are re-cut into ``stem`` = conv1/bn1/relu/maxpool and ``stages`` =
layer1..layer4; the ``fc`` head is dropped. Weights come from a local file (``weights=``);
torchvision's ImageNet weights are fetched only with ``allow_download=True``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rayexperts.errors import ConfigError
from rayexperts.models.base import Backbone, BackboneEntry, PooledStages, scale_width
from rayexperts.registry import BACKBONES


@dataclass(frozen=True)
class _Torchvision:
    factory: str  # torchvision.models.<factory>
    layers: tuple[int, int, int, int]  # Bottleneck blocks per stage
    groups: int = 1
    width_per_group: int = 64


_TORCHVISION: dict[str, _Torchvision] = {
    "resnet50": _Torchvision("resnet50", (3, 4, 6, 3)),
    "resnext50_32x4d": _Torchvision("resnext50_32x4d", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnet152": _Torchvision("resnet152", (3, 8, 36, 3)),
}
_DOWNLOAD_WEIGHTS = "IMAGENET1K_V1"  # the original ImageNet weights the papers' code bases load
_PLANES = (64, 128, 256, 512)  # torchvision's per-stage bottleneck planes
_EXPANSION = 4  # torchvision's Bottleneck.expansion

# torchvision state_dict names → this package's Backbone names.
_RENAMES = (("conv1.", "stem.conv1."), ("bn1.", "stem.bn1."),
            *((f"layer{i + 1}.", f"stages.{i}.") for i in range(4)))


def _entry(name: str) -> BackboneEntry:
    try:
        return BACKBONES.get(name)
    except ConfigError as e:
        raise ValueError(str(e)) from e


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    weights: str | os.PathLike | None = None,
    allow_download: bool = False,
    **options: Any,
) -> Backbone:
    """Build backbone ``name``; load ``weights`` (a local state_dict file) when given.

    ``allow_download`` lets torchvision fetch its ImageNet weights (torchvision backbones
    only, ignored when ``weights`` is given); nothing is downloaded otherwise.
    """
    entry = _entry(name)
    backbone = entry.build(in_channels, allow_download and weights is None, **options)
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def expert_stages(name: str, start_stage: int, width: float, in_channels: int, **options: Any) -> tuple[nn.Module, int]:
    """Fresh stages ``start_stage..end`` of ``name`` with filters × ``width``, fed ``in_channels``
    channels, followed by global average pooling; returns the module and its output dimension."""
    entry = _entry(name)
    if not 0 <= start_stage <= entry.num_stages:
        raise ValueError(f"start_stage must lie in [0, {entry.num_stages}] for '{name}', got {start_stage}")
    return entry.expert_stages(start_stage, width, in_channels, **options)


def load_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load a local state_dict into ``backbone``: torchvision's layout (``conv1``/``bn1``/``layerN``,
    an ``fc.`` head is dropped) or this package's (``stem``/``stages``). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"expected a state_dict (a mapping of tensors), got {type(state).__name__}")
        backbone.load_state_dict(_backbone_keys(state))
    except Exception as e:
        raise ValueError(f"backbone weights file '{path}' does not fit this backbone: {e}") from e


def _backbone_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _torchvision_shortcut(name: str, shortcut: str) -> None:
    if shortcut != "B":
        raise ValueError(f"model.shortcut={shortcut!r}: torchvision's {name} has projection shortcuts (B) only; "
                         "set model.shortcut=B")


def _torchvision_backbone(name: str, in_channels: int = 3, download: bool = False, shortcut: str = "B") -> Backbone:
    from torchvision import models as tvm

    _torchvision_shortcut(name, shortcut)

    if download and in_channels != 3:
        raise ValueError(f"ImageNet weights for '{name}' need 3 input channels, got {in_channels}")
    net = getattr(tvm, _TORCHVISION[name].factory)(weights=_DOWNLOAD_WEIGHTS if download else None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        _torchvision_init(net.conv1)
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, stages, [p * _EXPANSION for p in _PLANES])


def _torchvision_stages(name: str, start: int, width: float, in_channels: int,
                        shortcut: str = "B") -> tuple[nn.Module, int]:
    """torchvision's own ``_make_layer`` at planes × ``width``, on a throw-away ResNet whose
    ``inplanes`` is set to ``in_channels`` (groups and width per group as ``name``)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    _torchvision_shortcut(name, shortcut)

    spec = _TORCHVISION[name]
    shell = ResNet(Bottleneck, [1, 1, 1, 1], groups=spec.groups, width_per_group=spec.width_per_group)
    shell.inplanes = in_channels
    stages = [
        shell._make_layer(Bottleneck, scale_width(_PLANES[i], width), spec.layers[i], stride=1 if i == 0 else 2)
        for i in range(start, len(_PLANES))
    ]
    for stage in stages:
        _torchvision_init(stage)
    return PooledStages(*stages), shell.inplanes  # _make_layer leaves inplanes at the last stage's output channels


def _torchvision_init(module: nn.Module) -> None:
    """Convolutions as torchvision's ResNet.__init__ initialises them (layers built after it would
    keep PyTorch's default init; BatchNorm's default already matches)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


for _name in _TORCHVISION:
    BACKBONES.register(_name, BackboneEntry(
        partial(_torchvision_backbone, _name), partial(_torchvision_stages, _name), len(_PLANES), downloadable=True))
