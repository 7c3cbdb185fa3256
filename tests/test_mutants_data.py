"""Behaviours of rayexperts.data.imbalance and rayexperts.data.samplers that the mutation run (jobs/mutation_score.py) found untested.

Each test asserts what a user relies on (a value computed by hand, a gradient that must or must not flow,
a shape, a device), not the text of the mutant that revealed the gap. Fast: no Ray, CPU only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayexperts.data.errors import DataError
from rayexperts.data.imbalance import (
    counts_from_labels,
    exponential_counts,
    profile_counts,
    rank_in_class,
    select_first_n,
    shuffled_rank_in_class,
    split_long_tail,
    step_counts,
)
from rayexperts.data.imbalance import test_distribution_indices as lt_test_indices
from rayexperts.data.samplers import EpochSampler, class_probabilities


def test_step_profile_accepts_the_whole_range_of_minority_fractions():
    """``minority_fraction`` 0 (no minority class) and 1 (every class a minority) are valid; 1.5 is not."""
    assert step_counts(100, 4, 10, 0.0).tolist() == [100, 100, 100, 100]
    assert step_counts(100, 4, 10, 1.0).tolist() == [10, 10, 10, 10]
    assert step_counts(100, 4, 10, 0.5).tolist() == [100, 100, 10, 10]
    for bad in (-0.1, 1.5):
        with pytest.raises(DataError, match="step minority fraction must lie in"):
            step_counts(100, 4, 10, bad)


def ldam_drw_choice(labels: np.ndarray, counts, seed: int) -> np.ndarray:
    """LDAM-DRW's ``gen_imbalanced_data`` written out: np.random.seed, then per class a shuffle and the first n_c."""
    np.random.seed(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[:n])
    return np.sort(np.array(keep))


def test_a_long_tailed_test_set_is_the_images_ldam_drw_keeps():
    """forward<IF>/backward<IF> keep the images LDAM-DRW's shuffle keeps (seed 0 by default), not the first ones."""
    labels = np.repeat(np.arange(4), 10)[np.random.RandomState(3).permutation(40)]
    counts = [10, 4, 2, 1]  # int(10 · 10^(−c/3))
    forward = lt_test_indices(labels, "forward10")
    np.testing.assert_array_equal(forward, ldam_drw_choice(labels, counts, 0))
    np.testing.assert_array_equal(lt_test_indices(labels, "forward10", seed=0), forward)
    np.testing.assert_array_equal(lt_test_indices(labels, "forward10", seed=5), ldam_drw_choice(labels, counts, 5))
    np.testing.assert_array_equal(lt_test_indices(labels, "backward10", seed=2),
                                  ldam_drw_choice(labels, counts[::-1], 2))


def test_a_uniform_test_set_keeps_every_image_even_of_unequal_classes():
    """``uniform`` is the test split as it is: all images, in order, whatever the class sizes."""
    labels = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    np.testing.assert_array_equal(lt_test_indices(labels, "uniform"), np.arange(8))


def test_counts_keep_every_class_even_an_empty_last_one_and_are_integers():
    """``counts_from_labels`` has one entry per class (a class without images counts 0), as int64."""
    counts = counts_from_labels(np.array([0, 0, 1]), 4)
    assert counts.tolist() == [2, 1, 0, 0] and counts.dtype == np.int64


@pytest.mark.parametrize("n_max", [500, np.int32(500), np.uint16(500)])
def test_profile_counts_are_int64_whatever_integer_type_the_source_counts_have(n_max):
    """Counts are int64 for one class or many, and for source counts read as floats (a Parquet column)."""
    assert exponential_counts(n_max, 1, 10).dtype == np.int64
    assert exponential_counts(n_max, 3, 10).dtype == np.int64
    for kind in ("none", "exp", "step"):
        out = profile_counts(np.array([50.0, 40.0, 60.0]), kind, 2)
        assert out.dtype == np.int64, kind
    assert profile_counts(np.array([50.0, 40.0, 60.0]), "none", 1).tolist() == [50, 40, 60]


