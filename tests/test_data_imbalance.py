"""Imbalance profiles and shot groups (docs/methods.md, long-tailed CIFAR)."""

from __future__ import annotations

import numpy as np
import pytest

from rayexperts.data import DataError, counts_from_labels, exponential_counts, select_first_n, shot_group, step_counts
from rayexperts.data.imbalance import profile_counts, split_long_tail


@pytest.mark.parametrize(
    "n_max, classes, factor, total",
    [(5000, 10, 100, 12406), (5000, 10, 50, 13996), (500, 100, 100, 10847), (500, 100, 50, 12608)],
)
def test_cifar_lt_totals_are_exact(n_max, classes, factor, total):
    assert exponential_counts(n_max, classes, factor).sum() == total


def test_exponential_profile_cifar10_if100():
    expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert exponential_counts(5000, 10, 100).tolist() == expected
    assert exponential_counts(7, 1, 10).tolist() == [7]
    assert exponential_counts(40, 4, 1).tolist() == [40] * 4


def test_step_profile():
    assert step_counts(100, 10, 10).tolist() == [100] * 5 + [10] * 5
    assert step_counts(100, 4, 4, minority_fraction=0.25).tolist() == [100, 100, 100, 25]


@pytest.mark.parametrize("factor", [0.5, 0, float("nan")])
def test_imbalance_factor_below_one_is_an_error(factor):
    with pytest.raises(DataError, match="imbalance_factor"):
        exponential_counts(100, 10, factor)
    with pytest.raises(DataError, match="imbalance_factor"):
        step_counts(100, 10, factor)


def test_select_first_n_keeps_the_first_images_in_source_order():
    labels = np.array([1, 0, 1, 2, 0, 1, 2, 0, 1])
    idx = select_first_n(labels, [2, 3, 1])
    assert idx.tolist() == [0, 1, 2, 3, 4, 5]
    assert counts_from_labels(labels[idx], 3).tolist() == [2, 3, 1]


def test_profile_uses_the_smallest_class_as_n_max():
    assert profile_counts(np.array([30, 20, 25]), "exp", 4).tolist() == [20, 10, 5]
    assert profile_counts(np.array([30, 20, 25]), "none", 4).tolist() == [30, 20, 25]
    with pytest.raises(DataError, match="imbalance_type 'cube'"):
        profile_counts(np.array([3, 3]), "cube", 2)


def test_val_comes_from_the_images_the_lt_subset_leaves_unused():
    labels = np.repeat(np.arange(3), 10)
    train, val = split_long_tail(labels, np.array([10, 6, 2]), val_per_class=3)
    assert counts_from_labels(labels[train], 3).tolist() == [7, 6, 2]  # only the head gives up images
    assert counts_from_labels(labels[val], 3).tolist() == [3, 3, 3]
    assert val.tolist() == [7, 8, 9, 17, 18, 19, 27, 28, 29]  # the last 3 of each class
    assert not set(train) & set(val)
    with pytest.raises(DataError, match="val_per_class=10"):
        split_long_tail(labels, np.array([10, 6, 2]), val_per_class=10)


def test_shot_groups():
    groups = shot_group(np.array([101, 100, 20, 19, 5000]))
    assert groups.tolist() == ["many", "medium", "medium", "few", "many"]
    assert shot_group(np.array([10, 5]), many_threshold=9, few_threshold=6).tolist() == ["many", "few"]


def test_profile_counts_step_keeps_n_max_then_n_max_over_if():
    """The step profile of a source with 100 images per class: the first half keep the smallest source
    count (100), the last ``int(C · step_fraction)`` keep ``floor(100 / IF)``."""
    np.testing.assert_array_equal(profile_counts(np.full(6, 100), "step", 10.0), [100, 100, 100, 10, 10, 10])
    np.testing.assert_array_equal(profile_counts(np.array([120, 100, 150, 100]), "step", 4.0, 0.25), [100, 100, 100, 25])
