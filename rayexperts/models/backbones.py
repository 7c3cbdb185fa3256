"""Backbones by name (``rayexperts.registry.BACKBONES``): the CIFAR family (``resnet_cifar``) and
torchvision's ImageNet ResNets (registered here), and any timm model as ``timm/<name>`` (docs/pretrained.md).

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
from typing import Any

import torch
from torch import Tensor, nn

from rayexperts.errors import ConfigError
from rayexperts.models.base import Backbone, BackboneEntry, PooledStages, scale_width
from rayexperts.models.weights import load_into, read_state_dict
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


TIMM_PREFIX = "timm/"  # model.backbone=timm/<name>: any timm model (docs/pretrained.md)


def is_timm(name: str) -> bool:
    """Whether backbone ``name`` is a timm model (``timm/<name>``)."""
    return str(name).startswith(TIMM_PREFIX)


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    weights: str | os.PathLike | None = None,
    allow_download: bool = False,
    pretrained: bool = False,
    weights_strict: bool = True,
    timm_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Build backbone ``name``; load ``weights`` (a local weights file, docs/pretrained.md) when given.

    ``allow_download`` lets torchvision fetch its ImageNet weights (torchvision backbones only, ignored when
    ``weights`` is given); a timm backbone (``timm/<name>``) fetches its weights from timm's hub only with
    ``pretrained`` and ``allow_download``. Nothing is downloaded otherwise.
    """
    if is_timm(name):
        backbone: nn.Module = TimmBackbone(name, in_channels, download=pretrained and allow_download and weights is None,
                                           timm_kwargs=timm_kwargs)
    else:
        backbone = _entry(name).build(in_channels, allow_download and weights is None, **options)
    if weights is not None:
        load_weights(backbone, weights, strict=weights_strict)
    return backbone


class TimmBackbone(nn.Module):
    """A timm model without its classifier (``num_classes=0``): image → pooled pre-logits feature
    ``[B, out_dim]``, ``out_dim`` = the model's ``num_features``. The whole model is one trunk (no stages); with
    ``tokens`` (a trunk whose last blocks the experts own, ``model.expert_part=blocks``) its unpooled tokens."""

    def __init__(self, name: str, in_channels: int = 3, *, download: bool = False,
                 timm_kwargs: Mapping[str, Any] | None = None) -> None:
        import timm

        super().__init__()
        model_name = name[len(TIMM_PREFIX):] if is_timm(name) else name
        try:
            self.net = timm.create_model(model_name, pretrained=download, num_classes=0, in_chans=in_channels,
                                         **dict(timm_kwargs or {}))
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"model.backbone={name}: timm has no model {model_name!r} (timm.list_models() "
                                  "lists them)") from e
            raise
        self.out_dim = int(self.net.num_features)
        self.tokens = False
        self.classifier_name = str(getattr(self.net, "pretrained_cfg", {}).get("classifier") or "")

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x) if self.tokens else self.net(x)

    def file_key(self, key: str) -> str | None:
        """A weights file's key (timm's own names) → this module's; the file's classifier is dropped."""
        head = self.classifier_name
        if head and (key == head or key.startswith(head + ".")):
            own = self.__dict__.setdefault("_own_keys", set(self.state_dict()))
            if f"net.{key}" not in own:
                return None
        return f"net.{key}"


def timm_data_config(model: nn.Module) -> dict[str, Any] | None:
    """The preprocessing the first timm backbone in ``model`` was trained with (``timm.data.resolve_data_config``
    on its pretrained config: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``); None without one."""
    net = next((m.net for m in model.modules() if isinstance(m, TimmBackbone)), None)
    if net is None:
        return None
    from timm.data import resolve_data_config

    return dict(resolve_data_config({}, model=net))


def check_backbone(model_cfg: Any, in_channels: int) -> None:
    """The driver's check of a pretrained backbone's keys before Ray starts, on a backbone built on the meta device
    (no memory, no init): a timm name timm lacks, ``model.weights`` (the file is read whole, so a truncated one is
    refused, and its shapes compared), a fine-tuning mode that finds nothing to adapt and ``model.expert_part=blocks``
    on a model whose last ``model.expert_blocks`` blocks cannot be split off."""
    from rayexperts.models.expert_parts import last_blocks_check
    from rayexperts.models.finetune import apply_finetune, finetune_options

    with torch.device("meta"):
        backbone = build_backbone(str(model_cfg.backbone), in_channels=in_channels,
                                  timm_kwargs=dict(model_cfg.get("timm_kwargs") or {}),
                                  **({} if is_timm(model_cfg.backbone) else {"shortcut": str(model_cfg.shortcut)}))
    if model_cfg.get("weights"):
        load_weights(backbone, model_cfg.weights, strict=bool(model_cfg.get("weights_strict", True)))
    if model_cfg.get("expert_part", "head") == "blocks" and isinstance(backbone, TimmBackbone):
        last_blocks_check(backbone.net, int(model_cfg.get("expert_blocks", 1)), str(model_cfg.backbone))
    with torch.device("meta"):
        apply_finetune([backbone], **finetune_options(model_cfg))


def expert_stages(name: str, start_stage: int, width: float, in_channels: int, **options: Any) -> tuple[nn.Module, int]:
    """Fresh stages ``start_stage..end`` of ``name`` with filters × ``width``, fed ``in_channels``
    channels, followed by global average pooling; returns the module and its output dimension."""
    entry = _entry(name)
    if not 0 <= start_stage <= entry.num_stages:
        raise ValueError(f"start_stage must lie in [0, {entry.num_stages}] for '{name}', got {start_stage}")
    return entry.expert_stages(start_stage, width, in_channels, **options)


def load_weights(backbone: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load weights file ``path`` into ``backbone`` (:mod:`rayexperts.models.weights`: safetensors, .pth/.pt/.bin,
    nested ``state_dict``/``model``, ``module.``): a timm backbone takes timm's names (its classifier is
    dropped); a torchvision one torchvision's layout (``conv1``/``bn1``/``layerN``, ``fc.`` dropped) or this
    package's (``stem``/``stages``). Errors are one line naming the file (:class:`WeightsError`)."""
    rename = backbone.file_key if isinstance(backbone, TimmBackbone) else _backbone_key
    load_into(backbone, read_state_dict(path), path, strict=strict, rename=rename)


def _backbone_key(key: str) -> str | None:
    if key.startswith("fc."):
        return None
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


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
