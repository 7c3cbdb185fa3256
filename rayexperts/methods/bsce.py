"""``bsce``: balanced softmax cross-entropy (METHODS.md "Balanced softmax / logit adjustment").

Trains on ``z + τ·log(n_j/n)``; inference uses the raw logits, already prior-corrected.
"""

from __future__ import annotations

from torch import Tensor

from rayexperts.losses import balanced_softmax_loss
from rayexperts.methods.ce import CrossEntropy
from rayexperts.models.output import ModelOutput
from rayexperts.methods.base import LossOutput


class BalancedSoftmax(CrossEntropy):
    name = "bsce"
    pc_views = False
    primary_view = "expert0"

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        tau = float(self.cfg.loss.tau)
        bs = sum(balanced_softmax_loss(z.float(), targets, self.class_counts, tau) for z in out.logits)
        return LossOutput(bs, {"bsce": bs.detach()})
