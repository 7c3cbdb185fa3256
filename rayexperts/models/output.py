"""What every model returns: per expert, its feature ``v`` and logits ``z`` (+ optional heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class ModelOutput:
    features: list[Tensor]  # v^k: [B, d] pooled (or projected, CBD's h(v)) feature per expert
    logits: list[Tensor]  # z^k: [B, C] per expert (ECL: the cls head)
    ref_logits: Optional[list[Tensor]] = None  # ECL: z^{k,r} of the ref head
    queries: Optional[list[Tensor]] = None  # MoCo: l2-normalised projections of the query view
    keys: Optional[list[Tensor]] = None  # MoCo: l2-normalised momentum-encoder keys of the key view
    queues: Optional[list[Tensor]] = None  # MoCo: each expert's queue *before* this batch's keys

    @property
    def num_experts(self) -> int:
        return len(self.logits)
