"""Long-tail profiles and shot groups (docs/methods.md, "Shared building blocks").

Every profile returns per-class counts; :func:`select_first_n` turns counts into the
indices of the *first* ``n_i`` images of each class in source order (Cao et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rayexperts.data.errors import DataError


def _check_factor(imbalance_factor: float) -> None:
    if not imbalance_factor >= 1:
        raise DataError(f"imbalance factor must be >= 1 (data.imbalance_factor), got {imbalance_factor}")


def exponential_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """``n_i = floor(n_max * (1/IF)^(i/(C-1)))`` (docs/methods.md, long-tailed CIFAR)."""
    _check_factor(imbalance_factor)
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    # Python float arithmetic, as in the reference code (Cao et al.), so totals match exactly.
    counts = [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]
    return np.array(counts, dtype=np.int64)


def step_counts(n_max: int, num_classes: int, imbalance_factor: float, minority_fraction: float = 0.5) -> np.ndarray:
    """Step profile (Cao et al. 2019): the last ``int(C * minority_fraction)`` classes keep
    ``floor(n_max / IF)`` images, the others ``n_max``."""
    _check_factor(imbalance_factor)
    if not 0 <= minority_fraction <= 1:
        raise DataError(f"step minority fraction must lie in [0, 1] (data.step_fraction), got {minority_fraction}")
    counts = np.full(num_classes, n_max, dtype=np.int64)
    num_minor = int(num_classes * minority_fraction)
    if num_minor:
        counts[num_classes - num_minor :] = int(n_max / imbalance_factor)
    return counts


def counts_from_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class counts ``[C]`` of an int label array."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.int64)


def rank_in_class(labels: np.ndarray) -> np.ndarray:
    """0-based position of each image within its class, in source order."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels))])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def shuffled_rank_in_class(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each image's position within its class after LDAM-DRW's shuffle (docs/methods.md "Recipes", CE baseline:
    ``np.random.seed(seed)``, then for each class in order its indices shuffled by ``np.random.shuffle``);
    keeping ``rank < n_i`` keeps the images LDAM-DRW's ``gen_imbalanced_data`` keeps."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)  # the legacy global stream np.random.seed(seed) starts
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        rank[idx] = np.arange(len(idx))
    return rank


def select_first_n(labels: np.ndarray, counts: Sequence[int] | np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """Indices (ascending) of the first ``counts[c]`` images of each class c in source order (or in the order
    ``rank`` gives, e.g. :func:`shuffled_rank_in_class`)."""
    labels = np.asarray(labels, dtype=np.int64)
    rank = rank_in_class(labels) if rank is None else rank
    return np.flatnonzero(rank < np.asarray(counts, dtype=np.int64)[labels])


def profile_counts(
    source_counts: np.ndarray, imbalance_type: str, imbalance_factor: float, step_fraction: float = 0.5
) -> np.ndarray:
    """Target per-class counts for a source with ``source_counts`` images per class.

    ``n_max`` is the smallest source class count, so every class can keep its first
    ``n_i`` images (for balanced CIFAR that is 5,000 / 500); ``none`` keeps all.
    """
    source_counts = np.asarray(source_counts, dtype=np.int64)
    if imbalance_type == "none":
        return source_counts.copy()
    n_max, num_classes = int(source_counts.min()), len(source_counts)
    if imbalance_type == "exp":
        return exponential_counts(n_max, num_classes, imbalance_factor)
    if imbalance_type == "step":
        return step_counts(n_max, num_classes, imbalance_factor, step_fraction)
    raise DataError(f"unknown data.imbalance_type {imbalance_type!r}: choose exp, step or none")


def split_long_tail(
    labels: np.ndarray, target_counts: np.ndarray, val_per_class: int = 0, rank: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into ``labels``: val = the *last* ``val_per_class`` images of
    each class (images an LT subset leaves unused), train = the first
    ``min(n_i, N_c - val_per_class)`` of each class. The val set is therefore the same for
    every IF; only a class whose ``n_i`` exceeds ``N_c - val_per_class`` (the head class,
    ``n_0 = n_max``) gives up images to it. ``rank`` replaces the source order within each class
    (:func:`shuffled_rank_in_class`: LDAM-DRW's subset)."""
    labels = np.asarray(labels, dtype=np.int64)
    source = np.bincount(labels, minlength=len(target_counts))
    if val_per_class > 0 and (short := np.flatnonzero(source <= val_per_class)).size:
        c = int(short[0])
        raise DataError(
            f"class {c} has only {source[c]} images: cannot hold out data.val_per_class={val_per_class} "
            "for validation and keep a training image"
        )
    rank = rank_in_class(labels) if rank is None else rank
    keep = np.minimum(np.asarray(target_counts, dtype=np.int64), source - val_per_class)
    return select_first_n(labels, keep, rank), np.flatnonzero(rank >= (source - val_per_class)[labels])


def shot_group(counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20) -> np.ndarray:
    """Per class ``"many"`` (> many_threshold), ``"few"`` (< few_threshold) or ``"medium"``
    (docs/methods.md, shot groups)."""
    counts = np.asarray(counts)
    return np.where(counts > many_threshold, "many", np.where(counts < few_threshold, "few", "medium"))


def test_distribution_indices(labels: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed test set carved from a balanced test split (SADE's test-agnostic protocol,
    docs/methods.md §3.4: ``IMBALANCECIFAR100(train=False, imb_factor, reverse)``): class ``c`` keeps
    ``int(n · IF^(−c/(C−1)))`` images (``forward``: class 0 the head, as in training) or
    ``int(n · IF^(−(C−1−c)/(C−1)))`` (``backward``), chosen as LDAM-DRW's code chooses (a per-class shuffle after
    ``np.random.seed(seed)``); ``uniform`` keeps all."""
    from rayexperts.config import parse_test_distribution

    labels = np.asarray(labels, dtype=np.int64)
    kind, factor = parse_test_distribution(name)
    if kind == "uniform":
        return np.arange(len(labels))
    num_classes = int(labels.max()) + 1
    n_max = int(np.bincount(labels, minlength=num_classes).min())
    counts = exponential_counts(n_max, num_classes, factor)
    if kind == "backward":
        counts = counts[::-1].copy()
    return select_first_n(labels, counts, shuffled_rank_in_class(labels, seed))
