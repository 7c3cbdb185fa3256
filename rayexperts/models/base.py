"""The backbone contract every family follows: ``stem`` → ``stages`` → global average pool,
and the registry entry a backbone family provides (:class:`BackboneEntry`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


class Backbone(nn.Module):
    """A network cut into a stem and stages, so a multi-expert model can split it.

    ``stage_channels[i]`` is the output channel count of ``stages[i]``; ``forward`` returns the
    globally average-pooled feature ``v`` of shape ``[B, out_dim]``.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], stage_channels: Sequence[int]) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = list(stage_channels)
        self.out_dim = self.stage_channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))


class PooledStages(nn.Sequential):
    """Stages applied in order, then global average pooling: ``[B, C, H, W]`` → ``[B, C']``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).mean(dim=(2, 3))


def scale_width(channels: int, width: float) -> int:
    """``channels × width``, rounded, at least 1 (RIDE's "reduced dimension": 64 × 0.75 = 48)."""
    return max(1, round(channels * width))


@dataclass(frozen=True)
class BackboneEntry:
    """What a backbone family registers for each of its names (``rayexperts.registry.BACKBONES``)."""

    build: Callable[..., Backbone]  # (in_channels, download, **options) -> the whole network
    expert_stages: Callable[..., tuple[nn.Module, int]]  # (start, width, in_channels, **options) -> (stages + pool, dim)
    num_stages: int
    downloadable: bool = False  # torchvision's ImageNet weights


def zero_init_residual(module: nn.Module) -> int:
    """Set the last BatchNorm of every residual block to γ = 0 (each block starts as the identity; Goyal et al.
    2017, CBD's code): ``bn3`` of a bottleneck, ``bn2`` of a basic block. Returns the number of blocks."""
    blocks = 0
    for m in module.modules():
        last = getattr(m, "bn3", None) or getattr(m, "bn2", None)
        if isinstance(last, nn.BatchNorm2d) and hasattr(m, "conv1"):
            nn.init.zeros_(last.weight)
            blocks += 1
    return blocks
