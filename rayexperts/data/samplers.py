"""Rank-aware epoch samplers: instance, class-balanced and square-root (docs/methods.md, samplers).

Every epoch has one *global* list of ``n`` sampled indices, fixed by ``(seed, epoch)`` and
independent of the number of ranks. Like ``DistributedSampler``, the list is padded by
wrapping to a multiple of ``num_replicas`` and rank ``r`` takes positions ``r::num_replicas``:
equal-length, disjoint shares that together cover the whole list. Class-balanced and
square-root sampling draw with replacement through ``torch.multinomial`` on per-image
weights ``p_c / n_c`` (the ``WeightedRandomSampler`` logic): class ``c`` with probability
``p_c``, then one of its images uniformly.

With ``drop_last=False`` (``data.drop_last``) the list is not padded: rank ``r`` takes positions
``r::num_replicas`` of it, so global step ``s`` trains on positions ``[s·B, (s+1)·B)`` (``B`` the global
batch) and the last one on the ``N mod B`` images left, split over the ranks (a rank may get none):
:meth:`EpochSampler.steps` and :meth:`EpochSampler.global_batch` give the loop its step count and
each rank's loss weight (docs/configs.md "The last partial batch").
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

SAMPLER_KINDS = ("instance", "class_balanced", "sqrt")


def class_probabilities(counts: np.ndarray, kind: str) -> np.ndarray:
    """Class sampling probabilities: ``∝ n_c`` (instance), ``1/C`` over the classes present
    (class_balanced, docs/methods.md ``p_j = 1/C``), or ``∝ sqrt(n_c)`` (sqrt)."""
    counts = np.asarray(counts, dtype=np.float64)
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}: choose one of {', '.join(SAMPLER_KINDS)}")
    w = {"instance": counts, "class_balanced": (counts > 0).astype(np.float64), "sqrt": np.sqrt(counts)}[kind]
    return w / w.sum()


class EpochSampler(Sampler[int]):
    """This rank's share of the epoch's sampled indices; call :meth:`set_epoch` every epoch."""

    def __init__(self, labels: np.ndarray, kind: str = "instance", num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = True):
        self.labels = np.asarray(labels, dtype=np.int64)
        if not len(self.labels):
            raise ValueError("EpochSampler needs at least one label")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if seed < 0:
            raise ValueError(f"sampler seed must be >= 0, got {seed}")
        counts = np.bincount(self.labels)
        probs = class_probabilities(counts, kind)
        self.kind, self.num_replicas, self.rank, self.seed = kind, num_replicas, rank, seed
        self.drop_last = drop_last
        self.weights = torch.from_numpy(probs[self.labels] / counts[self.labels])  # p_c / n_c per image
        n = len(self.labels)
        # padded to a multiple of the ranks (drop_last), or this rank's positions of the unpadded list
        self.num_samples = math.ceil(n / num_replicas) if drop_last else max(0, math.ceil((n - rank) / num_replicas))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The epoch's global sampled index list (length ``n``), a function of ``(seed, epoch)`` only."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state))
        n = len(self.labels)
        if self.kind == "instance":
            return torch.randperm(n, generator=g).numpy()
        return torch.multinomial(self.weights, n, replacement=True, generator=g).numpy()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_indices(self.epoch)
        if self.drop_last:
            order = np.resize(order, self.num_samples * self.num_replicas)
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def steps(self, batch_size: int) -> int:
        """Optimizer steps per epoch, the same on every rank, at ``batch_size`` images per rank: the full
        batches of this rank's share (``drop_last``), or ``ceil(N / (batch_size · ranks))``."""
        if self.drop_last:
            return self.num_samples // batch_size
        return math.ceil(len(self.labels) / (batch_size * self.num_replicas))

    def global_batch(self, step: int, batch_size: int) -> int:
        """Images in global step ``step`` over all ranks (``batch_size`` per rank): the full global batch,
        or what is left for the last step without ``drop_last``."""
        full = batch_size * self.num_replicas
        return full if self.drop_last else min(full, len(self.labels) - step * full)

    def loss_weight(self, step: int, batch_size: int, images: int) -> float:
        """The factor on this rank's mean loss that makes the ranks' averaged gradients (DDP's mean) the
        gradient of the mean over the global batch: ``images · ranks / global_batch`` (1 for a full batch,
        0 for a rank with no image of the last one)."""
        if images == batch_size and self.global_batch(step, batch_size) == batch_size * self.num_replicas:
            return 1.0
        return images * self.num_replicas / self.global_batch(step, batch_size)


class EpochDraws:
    """A loader whose sample order (``self.sampler``; None for an evaluation shard) and augmentation
    draws (``self.seed``) are functions of the epoch: the whole state a resumed run needs."""

    sampler: EpochSampler | None = None
    seed: int = 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        """The epoch's sample order (the sampler's) and the seed of its augmentation draws."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.seed = seed
