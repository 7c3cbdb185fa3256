"""K experts on one backbone: a shared trunk (RIDE / MLLT layout) or K independent networks.

Expert ``k`` maps an image to its feature ``v^k`` (through an optional per-expert ``neck`` a
method supplies, e.g. a projection), then to logits ``z^k`` with its own classifier. Methods add
what else they need around this (extra heads, a MoCo branch); the model knows no method.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from rayexperts.errors import ConfigError
from rayexperts.models.backbones import (
    TimmBackbone,
    build_backbone,
    expert_stages,
    is_timm,
)
from rayexperts.models.base import PooledStages
from rayexperts.models.base import zero_init_residual as _zero_init_residual
from rayexperts.models.expert_parts import split_trunk
from rayexperts.models.finetune import apply_finetune, finetune_options, is_adapter
from rayexperts.models.heads import build_classifier
from rayexperts.models.output import ModelOutput

Neck = Callable[[int], tuple[nn.Module, int]]  # feature dim -> (module, its output dim)


class MultiExpertNet(nn.Module):
    """``forward(x) -> ModelOutput``.

    ``shared_stages = 0``: K independent whole networks. ``shared_stages = s ≥ 1``: one trunk
    (stem + first ``s`` stages, full width) and per expert a fresh copy of the remaining stages
    with filters × ``expert_width`` (RIDE's "reduced dimension"); with pretrained weights and
    ``expert_width = 1`` the experts start from copies of the pretrained stages instead. K = 1 is
    a plain single network whatever ``shared_stages`` says. ``neck`` (optional) builds a module
    between each expert's pooled feature and its classifier; the classifier sits on its output.
    ``cosine_bias`` adds a bias to cosine classifiers; ``zero_init_residual`` starts every residual
    block's last BatchNorm at γ = 0 (random initialisation only); ``head_init="kaiming_normal"`` redraws the
    linear classifiers' weights with ``kaiming_normal_`` (LDAM-DRW's ``_weights_init``; docs/compare.md).
    A timm backbone is one trunk: with ``shared_stages`` its K experts are heads on it (``expert_part="head"``);
    ``expert_part="adapter"`` or ``"blocks"`` puts K experts on one trunk for any method
    (:mod:`rayexperts.models.expert_parts`; docs/pretrained.md "Multi-expert methods on one trunk").
    """

    def __init__(
        self,
        *,
        backbone: str,
        num_classes: int,
        in_channels: int = 3,
        num_experts: int = 1,
        shared_stages: int = 0,
        expert_width: float = 1.0,
        classifier: str = "linear",
        cosine_scale: float = 16.0,
        cosine_bias: bool = False,
        zero_init_residual: bool = False,
        head_init: str = "default",
        neck: Neck | None = None,
        weights: str | os.PathLike | None = None,
        allow_download: bool = False,
        backbone_options: dict[str, Any] | None = None,
        pretrained: bool = False,
        weights_strict: bool = True,
        timm_kwargs: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
        expert_part: str = "head",
        expert_blocks: int = 1,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}")
        if head_init not in ("default", "kaiming_normal"):
            raise ValueError(f"unknown head_init {head_init!r}: choose default or kaiming_normal")
        if head_init != "default" and classifier != "linear":
            raise ValueError(f"head_init={head_init!r} applies to the linear classifier, not {classifier!r}")
        if num_experts == 1:
            shared_stages = 0
        self.finetune = dict(finetune or {"mode": "full"})
        options = dict(backbone_options or {})
        timm = is_timm(backbone)
        if timm:
            options = {}  # CIFAR/torchvision options (shortcut) do not apply to a timm model
        load = dict(in_channels=in_channels, weights=weights, allow_download=allow_download, pretrained=pretrained,
                    weights_strict=weights_strict, timm_kwargs=timm_kwargs, **options)
        # loaded or downloaded weights (pretrained parts: train.backbone_lr_scale; docs/pretrained.md)
        self.pretrained = weights is not None or (allow_download and (pretrained or not timm))
        finetune_parts, adapter_sets = None, 1
        if timm and num_experts > 1 and (shared_stages or expert_part != "head"):  # K experts on one timm trunk
            trunk = build_backbone(backbone, **load)
            dim = trunk.out_dim
            self.trunk, self.experts, finetune_parts, adapter_sets = split_trunk(
                trunk, expert_part, num_experts, self.finetune["mode"], expert_blocks=expert_blocks, name=backbone)
        elif shared_stages == 0:
            self.trunk: nn.Module = nn.Identity()
            self.experts = nn.ModuleList(build_backbone(backbone, **load) for _ in range(num_experts))
            dim = self.experts[0].out_dim
        else:
            full = build_backbone(backbone, **load)
            if not 1 <= shared_stages < len(full.stages):
                raise ValueError(
                    f"shared_stages must lie in [0, {len(full.stages) - 1}] for '{backbone}', got {shared_stages}"
                )
            self.trunk = nn.Sequential(full.stem, *full.stages[:shared_stages])
            rest = list(full.stages[shared_stages:])
            if (weights is not None or allow_download) and expert_width == 1:
                experts = [PooledStages(*copy.deepcopy(rest)) for _ in range(num_experts)]
                dim = full.out_dim
            else:
                trunk_out = full.stage_channels[shared_stages - 1]
                built = [expert_stages(backbone, shared_stages, expert_width, trunk_out, **options)
                         for _ in range(num_experts)]
                experts, dim = [m for m, _ in built], built[0][1]
            self.experts = nn.ModuleList(experts)
        if grad_checkpointing:
            nets = [m.net for m in self.modules() if isinstance(m, TimmBackbone)]
            if not nets:
                raise ConfigError(f"model.grad_checkpointing=true needs a timm backbone (timm/<name>), not {backbone}")
            for net in nets:
                net.set_grad_checkpointing(True)
        self.necks: nn.ModuleList | None = None
        if neck is not None:
            built_necks = [neck(dim) for _ in range(num_experts)]
            self.necks = nn.ModuleList(m for m, _ in built_necks)
            dim = built_necks[0][1]
        self.feature_dim = dim
        self.heads = nn.ModuleList(build_classifier(classifier, dim, num_classes, cosine_scale, cosine_bias)
                                   for _ in range(num_experts))
        if head_init == "kaiming_normal":
            for head in self.heads:
                nn.init.kaiming_normal_(head.weight)
        # after the heads (which always train), so that a seed draws the same heads in every mode
        apply_finetune(finetune_parts or [self.trunk, self.experts], **self.finetune, sets=adapter_sets)
        # what a checkpoint leaves out (rundir.model_state): the weights file holds them, named by its sha256
        self.frozen_by_finetune = [n for n, p in self.named_parameters() if not p.requires_grad] \
            if self.finetune["mode"] != "full" and weights is not None else []
        if zero_init_residual and weights is None and not allow_download:  # an initialisation, not for loaded weights
            _zero_init_residual(self)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The parameters that came from a weights file or a download (the trunk's and the experts' stages,
        without adapters); empty for a model trained from scratch."""
        if not self.pretrained:
            return []
        return [p for name, p in nn.ModuleDict({"trunk": self.trunk, "experts": self.experts}).named_parameters()
                if not is_adapter(name)]

    @property
    def num_experts(self) -> int:
        return len(self.heads)

    def encoder(self, k: int) -> nn.Sequential:
        """Expert ``k``'s image → feature path (trunk, expert stages, neck); shares modules."""
        parts = [self.trunk, self.experts[k]] + ([self.necks[k]] if self.necks is not None else [])
        return nn.Sequential(*parts)

    def forward(self, x: Tensor) -> ModelOutput:
        shared = self.trunk(x)
        feats = [expert(shared) for expert in self.experts]
        if self.necks is not None:
            feats = [h(v) for h, v in zip(self.necks, feats)]
        return ModelOutput(features=feats, logits=[head(v) for head, v in zip(self.heads, feats)])


