"""``ce``: cross-entropy on instance-sampled batches — the baseline, and CBD's teachers.

With ``model.num_experts`` = K > 1 it trains K independent networks, each with its own CE
(an ensemble baseline). Trained without prior correction, so it also reports PC-softmax views.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rayexperts.methods.base import LossOutput, Method
from rayexperts.models import build_model
from rayexperts.models.output import ModelOutput


class CrossEntropy(Method):
    name = "ce"
    pc_views = True
    primary_view = "expert0_pc"

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        ce = sum(F.cross_entropy(z.float(), targets) for z in out.logits)
        return LossOutput(ce, {"ce": ce.detach()})
