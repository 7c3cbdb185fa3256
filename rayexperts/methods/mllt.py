"""``mllt``: Mutual Learning for Long-Tailed Recognition (Park, Yim, Jun; docs/methods.md "MLLT").

A shared trunk (stem + first ``model.shared_stages`` stages) and K experts, each a copy of
the remaining stages at ``model.expert_width`` × the filters with its own cosine classifier,
all fed the same instance-sampled batch:

    L = Σ_k ( CE(z^k, y) + KL(p̄_{−k} ‖ p_k) )        # ensemble teacher (default)
    L_mut^k = 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k)            # mllt.teacher=individual

Inference: the mean of the expert logits, then PC softmax (view ``ensemble_pc``); every
expert is also reported with and without PC softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from rayexperts.methods.base import LossOutput, Method, register_method

if TYPE_CHECKING:
    from torch import Tensor, nn

    from rayexperts.models import ModelOutput


@dataclass
class MLLTOptions:
    # Each expert's teacher in L_mut: the mean of the other experts' predictions, or each of them.
    teacher: Literal["ensemble", "individual"] = "ensemble"


@register_method("mllt")
class MutualLearning(Method):
    Options = MLLTOptions
    # The trunk split (model.shared_stages) is the data set's: RIDE's layout for its backbone family.
    defaults = {"model.num_experts": 3, "model.expert_width": 0.75, "model.classifier": "cosine",
                "model.cosine_scale": 16.0}
    renamed = {"loss.mllt_teacher": "teacher"}
    pc_views = True
    primary_view = "ensemble_pc"
    supports_mixup = True

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=True)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        import torch.nn.functional as F

        from rayexperts.losses import mutual_learning_loss

        logits = [z.float() for z in out.logits]
        cls = sum(F.cross_entropy(z, targets) for z in logits)
        mut = mutual_learning_loss(logits, teacher=self.opts.teacher)
        return LossOutput(cls + mut, {"cls": cls.detach(), "mutual": mut.detach()})
