"""Mixup as an engine capability (``train.mixup_alpha``; Zhang et al. 2018, as BalPoE's code applies it,
docs/methods.md §4.1): per batch one ``λ ~ Beta(α, α)`` and a permutation; the mixed images
``λ·x + (1 − λ)·x[perm]`` (normalised tensors) go through the model once, and the method's loss is taken
against both target sets: ``λ·L(y) + (1 − λ)·L(y[perm])`` (:meth:`rayexperts.methods.base.Method.mixed_step`).

The draws come from generators seeded per (seed, rank, epoch) like the rest of the epoch, so a resumed run
mixes exactly as an uninterrupted one; λ on the host (numpy's Beta, as BalPoE), the permutation drawn on the
host and sent to the device with one copy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class Mixup:
    """Draws ``(λ, perm)`` for a batch; ``alpha`` = ``train.mixup_alpha`` (> 0)."""

    def __init__(self, alpha: float, seed: int) -> None:
        if alpha <= 0:
            raise ValueError(f"train.mixup_alpha must be > 0 for mixup, got {alpha}")
        self.alpha = float(alpha)
        self.lam_rng = np.random.RandomState(seed % 2**32)
        self.perm_rng = torch.Generator().manual_seed(seed)

    def draw(self, batch_size: int, device: torch.device) -> tuple[float, Tensor]:
        lam = float(self.lam_rng.beta(self.alpha, self.alpha))
        perm = torch.randperm(batch_size, generator=self.perm_rng)
        if device.type == "cuda":
            perm = perm.pin_memory()
        return lam, perm.to(device, non_blocking=True)
