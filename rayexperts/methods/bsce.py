"""``bsce``: balanced softmax cross-entropy (docs/methods.md "Balanced softmax / logit adjustment").

Trains on ``z + τ·log(n_j/n)``; inference uses the raw logits, already prior-corrected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayexperts.methods.base import LossOutput, register_method
from rayexperts.methods.ce import CrossEntropy

if TYPE_CHECKING:
    from torch import Tensor

    from rayexperts.models import ModelOutput


@dataclass
class BSCEOptions:
    tau: float = 1.0  # balanced softmax: z + τ·log(n_j / n)


@register_method("bsce")
class BalancedSoftmax(CrossEntropy):
    Options = BSCEOptions
    renamed = {"loss.tau": "tau"}
    pc_views = False
    primary_view = "expert0"

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import balanced_softmax_loss

        tau = float(self.opts.tau)
        bs = sum(balanced_softmax_loss(z.float(), targets, self.class_counts, tau) for z in out.logits)
        return LossOutput(bs, {"bsce": bs.detach()})
