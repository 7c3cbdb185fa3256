"""Classifier heads: ``z = W v + b`` or the cosine classifier of docs/methods.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearClassifier(nn.Linear):
    """``z = W v + b``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)


class CosineClassifier(nn.Module):
    """``z = γ · normalize(W) normalize(v)`` (docs/methods.md "Cosine classifier"); every ``|z_j| ≤ γ``.
    With ``bias``: ``+ b``, a trainable bias starting at 0 (NCL's ImageNet-LT code)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0, bias: bool = False,
                 init: str = "normal") -> None:
        super().__init__()
        if init not in ("normal", "uniform"):
            raise ValueError(f"unknown cosine classifier init {init!r}: choose normal or uniform")
        self.scale = scale
        # normal: rows drawn from N(0, 1); uniform: LDAM-DRW's / RIDE's NormedLinear, uniform(-1, 1) renormed
        # to unit norm per class (docs/methods.md "More multi-expert methods", conventions)
        w = torch.randn(num_classes, in_features) if init == "normal" else torch.empty(num_classes, in_features).uniform_(-1, 1)
        self.weight = nn.Parameter(F.normalize(w, dim=1))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def forward(self, v: Tensor) -> Tensor:
        z = self.scale * F.linear(F.normalize(v, dim=1), F.normalize(self.weight, dim=1))
        return z if self.bias is None else z + self.bias

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"in_features={d}, num_classes={c}, scale={self.scale}, bias={self.bias is not None}"


def build_classifier(kind: str, in_features: int, num_classes: int, scale: float = 16.0, bias: bool = False) -> nn.Module:
    """``kind``: ``linear``, ``cosine``, or ``normed_linear`` (the cosine classifier with LDAM-DRW's and RIDE's
    NormedLinear initialisation, no bias); ``scale`` = γ (and ``bias``) for the cosine kinds."""
    if kind == "linear":
        return LinearClassifier(in_features, num_classes)
    if kind == "cosine":
        return CosineClassifier(in_features, num_classes, scale, bias)
    if kind == "normed_linear":
        return CosineClassifier(in_features, num_classes, scale, False, init="uniform")
    raise ValueError(f"unknown classifier '{kind}'; choose linear, cosine or normed_linear")


class L2Normalize(nn.Module):
    """``v / ‖v‖₂`` over the feature dimension."""

    def forward(self, v: Tensor) -> Tensor:
        return F.normalize(v, dim=1)


class WithExtraHeads(nn.Module):
    """A multi-expert model (``MultiExpertNet``) plus a second classifier per expert on the same
    features; ``forward(x)`` returns the model's output with these heads' logits in ``out.aux[name]``.
    It offers the wrapped model's ``heads``, ``encoder``, ``feature_dim`` and ``num_experts``, so a
    MoCo branch can sit on top."""

    def __init__(self, inner: nn.Module, name: str, heads: nn.ModuleList) -> None:
        super().__init__()
        self.net, self.aux_name, self.aux_heads = inner, name, heads

    @property
    def heads(self) -> nn.ModuleList:
        return self.net.heads

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @property
    def num_experts(self) -> int:
        return self.net.num_experts

    def encoder(self, k: int) -> nn.Module:
        return self.net.encoder(k)

    def forward(self, *args: Tensor):
        out = self.net(*args)
        out.aux[self.aux_name] = [head(v) for head, v in zip(self.aux_heads, out.features)]
        return out
