"""What a method provides to the engine: a model, its loss terms, its inference views.

The engine (``rayexperts.engine``) knows no method by name. It asks the method for
a model, feeds it batches, and calls :meth:`Method.training_step` and
:meth:`Method.predict`. A method module reads like its paper: build the model from the
config, compute the loss terms from the model outputs with ``rayexperts.losses``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from rayexperts.losses import pc_softmax_logits
from rayexperts.models.output import ModelOutput


@dataclass
class LossOutput:
    total: Tensor  # the scalar that is back-propagated
    terms: dict[str, Tensor] = field(default_factory=dict)  # weighted parts, logged as loss_<name>


@dataclass
class Batch:
    images: Tensor  # [B, ...] the (query) view
    targets: Tensor  # [B]
    key_images: Tensor | None = None  # MoCo key view, when the method asks for it


class Method:
    """Base class: a single-expert model trained with cross-entropy (override what differs)."""

    name: str = "base"
    uses_key_view: bool = False  # the data loader yields a second (MoCo) view
    default_sampler: str = "instance"
    pc_views: bool = False  # add ``<view>_pc`` (PC softmax) for every view
    primary_view: str = "expert0"  # the view reported to Ray Train / Tune

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        self.cfg = cfg
        self.class_counts = class_counts.float()
        self.num_classes = int(class_counts.numel())
        self.in_channels = in_channels

    # -- model -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def setup(self, device: torch.device) -> None:
        """Move method-held state (class counts, frozen teachers) to ``device``."""
        self.class_counts = self.class_counts.to(device)

    # -- training ----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> ModelOutput:
        if self.uses_key_view:
            return model(batch.images, batch.key_images)
        return model(batch.images)

    def training_step(self, model: nn.Module, batch: Batch) -> LossOutput:
        return self.loss(self.forward(model, batch), batch.targets)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (e.g. momentum-encoder updates); no-op by default."""

    # -- inference ---------------------------------------------------------------------
    def view_logits(self, out: ModelOutput) -> dict[str, Tensor]:
        """Logits per inference view: ``expert0..K-1`` and, for K > 1, ``ensemble`` (mean of logits)."""
        views = {f"expert{k}": z for k, z in enumerate(out.logits)}
        if len(out.logits) > 1:
            views["ensemble"] = torch.stack(out.logits).mean(0)
        return views

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> tuple[dict[str, Tensor], ModelOutput]:
        out = model(images)
        views = self.view_logits(out)
        if self.pc_views:
            for name in list(views):
                views[f"{name}_pc"] = pc_softmax_logits(views[name], self.class_counts)
        return views, out

    def expert_logits_for_kl(self, out: ModelOutput) -> list[Tensor]:
        """The experts whose disagreement is logged as ``expert_kl`` (NCL Fig. 1/5b)."""
        return list(out.logits)

    def view_names(self) -> list[str]:
        k = int(self.cfg.model.num_experts)
        names = [f"expert{i}" for i in range(k)] + (["ensemble"] if k > 1 else [])
        return names + ([f"{n}_pc" for n in names] if self.pc_views else [])
