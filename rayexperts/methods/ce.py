"""``ce``: cross-entropy on instance-sampled batches — the baseline, and CBD's teachers.

With ``model.num_experts`` = K > 1 it trains K independent networks, each with its own CE
(an ensemble baseline). Trained without prior correction, so it also reports PC-softmax views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rayexperts.methods.base import LossOutput, Method, register_method

if TYPE_CHECKING:
    from torch import Tensor, nn

    from rayexperts.models import ModelOutput


@register_method("ce")
class CrossEntropy(Method):
    supports_mixup = True
    pc_views = True
    primary_view = "expert0_pc"

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        import torch.nn.functional as F

        ce = sum(F.cross_entropy(z.float(), targets) for z in out.logits)
        return LossOutput(ce, {"ce": ce.detach()})
