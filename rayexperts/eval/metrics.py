"""Evaluation as sufficient statistics: top-1 by shot group, per class, ECE, inter-expert KL.

Each worker accumulates sums over its shard of the test set; :meth:`EvalAccumulator.all_reduce`
adds them across workers, so every sample counts exactly once whatever the worker count.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from rayexperts.eval.tables import GROUPS
from rayexperts.losses import expert_disagreement


def ece_from_bins(count: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> float:
    """Expected calibration error: Σ_b (n_b/N) |acc_b − conf_b| over equal-width confidence bins."""
    n = count.sum()
    if n == 0:
        return math.nan
    nz = count > 0
    gap = np.abs(correct_sum[nz] / count[nz] - conf_sum[nz] / count[nz])
    return float((count[nz] / n * gap).sum())


def expected_calibration_error(probs: Tensor, targets: Tensor, num_bins: int = 15) -> float:
    """ECE of softmax probabilities ``probs`` [N, C] (15 bins as ECL)."""
    acc = EvalAccumulator(["v"], probs.shape[1], num_bins, probs.device)
    acc.update("v", probs.log(), targets)
    return acc.ece("v")


pairwise_kl = expert_disagreement  # per sample, the mean KL over ordered expert pairs


class EvalAccumulator:
    """Per-view sums: correct/total per class and confidence bins; per class expert-KL sums."""

    def __init__(self, views: Sequence[str], num_classes: int, num_bins: int = 15, device=None):
        self.views = list(views)
        self.num_classes = num_classes
        self.num_bins = num_bins
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.correct = {v: z(num_classes) for v in self.views}
        self.total = {v: z(num_classes) for v in self.views}
        self.bins = {v: z(3, num_bins) for v in self.views}  # count, confidence sum, correct sum
        self.kl_sum = z(num_classes)
        self.kl_count = z(num_classes)
        self.stats: dict[str, Tensor] = {}  # a method's per-sample statistic: [2, C] sums and counts per class
        self._zeros = z

    def update(self, view: str, logits: Tensor, targets: Tensor) -> None:
        """Add a batch of ``view``'s logits. GPU finding F3: fixed-size sums with ``index_add_`` (no
        ``bincount``, which reads the batch's maximum back to the host; no ``.item()``, no boolean
        indexing), so an evaluation batch never waits for the GPU. The batch's sums start from zero and
        are then added, in the order ``bincount`` added them: the same numbers on a CPU."""
        probs = F.softmax(logits.float(), dim=1)
        conf, pred = probs.max(1)
        correct = (pred == targets).double()
        ones = torch.ones_like(correct)
        per_class = correct.new_zeros(2, self.num_classes).index_add_(1, targets, torch.stack([correct, ones]))
        self.correct[view] += per_class[0]
        self.total[view] += per_class[1]
        b = torch.clamp((conf * self.num_bins).long(), max=self.num_bins - 1)
        bins = torch.stack([ones, conf.double(), correct])  # count, confidence sum, correct sum
        self.bins[view] += correct.new_zeros(3, self.num_bins).index_add_(1, b, bins)

    def update_expert_kl(self, expert_logits: Sequence[Tensor], targets: Tensor) -> None:
        """Add a batch's mean pairwise KL between experts, per class (no sync: GPU finding F3)."""
        if len(expert_logits) < 2:
            return
        kl = pairwise_kl(expert_logits).double()
        sums = kl.new_zeros(2, self.num_classes).index_add_(1, targets, torch.stack([kl, torch.ones_like(kl)]))
        self.kl_sum += sums[0]
        self.kl_count += sums[1]

    def update_stat(self, name: str, values: Tensor, targets: Tensor) -> None:
        """Add a batch of a per-sample statistic (e.g. a router's ``experts_per_sample``), per class."""
        if name not in self.stats:
            self.stats[name] = self._zeros(2, self.num_classes)
        values = values.detach().double()
        self.stats[name] += values.new_zeros(2, self.num_classes).index_add_(
            1, targets, torch.stack([values, torch.ones_like(values)]))

    def stat_summary(self, name: str, groups: np.ndarray, prefix: str = "") -> dict[str, float]:
        """A statistic's mean, overall and per shot group: ``<prefix><name>``, ``<prefix><name>_many``, ..."""
        s, n = (x.cpu().numpy() for x in self.stats[name])
        return _group_means(s, n, f"{prefix}{name}", groups)

    def _tensors(self) -> list[Tensor]:
        out = [self.kl_sum, self.kl_count, *(self.stats[k] for k in sorted(self.stats))]
        for v in self.views:
            out += [self.correct[v], self.total[v], self.bins[v]]
        return out

    def all_reduce(self) -> None:
        """Sum the statistics over all workers (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in self._tensors():
                dist.all_reduce(t)

    # -- summaries -------------------------------------------------------------------
    def ece(self, view: str) -> float:
        count, conf, corr = (x.cpu().numpy() for x in self.bins[view])
        return ece_from_bins(count, conf, corr)

    def reliability(self, view: str) -> dict[str, np.ndarray]:
        """Per equal-width confidence bin: ``count``, mean ``confidence``, ``accuracy`` (NaN when empty)."""
        count, conf, corr = (x.cpu().numpy() for x in self.bins[view])
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"bin": np.arange(self.num_bins), "count": count, "confidence": conf / count, "accuracy": corr / count}

    def per_class_accuracy(self, view: str) -> np.ndarray:
        tot = self.total[view].cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, self.correct[view].cpu().numpy() / np.maximum(tot, 1), np.nan)

    def summary(self, view: str, groups: np.ndarray, prefix: str = "") -> dict[str, float]:
        """``top1``, ``top1_many/medium/few`` (NaN for an empty group), ``ece``, ``num_samples``."""
        corr = self.correct[view].cpu().numpy()
        tot = self.total[view].cpu().numpy()
        out = {f"{prefix}top1": _ratio(corr.sum(), tot.sum())}
        for g in GROUPS:
            sel = groups == g
            out[f"{prefix}top1_{g}"] = _ratio(corr[sel].sum(), tot[sel].sum())
        out[f"{prefix}ece"] = self.ece(view)
        out[f"{prefix}num_samples"] = int(tot.sum())
        return out

    def expert_kl_summary(self, groups: np.ndarray, prefix: str = "") -> dict[str, float]:
        """Mean KL between experts' predictions, overall and per shot group (NCL Fig. 1/5b)."""
        s, n = self.kl_sum.cpu().numpy(), self.kl_count.cpu().numpy()
        if n.sum() == 0:
            return {}
        return _group_means(s, n, f"{prefix}expert_kl", groups)


def _group_means(s: np.ndarray, n: np.ndarray, name: str, groups: np.ndarray) -> dict[str, float]:
    """Per-class sums ``s`` over counts ``n``: the mean overall (``name``) and per shot group (``name_<group>``)."""
    out = {name: _ratio(s.sum(), n.sum())}
    for g in GROUPS:
        sel = groups == g
        out[f"{name}_{g}"] = _ratio(s[sel].sum(), n[sel].sum())
    return out


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else math.nan
