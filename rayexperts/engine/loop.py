"""One training epoch and one evaluation pass, in plain PyTorch (no Ray here)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from rayexperts.engine.schedule import set_lr
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.methods.base import Batch, Method


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_batch(items: tuple, device: torch.device, channels_last: bool = False) -> Batch:
    """(x, y) or (x_query, x_key, y) from the loader → a :class:`Batch` on ``device``."""
    fmt = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format

    def move(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

    if len(items) == 3:
        return Batch(move(items[0]), move(items[2]), key_images=move(items[1]))
    return Batch(move(items[0]), move(items[1]))


def train_one_epoch(
    method: Method,
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[float], float],
    epoch: int,
    device: torch.device,
    *,
    amp: bool = True,
    grad_clip: float = 0.0,
    channels_last: bool = False,
) -> dict[str, float]:
    """Train for one epoch; returns mean loss terms, the last lr and images/s of this worker."""
    model.train()
    steps = len(loader)  # type: ignore[arg-type]
    sums: dict[str, Tensor] = {}
    seen, lr = 0, 0.0
    start = time.perf_counter()
    for i, items in enumerate(loader):
        lr = lr_at(epoch + (i + 1) / steps)
        set_lr(optimizer, lr)
        batch = to_batch(items, device, channels_last)
        with autocast(device, amp):
            out = method.training_step(model, batch)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        method.after_step(model)
        for name, value in {"loss": out.total, **{f"loss_{k}": v for k, v in out.terms.items()}}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        seen += batch.targets.shape[0]
    elapsed = time.perf_counter() - start
    metrics = {k: float(v) / max(steps, 1) for k, v in sums.items()}
    metrics.update(lr=lr, images_per_sec=seen / max(elapsed, 1e-9), train_seconds=elapsed)
    return metrics


@torch.no_grad()
def evaluate(
    method: Method,
    model: nn.Module,
    loader: Iterable,
    views: list[str],
    num_classes: int,
    device: torch.device,
    *,
    num_bins: int = 15,
    amp: bool = True,
    tta_flip: bool = False,
    channels_last: bool = False,
) -> EvalAccumulator:
    """Accumulate per-view statistics over this worker's shard, then sum over workers."""
    model.eval()
    acc = EvalAccumulator(views, num_classes, num_bins, device)
    for items in loader:
        batch = to_batch(items, device, channels_last)
        with autocast(device, amp):
            logits, out = method.predict(model, batch.images)
            if tta_flip:
                flipped, _ = method.predict(model, batch.images.flip(-1))
                logits = {k: (v.float() + flipped[k].float()) / 2 for k, v in logits.items()}
        for name in views:
            acc.update(name, logits[name].float(), batch.targets)
        acc.update_expert_kl([z.float() for z in method.expert_logits_for_kl(out)], batch.targets)
    acc.all_reduce()
    return acc
