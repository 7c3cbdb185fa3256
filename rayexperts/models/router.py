"""RIDE's expert-assignment router (docs/methods.md §2.4, RIDE@ab8be5c:model/ldam_drw_resnets/ea_resnet_cifar.py):
routers on a frozen multi-expert network that decide, per sample, whether the next expert is worth running.

Router ``i`` (for expert ``i + 1``, ``i = 0 .. E − 2``) sees the ``k`` largest running-mean logits of experts
``0..i`` (sorted, descending) and ``relu(W_i · v_i/‖v_i‖)`` of expert ``i``'s pooled feature; one linear layer
shared by all routers maps the concatenation to a logit. The experts are frozen and their BatchNorm stays in
eval mode whatever mode the router is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayexperts.models.output import ModelOutput


@dataclass
class RoutedOutput:
    expert: ModelOutput  # every expert's feature and logits
    router_logits: Tensor  # [B, E − 1]: router i's logit that expert i + 1 helps
    routed_logits: Tensor  # [B, C]: the mean of the logits of the experts the router ran, per sample
    experts_used: Tensor  # [B]: how many experts ran for each sample (1 .. E)


class ExpertRouter(nn.Module):
    def __init__(self, experts: nn.Module, top_choices: int = 30, hidden: int = 16) -> None:
        super().__init__()
        self.experts = experts
        self.experts.requires_grad_(False)
        num, dim = int(experts.num_experts), int(experts.feature_dim)
        num_classes = experts.heads[0].weight.shape[0]
        self.top_choices = min(int(top_choices), int(num_classes))
        self.projections = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(num - 1))
        self.decide = nn.Linear(hidden + self.top_choices, 1)

    @property
    def num_experts(self) -> int:
        return len(self.projections) + 1

    @property
    def feature_dim(self) -> int:
        return int(self.experts.feature_dim)

    @property
    def heads(self) -> nn.ModuleList:
        return self.experts.heads

    def train(self, mode: bool = True) -> ExpertRouter:
        super().train(mode)
        self.experts.eval()  # frozen BatchNorm statistics (the code's _hook_before_iter)
        return self

    def forward(self, x: Tensor) -> RoutedOutput:
        with torch.no_grad():
            out = self.experts(x)
        logits = [z.float() for z in out.logits]
        running = torch.stack(logits).cumsum(0)  # [E, B, C]: Σ_{k ≤ i} z_k
        preds = []
        for i, projection in enumerate(self.projections):
            mean = running[i] / (i + 1)
            top = mean.topk(self.top_choices, dim=1).values  # sorted, descending
            seen = F.relu(projection(F.normalize(out.features[i].float(), dim=1)))
            preds.append(self.decide(torch.cat([top, seen], dim=1)).squeeze(1))
        router_logits = torch.stack(preds, dim=1)
        active = torch.ones_like(router_logits[:, 0], dtype=torch.bool)
        total, used = logits[0].clone(), torch.ones_like(router_logits[:, 0])
        for i in range(1, self.num_experts):
            active = active & (router_logits[:, i - 1] > 0)  # sigmoid(p) > 0.5
            total = total + logits[i] * active.unsqueeze(1)
            used = used + active
        return RoutedOutput(out, router_logits, total / used.unsqueeze(1), used)
