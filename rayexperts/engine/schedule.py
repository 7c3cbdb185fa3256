"""Learning-rate schedules as a function of the fractional epoch: linear warm-up, then
multistep, cosine to zero, or constant (the papers' schedules; METHODS.md "Training")."""

from __future__ import annotations

import math
from typing import Callable

import torch
from omegaconf import DictConfig


def lr_schedule(train_cfg: DictConfig) -> Callable[[float], float]:
    """``lr_at(t)`` for fractional epoch ``t`` in (0, epochs]; the loop passes ``epoch + (i+1)/steps``."""
    base, epochs, warm = float(train_cfg.lr), int(train_cfg.epochs), int(train_cfg.warmup_epochs)
    milestones, gamma, kind = list(train_cfg.milestones), float(train_cfg.gamma), train_cfg.schedule

    def lr_at(t: float) -> float:
        if warm > 0 and t < warm:
            return base * t / warm
        if kind == "multistep":
            return base * gamma ** sum(t >= m for m in milestones)
        if kind == "cosine":
            span = max(epochs - warm, 1)
            return 0.5 * base * (1 + math.cos(math.pi * min(t - warm, span) / span))
        return base

    return lr_at


def build_optimizer(params, train_cfg: DictConfig) -> torch.optim.SGD:
    """SGD with momentum, optional Nesterov and weight decay (all four papers use SGD)."""
    return torch.optim.SGD(
        params,
        lr=float(train_cfg.lr),
        momentum=float(train_cfg.momentum),
        nesterov=bool(train_cfg.nesterov) and float(train_cfg.momentum) > 0,
        weight_decay=float(train_cfg.weight_decay),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
