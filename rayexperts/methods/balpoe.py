"""``balpoe``: Balanced Product of Calibrated Experts (Sanchez Aimar et al., CVPR 2023; docs/methods.md §4, as
emasa/BalPoE-CalibratedLT@ca607ae computes it).

E experts on RIDE's layout at FULL width (the code's ``reduce_dimension: false``; ``model.expert_width`` 1),
NormedLinear classifiers at scale 30 inside the model, each expert trained with logit-adjusted CE of its own
strength τ_e (``balpoe.taus``; CIFAR (0, 1, 2), ImageNet-LT (0, 1.25, 2.5)), averaged over experts:

    L = (1/E) Σ_e CE(z_e + τ_e · log π, y)                       # balpoe_loss, π = n / Σn

with the engine's mixup (``train.mixup_alpha``; 0.8 / 0.4 / 0.3 on CIFAR-10 / CIFAR-100 / ImageNet-LT in every
batch). At test time the RAW expert logits are averaged (``ensemble``: mean τ = 1 makes it the balanced
predictor); with a known test prior (``balpoe.test_prior``, per-class weights) the view ``ensemble_prior`` adds
``log π_test``. The recipe reports the last epoch, mean of 5 seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, View, register_method

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models import ModelOutput


@dataclass
class BalPoEOptions:
    taus: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0])  # τ_e per expert (lambda = 1 − τ in the paper)
    # The code's tau_list='limits': with tau_spread > 0 the E taus are equidistant in
    # [tau_mean − tau_spread, tau_mean + tau_spread] (instead of taus); a sweep over tau_spread and E.
    tau_mean: float = 1.0
    tau_spread: float = 0.0
    test_prior: list[float] = field(default_factory=list)  # a known test prior (per-class weights); empty: uniform


def expert_taus(opts, num_experts: int) -> list[float]:
    """τ per expert: ``balpoe.taus``, or with ``tau_spread`` > 0 equidistant in mean ∓ spread (docs/methods.md §4.1)."""
    spread, mean = float(opts.tau_spread), float(opts.tau_mean)
    if spread <= 0:
        return [float(t) for t in opts.taus]
    if num_experts == 1:
        return [mean]
    return [mean - spread + 2 * spread * e / (num_experts - 1) for e in range(num_experts)]


@register_method("balpoe")
class BalPoE(Method):
    Options = BalPoEOptions
    defaults = {"model.num_experts": 3, "model.expert_width": 1.0, "model.classifier": "normed_linear",
                "model.cosine_scale": 30.0}
    supports_mixup = True
    primary_view = "ensemble"

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.prior: Tensor | None = None
        if self.opts.test_prior:
            import torch

            self.prior = torch.as_tensor(list(self.opts.test_prior), dtype=torch.float32)

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        o = cfg.balpoe
        if o.tau_spread < 0:
            raise ConfigError(f"'balpoe.tau_spread' must be >= 0, got {o.tau_spread}")
        if o.tau_spread == 0 and len(o.taus) != int(cfg.model.num_experts):
            raise ConfigError(f"balpoe.taus has {len(o.taus)} values for model.num_experts={cfg.model.num_experts}: "
                              "give one τ per expert")
        if o.test_prior and (any(p < 0 for p in o.test_prior) or sum(o.test_prior) <= 0):
            raise ConfigError("balpoe.test_prior must be non-negative per-class weights with a positive sum")

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=True)

    def setup(self, device: torch.device, memory_format: torch.memory_format) -> None:
        super().setup(device, memory_format)
        if self.prior is not None:
            if self.prior.numel() != self.num_classes:
                raise ConfigError(f"balpoe.test_prior has {self.prior.numel()} values for {self.num_classes} classes")
            self.prior = self.prior.to(device)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import balpoe_loss

        taus = tuple(expert_taus(self.opts, self.num_experts))
        loss = balpoe_loss([z.float() for z in out.logits], targets, self.class_counts, taus)
        return LossOutput(loss, {"balpoe": loss.detach()})

    def views(self) -> dict[str, View]:
        from rayexperts.losses import balpoe_predict_logits

        views = super().views()  # expert<k> and ensemble: the raw mean of the expert logits
        if self.prior is not None:
            views["ensemble_prior"] = lambda out: balpoe_predict_logits([z.float() for z in out.logits], self.prior)
        return views
