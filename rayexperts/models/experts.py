"""K experts on one backbone family: a shared trunk (MLLT) or K independent networks (NCL, ECL, CBD).

Expert ``k`` maps an image to its feature ``v^k`` (optionally projected, CBD_ENS's ``h``),
then to logits ``z^k`` with its own classifier; ECL adds a second (``ref``) head and NCL/ECL a
MoCo branch per expert (METHODS.md).
"""

from __future__ import annotations

import copy
import os

from omegaconf import DictConfig
from torch import Tensor, nn

from rayexperts.models.backbones import build_backbone, expert_stages
from rayexperts.models.base import PooledStages
from rayexperts.models.heads import build_classifier
from rayexperts.models.moco import MocoBranch, MocoConfig
from rayexperts.models.output import ModelOutput


class MultiExpertNet(nn.Module):
    """``forward(x, x_key=None) -> ModelOutput``.

    ``shared_stages = 0``: K independent whole networks (NCL, ECL). ``shared_stages = s ≥ 1``: one
    trunk (stem + first ``s`` stages, full width) and per expert a fresh copy of the remaining
    stages with filters × ``expert_width`` (MLLT / RIDE); with pretrained weights and
    ``expert_width = 1`` the experts start from copies of the pretrained stages instead. K = 1 is
    a plain single network whatever ``shared_stages`` says.

    In training mode, with ``x_key`` and ``moco`` given, the output also holds per expert the
    query ``normalize(proj(v))`` of this forward pass, the key of ``x_key`` from the momentum
    encoder (updated first), and a snapshot of the queue before this batch's keys are enqueued.
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
        ref_head: bool = False,
        feature_proj_dim: int = 0,
        moco: MocoConfig | None = None,
        weights: str | os.PathLike | None = None,
        allow_download: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}")
        if num_experts == 1:
            shared_stages = 0
        load = dict(in_channels=in_channels, weights=weights, allow_download=allow_download)
        if shared_stages == 0:
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
                built = [expert_stages(backbone, shared_stages, expert_width, trunk_out) for _ in range(num_experts)]
                experts, dim = [m for m, _ in built], built[0][1]
            self.experts = nn.ModuleList(experts)
        self.projs = (  # CBD_ENS's h: R^d → R^proj; the classifier sits on h(v)
            nn.ModuleList(nn.Linear(dim, feature_proj_dim) for _ in range(num_experts))
            if feature_proj_dim > 0 else None
        )
        self.feature_dim = feature_proj_dim or dim
        self.heads = nn.ModuleList(
            build_classifier(classifier, self.feature_dim, num_classes, cosine_scale) for _ in range(num_experts)
        )
        self.ref_heads = (
            nn.ModuleList(build_classifier(classifier, self.feature_dim, num_classes, cosine_scale)
                          for _ in range(num_experts))
            if ref_head else None
        )
        self.moco = (
            nn.ModuleList(MocoBranch(self.encoder(k), self.feature_dim, moco) for k in range(num_experts))
            if moco is not None else None
        )

    @property
    def num_experts(self) -> int:
        return len(self.heads)

    def encoder(self, k: int) -> nn.Sequential:
        """Expert ``k``'s image → feature path (trunk, expert stages, projection ``h``); shares modules."""
        parts = [self.trunk, self.experts[k]] + ([self.projs[k]] if self.projs is not None else [])
        return nn.Sequential(*parts)

    def forward(self, x: Tensor, x_key: Tensor | None = None) -> ModelOutput:
        shared = self.trunk(x)
        feats = [expert(shared) for expert in self.experts]
        if self.projs is not None:
            feats = [h(v) for h, v in zip(self.projs, feats)]
        out = ModelOutput(features=feats, logits=[head(v) for head, v in zip(self.heads, feats)])
        if self.ref_heads is not None:
            out.ref_logits = [head(v) for head, v in zip(self.ref_heads, feats)]
        if self.training and x_key is not None and self.moco is not None:
            out.queries = [branch.query(v) for branch, v in zip(self.moco, feats)]
            out.keys = [branch.keys(self.encoder(k), x_key) for k, branch in enumerate(self.moco)]
            out.queues = [branch.queue.detach().clone() for branch in self.moco]
            for branch, keys in zip(self.moco, out.keys):
                branch.enqueue(keys)
        return out


def build_model(
    model_cfg: DictConfig,
    num_classes: int,
    in_channels: int,
    *,
    shared_trunk: bool,
    ref_head: bool = False,
    moco: bool = False,
    feature_proj_dim: int = 0,
) -> MultiExpertNet:
    """A :class:`MultiExpertNet` from ``cfg.model`` (``ModelConfig``); ``shared_trunk`` selects MLLT's
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
        ref_head=ref_head,
        feature_proj_dim=feature_proj_dim,
        moco=MocoConfig(model_cfg.moco_dim, model_cfg.moco_hidden, model_cfg.moco_queue, model_cfg.moco_momentum)
        if moco else None,
        weights=model_cfg.weights,
        allow_download=model_cfg.allow_download,
    )
