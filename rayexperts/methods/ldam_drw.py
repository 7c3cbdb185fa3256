"""``ldam_drw``: LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019; docs/methods.md §1, as
kaidic/LDAM-DRW@2536330 computes it).

One network with a cosine classifier whose scale is NOT inside the model (``model.cosine_scale`` 1: the
NormedLinear output is the bare cosine); the loss scales:

    m_c = K / n_c^{1/4},  K such that max_c m_c = max_m                        # ldam_margins
    L   = CE_w( s · (cos − m_y · 1[y]), y )                                   # ldam_loss, torch's weighted mean
    w   = 1 before the DRW epoch, then (1 − β)/(1 − β^{n_c}) normalised to sum C  # drw_weights

DRW switches on at the code's 0-indexed epoch ``epoch // drw_epoch`` (``ldam_drw.drw_epoch``, 160: the last
40 of 200 epochs), through the engine's epoch hook. Views: ``expert0`` is ``s · cos`` (the loss's logits
without the margin, so that ECE and the reliability diagram see the scale the loss trains; the arg-max is the
cosine's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, View, register_method

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models import ModelOutput


@dataclass
class LDAMDRWOptions:
    max_m: float = 0.5  # the largest margin (the rarest class)
    scale: float = 30.0  # s: the loss multiplies the margin-shifted cosine by it
    drw_epoch: int = 160  # 0-indexed epoch from which the DRW weights are on (epoch // drw_epoch >= 1)
    beta: float = 0.9999  # the effective-number β of the DRW weights
    drw: bool = True  # False: LDAM alone (the weights stay 1)


@register_method("ldam_drw")
class LDAMDRW(Method):
    Options = LDAMDRWOptions
    defaults = {"model.num_experts": 1, "model.classifier": "normed_linear", "model.cosine_scale": 1.0}
    supports_mixup = True
    primary_view = "expert0"
    epoch_keys = ("ldam_drw.drw_epoch",)

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.weights: Tensor | None = None

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        o, m = cfg.ldam_drw, cfg.model
        if int(m.num_experts) != 1:
            raise ConfigError(f"LDAM-DRW trains one network: model.num_experts must be 1, got {m.num_experts}")
        if m.classifier == "linear" or float(m.cosine_scale) != 1.0:
            raise ConfigError("LDAM-DRW's loss scales the cosine itself (ldam_drw.scale): use a cosine classifier "
                              f"without a scale (model.classifier=normed_linear model.cosine_scale=1), got "
                              f"model.classifier={m.classifier} model.cosine_scale={m.cosine_scale}")
        if not 0 <= o.beta < 1 or o.max_m <= 0 or o.scale <= 0 or o.drw_epoch < 1:
            raise ConfigError("ldam_drw: beta must lie in [0, 1), max_m, scale > 0 and drw_epoch >= 1")

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)

    def on_epoch(self, epoch: int) -> None:
        """The code's ``idx = epoch // 160; beta = [0, 0.9999][idx]`` (0-indexed epoch): weights from epoch 160."""
        from rayexperts.losses import drw_weights

        on = bool(self.opts.drw) and epoch // int(self.opts.drw_epoch) >= 1
        self.weights = drw_weights(self.class_counts, float(self.opts.beta)) if on else None

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import ldam_loss

        o = self.opts
        loss = ldam_loss(out.logits[0].float(), targets, self.class_counts, float(o.max_m), float(o.scale), self.weights)
        return LossOutput(loss, {"ldam": loss.detach()})

    def views(self) -> dict[str, View]:
        s = float(self.opts.scale)
        return {"expert0": lambda out: out.logits[0] * s}
