"""``mllt``: Mutual Learning for Long-Tailed Recognition (Park, Yim, Jun).

A shared trunk (stem + first ``model.shared_stages`` stages) and K experts, each a copy of
the remaining stages at ``model.expert_width`` × the filters with its own cosine classifier,
all fed the same instance-sampled batch (METHODS.md "MLLT"):

    L = Σ_k ( CE(z^k, y) + KL(p̄_{−k} ‖ p_k) )        # ensemble teacher (default)
    L_mut^k = 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k)            # loss.mllt_teacher=individual

Inference: the mean of the expert logits, then PC softmax (view ``ensemble_pc``); every
expert is also reported with and without PC softmax.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rayexperts.losses import mutual_learning_loss
from rayexperts.methods.base import LossOutput, Method
from rayexperts.models import build_model
from rayexperts.models.output import ModelOutput


class MutualLearning(Method):
    name = "mllt"
    pc_views = True
    primary_view = "ensemble_pc"

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=True)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        logits = [z.float() for z in out.logits]
        cls = sum(F.cross_entropy(z, targets) for z in logits)
        mut = mutual_learning_loss(logits, teacher=self.cfg.loss.mllt_teacher)
        return LossOutput(cls + mut, {"cls": cls.detach(), "mutual": mut.detach()})