def build_experts(
    model_cfg: Any, num_classes: int, in_channels: int, *, shared_trunk: bool, neck: Neck | None = None
) -> MultiExpertNet:
    """A :class:`MultiExpertNet` from the ``model.*`` config keys; ``shared_trunk`` selects the RIDE
    layout (``model.shared_stages`` at ``model.expert_width``), otherwise experts are independent."""
    return MultiExpertNet(
        backbone=model_cfg.backbone,
        num_classes=num_classes,
        in_channels=in_channels,
        num_experts=model_cfg.num_experts,
        shared_stages=model_cfg.shared_stages if shared_trunk else 0,
        expert_width=model_cfg.expert_width,
        classifier=model_cfg.classifier,
        cosine_scale=model_cfg.cosine_scale,
        cosine_bias=bool(model_cfg.cosine_bias),
        zero_init_residual=bool(model_cfg.zero_init_residual),
        head_init=str(model_cfg.head_init),
        neck=neck,
        weights=model_cfg.weights,
        allow_download=model_cfg.allow_download,
        backbone_options={"shortcut": str(model_cfg.shortcut)},
        pretrained=bool(model_cfg.get("pretrained", False)),
        weights_strict=bool(model_cfg.get("weights_strict", True)),
        timm_kwargs=dict(model_cfg.get("timm_kwargs") or {}),
        finetune=finetune_options(model_cfg),
        grad_checkpointing=bool(model_cfg.get("grad_checkpointing", False)),
        expert_part=str(model_cfg.get("expert_part", "head")),
        expert_blocks=int(model_cfg.get("expert_blocks", 1)),
    )


def find_experts(model: nn.Module) -> MultiExpertNet:
    """The :class:`MultiExpertNet` inside a method's model (the model itself, or a wrapper's ``net``)."""
    while not isinstance(model, MultiExpertNet):
        inner = getattr(model, "module", None) or getattr(model, "net", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} holds no MultiExpertNet (no 'net' attribute)")
        model = inner
    return model
