"""Learning-rate schedules as a function of the schedule's clock ``t`` in epochs (the papers' and the
authors' code's schedules; docs/configs.md "Schedules", and docs/recipes.md for each preset's official one).

``train.lr_step=iteration``: iteration ``i`` of epoch ``e`` (``steps`` per epoch) trains with ``lr_at(e + (i+1)/steps)``.
``train.lr_step=epoch``: every iteration of epoch ``e`` (0-indexed) trains with ``lr_at(e + 1)``
(``train.lr_epoch_clock=end``: a scheduler stepped before each epoch, or LDAM-DRW's ``lr·epoch/5``) or with
``lr_at(e)`` (``start``: a PyTorch scheduler stepped after each epoch). At ``t``, with ``W`` warm-up epochs:

* warm-up (``t < W``): ``lr·(s + (1 − s)·t/W)``, ``s`` = ``train.warmup_start``;
* multistep: ``lr·γ^#{m ∈ milestones : t ≥ m}``;
* cosine: ``η + (lr − η)·(1 + cos(π·min(t − W, T)/T))/2``, ``η`` = ``train.eta_min``, ``T`` = ``train.cosine_t_max``
  (0: ``epochs − W``);
* constant: ``lr``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from omegaconf import DictConfig


def lr_schedule(train_cfg: DictConfig) -> Callable[[float], float]:
    """``lr_at(t)`` for the schedule clock ``t`` in epochs (see the module docstring)."""
    base, epochs, warm = float(train_cfg.lr), int(train_cfg.epochs), int(train_cfg.warmup_epochs)
    milestones, gamma, kind = list(train_cfg.milestones), float(train_cfg.gamma), train_cfg.schedule
    start, eta = float(train_cfg.warmup_start), float(train_cfg.eta_min)  # defaults: config.TrainSection
    span = float(train_cfg.cosine_t_max) or max(epochs - warm, 1)

    def lr_at(t: float) -> float:
        if warm > 0 and t < warm:
            return base * (start + (1 - start) * t / warm)
        if kind == "multistep":
            return base * gamma ** sum(t >= m for m in milestones)
        if kind == "cosine":
            return eta + 0.5 * (base - eta) * (1 + math.cos(math.pi * min(t - warm, span) / span))
        return base

    return lr_at


class StepSchedule:
    """``schedule(epoch, step, steps)``: the lr of iteration ``step`` (0-based) of ``steps`` in ``epoch`` (0-based)."""

    def __init__(self, train_cfg: DictConfig) -> None:
        self.lr_at = lr_schedule(train_cfg)
        self.per_epoch = train_cfg.lr_step == "epoch"
        self.offset = 1 if train_cfg.lr_epoch_clock == "end" else 0

    def clock(self, epoch: int, step: int, steps: int) -> float:
        return float(epoch + self.offset) if self.per_epoch else epoch + (step + 1) / steps

    def __call__(self, epoch: int, step: int, steps: int) -> float:
        return self.lr_at(self.clock(epoch, step, steps))


def build_optimizer(params, train_cfg: DictConfig) -> torch.optim.Optimizer:
    """SGD with momentum, optional Nesterov and weight decay (all four papers use SGD), or AdamW
    (``train.optimizer=adamw``: betas (0.9, 0.999), decoupled ``train.weight_decay``). ``params``: parameters or
    groups (``models.finetune.optimizer_groups``: frozen parameters left out, ``lr_scale`` per group)."""
    if str(train_cfg.get("optimizer", "sgd")) == "adamw":
        return torch.optim.AdamW(params, lr=float(train_cfg.lr), weight_decay=float(train_cfg.weight_decay))
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
