"""``sade``: Self-supervised Aggregation of Diverse Experts (Zhang et al., NeurIPS 2022; docs/methods.md §3, as
Vanint/SADE-AgnosticLT@cba11b8 computes it).

Three experts on RIDE's layout (shared trunk, 0.75 width), NormedLinear at scale 30 inside the model, each
trained for another test distribution, summed:

    L = CE(z₁, y) + CE(z₂ + log π, y) + CE(z₃ + log π − τ · log π_inv, y)          # sade_loss, τ = 2

π_inv: the prior reversed by rank (a stable sort for tied counts). Views: each expert and ``ensemble``, the
mean of the logits (the number SADE's README reports), and ``tta_aggregate``: the test-time self-supervised
aggregation (docs/methods.md §3.4), learnt on the UNLABELLED TEST IMAGES — transductive: its rows carry
``transductive=True`` and it is never a run's headline view. It is an engine test-time step
(:class:`rayexperts.engine.test_time.TestTimeStep`): three raw weights ``w`` (1/3 each) in an SGD of their own
(lr ``sade.tta_lr``, momentum 0.9, Nesterov, weight decay 5e-4), ``sade.tta_epochs`` passes (5) over the test
set in batches of 128 with two augmented views each, the loss −mean cos(softmax(Σ a_k z_k(v1)),
softmax(Σ a_k z_k(v2))), a = softmax(w), stopped after a pass once a rounded weight falls below 0.05; the
view is then Σ a_k z_k on the plain test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, View, register_method

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models import ModelOutput


@dataclass
class SADEOptions:
    tau: float = 2.0  # the inverse-prior expert's strength
    tta: bool = True  # the transductive view tta_aggregate
    tta_lr: float = 0.1  # the aggregation weights' SGD (CIFAR 0.1; ImageNet-LT 0.025)
    tta_epochs: int = 5  # passes over the test set
    tta_batch_size: int = 128
    tta_weight_decay: float = 5e-4
    tta_stop_below: float = 0.05  # stop after a pass once a weight (rounded to 2 decimals) is below this


@register_method("sade")
class SADE(Method):
    Options = SADEOptions
    defaults = {"model.num_experts": 3, "model.expert_width": 0.75, "model.classifier": "normed_linear",
                "model.cosine_scale": 30.0}
    supports_mixup = True
    primary_view = "ensemble"

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        if int(cfg.model.num_experts) != 3:
            raise ConfigError(f"SADE's loss has exactly three experts: model.num_experts must be 3, got "
                              f"{cfg.model.num_experts}")
        o = cfg.sade
        if o.tta_lr <= 0 or o.tta_epochs < 1 or o.tta_batch_size < 1:
            raise ConfigError("sade: tta_lr must be > 0, tta_epochs and tta_batch_size >= 1")

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=True)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import sade_loss

        loss = sade_loss([z.float() for z in out.logits], targets, self.class_counts, float(self.opts.tau))
        return LossOutput(loss, {"sade": loss.detach()})

    def test_time_steps(self) -> dict[str, Any]:
        """The transductive view ``tta_aggregate`` (docs/methods.md §3.4), learnt by the engine's test-time step."""
        if not self.opts.tta:
            return {}
        return {"tta_aggregate": AggregationWeights(self.opts, self.num_experts)}


class AggregationWeights:
    """SADE's test-time aggregation: learns ``w`` on unlabelled two-view test batches, then the view
    ``Σ softmax(w)_k z_k``. :meth:`fit` gets an iterable of ``(view1, view2)`` image batches per pass and a
    function giving the frozen model's expert logits."""

    augment = "sade_tta"  # the two views' augmentation (rayexperts.data: the test-time view of docs/methods.md §3.4)

    def __init__(self, opts: Any, num_experts: int) -> None:
        self.opts, self.num_experts = opts, num_experts
        self.weights: Tensor | None = None

    @property
    def passes(self) -> int:
        return int(self.opts.tta_epochs)

    @property
    def batch_size(self) -> int:
        return int(self.opts.tta_batch_size)

    def start(self, device: torch.device) -> None:
        import torch

        self.raw = torch.full((self.num_experts,), 1.0 / self.num_experts, device=device, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.raw], lr=float(self.opts.tta_lr), momentum=0.9, nesterov=True,
                                         weight_decay=float(self.opts.tta_weight_decay))

    def step(self, logits1: list[Tensor], logits2: list[Tensor]) -> Tensor:
        """One SGD step on a batch's two views (the experts' logits, computed without gradient)."""
        from rayexperts.losses import sade_aggregation_loss

        loss = sade_aggregation_loss(self.raw, logits1, logits2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def done(self) -> bool:
        """After a pass: stop once a weight, rounded to 2 decimals, is below ``tta_stop_below`` (one host read)."""
        import torch

        a = torch.softmax(self.raw.detach(), 0).cpu()
        return bool((torch.round(a * 100) / 100 < float(self.opts.tta_stop_below)).any())

    def view(self) -> View:
        import torch

        a = torch.softmax(self.raw.detach(), 0)
        self.weights = a
        return lambda out: sum(a[k] * z.float() for k, z in enumerate(out.logits))
