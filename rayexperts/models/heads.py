"""Classifier heads: ``z = W v + b`` or the cosine classifier of METHODS.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearClassifier(nn.Linear):
    """``z = W v + b``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)


class CosineClassifier(nn.Module):
    """``z = γ · normalize(W) normalize(v)`` (METHODS.md "Cosine classifier"); every ``|z_j| ≤ γ``."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(F.normalize(torch.randn(num_classes, in_features), dim=1))

    def forward(self, v: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(v, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"in_features={d}, num_classes={c}, scale={self.scale}"


def build_classifier(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    """``kind``: ``linear`` or ``cosine`` (``scale`` = γ, cosine only)."""
    if kind == "linear":
        return LinearClassifier(in_features, num_classes)
    if kind == "cosine":
        return CosineClassifier(in_features, num_classes, scale)
    raise ValueError(f"unknown classifier '{kind}'; choose linear or cosine")