def test_labels_stored_as_whole_floats_are_accepted_everywhere():
    """Labels read as float64 (e.g. from a Parquet column with nulls filled) work as int labels do."""
    ints = np.array([2, 0, 1, 0, 2, 2, 1, 0])
    floats = ints.astype(np.float64)
    np.testing.assert_array_equal(counts_from_labels(floats, 3), counts_from_labels(ints, 3))
    np.testing.assert_array_equal(rank_in_class(floats), rank_in_class(ints))
    np.testing.assert_array_equal(select_first_n(floats, [1, 1, 2]), select_first_n(ints, [1, 1, 2]))
    for a, b in zip(split_long_tail(floats, np.array([2, 2, 2]), 1), split_long_tail(ints, np.array([2, 2, 2]), 1),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    s_float, s_int = EpochSampler(floats, "class_balanced"), EpochSampler(ints, "class_balanced")
    np.testing.assert_array_equal(s_float.epoch_indices(3), s_int.epoch_indices(3))


def test_rank_in_class_is_the_source_order_within_each_class_on_a_large_split():
    """The k-th image of a class in source order has rank k (a stable order: on thousands of labels an unstable
    sort would reorder the images of one class), as integers."""
    labels = np.random.RandomState(0).randint(0, 3, size=5000)
    rank = rank_in_class(labels)
    expected = np.empty(len(labels), dtype=np.int64)
    for c in range(3):
        expected[labels == c] = np.arange((labels == c).sum())
    np.testing.assert_array_equal(rank, expected)
    assert rank.dtype.kind == "i" and shuffled_rank_in_class(labels, 0).dtype.kind == "i"
    # the first n of each class in source order
    np.testing.assert_array_equal(select_first_n(labels, [3, 0, 1]),
                                  np.sort(np.concatenate([np.flatnonzero(labels == 0)[:3], np.flatnonzero(labels == 2)[:1]])))


def test_split_long_tail_holds_out_nothing_by_default_and_allows_an_empty_class():
    """Without ``val_per_class`` nothing is held out; a class without images (the last one here) is allowed when
    nothing is held out, keeps no image, and is in the counts' length."""
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    train, val = split_long_tail(labels, np.array([2, 1, 0]))
    assert val.size == 0
    np.testing.assert_array_equal(train, [0, 1, 3])
    train, val = split_long_tail(np.array([0, 0, 0, 1, 1, 0, 1, 2, 2]), np.array([5, 5, 0]), 1)
    np.testing.assert_array_equal(val, [5, 6, 8])  # the last image of each class
    np.testing.assert_array_equal(train, [0, 1, 2, 3, 4])


def test_split_long_tail_refuses_a_class_left_without_training_images_and_names_it():
    """Holding out ``val_per_class`` images must leave each class at least one: the error names the first class
    that cannot (here class 1, with one image and one to hold out)."""
    labels = np.array([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(DataError, match=r"class 1 has only 1 images: cannot hold out data.val_per_class=1"):
        split_long_tail(labels, np.array([3, 3, 3]), 1)
    labels = np.array([0, 0, 0, 1, 1, 2])
    with pytest.raises(DataError, match=r"class 2 has only 1 images"):
        split_long_tail(labels, np.array([3, 3, 3]), 1)


def test_class_probabilities_by_hand_with_an_empty_and_a_single_image_class():
    """instance ∝ n, class_balanced 1/C over the classes present (a class of one image is present, an empty one
    is not), sqrt ∝ √n; every vector sums to 1 in float64, also for float32 counts."""
    counts = np.array([9, 1, 0, 4], dtype=np.float32)
    np.testing.assert_allclose(class_probabilities(counts, "instance"), [9 / 14, 1 / 14, 0, 4 / 14])
    np.testing.assert_allclose(class_probabilities(counts, "class_balanced"), [1 / 3, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose(class_probabilities(counts, "sqrt"), [3 / 6, 1 / 6, 0, 2 / 6])
    for kind in ("instance", "class_balanced", "sqrt"):
        p = class_probabilities(counts, kind)
        assert p.dtype == np.float64 and p.sum() == pytest.approx(1.0, abs=1e-12)


def test_a_default_epoch_sampler_is_one_replica_seed_0_epoch_0():
    """``EpochSampler(labels)`` yields every index once, in epoch 0's order of seed 0, before any set_epoch."""
    labels = np.arange(10) % 3
    sampler = EpochSampler(labels)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and len(sampler) == 10
    assert order == EpochSampler(labels, seed=0, num_replicas=1, rank=0).epoch_indices(0).tolist()
    assert order != EpochSampler(labels, seed=0).epoch_indices(1).tolist()


def test_the_sampler_order_of_a_seed_stays_that_of_earlier_releases():
    """Same seed, same order across versions: the epoch's order is ``torch.randperm`` on a generator seeded with
    the first uint64 word of ``SeedSequence([seed, epoch])`` (recorded here for seed 0, epoch 0, n = 12)."""
    state = int(np.random.SeedSequence([0, 0]).generate_state(1, np.uint64)[0])
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(state)).tolist()
    assert EpochSampler(np.zeros(12, dtype=np.int64)).epoch_indices(0).tolist() == expected


def test_a_long_tailed_test_set_accepts_labels_stored_as_floats():
    """forward/backward test sets carved from float64 labels (a Parquet column) are those of the int labels."""
    ints = np.repeat(np.arange(3), 6)[np.random.RandomState(1).permutation(18)]
    for name in ("forward2", "backward4"):
        np.testing.assert_array_equal(lt_test_indices(ints.astype(np.float64), name), lt_test_indices(ints, name))
