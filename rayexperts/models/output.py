"""What every model returns: per expert, its feature ``v`` and its logits ``z``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    features: list[Tensor]  # v^k: [B, d] pooled (or projected) feature per expert
    logits: list[Tensor]  # z^k: [B, C] per expert
    aux: dict[str, list[Tensor]] = field(default_factory=dict)  # per-expert outputs of extra heads, by name

    @property
    def num_experts(self) -> int:
        return len(self.logits)
