"""EpochSampler: rank shares, determinism and sampling frequencies."""

from __future__ import annotations

import numpy as np
import pytest

from rayexperts.data import EpochSampler

LABELS = np.repeat(np.arange(4), [400, 100, 25, 4])  # n = 529


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt"])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_ranks_get_equal_disjoint_shares_that_cover_the_global_list(kind, replicas):
    samplers = [EpochSampler(LABELS, kind, replicas, r, seed=3) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(5)
    shares = [list(s) for s in samplers]
    global_list = samplers[0].epoch_indices(5)
    assert len(global_list) == len(LABELS)
    assert {len(sh) for sh in shares} == {len(samplers[0])} and len(samplers[0]) == -(-len(LABELS) // replicas)
    # rank r holds positions r, r + R, ... of the padded list: interleaving rebuilds it
    padded = np.empty(len(shares[0]) * replicas, dtype=np.int64)
    for r, sh in enumerate(shares):
        padded[r::replicas] = sh
    assert padded[: len(LABELS)].tolist() == global_list.tolist()
    assert padded[len(LABELS) :].tolist() == global_list[: len(padded) - len(LABELS)].tolist()
    if kind == "instance":
        assert sorted(global_list.tolist()) == list(range(len(LABELS)))


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt"])
def test_global_list_depends_on_seed_and_epoch_only(kind):
    one = EpochSampler(LABELS, kind, 1, 0, seed=7)
    three = EpochSampler(LABELS, kind, 3, 2, seed=7)
    assert np.array_equal(one.epoch_indices(2), three.epoch_indices(2))
    assert np.array_equal(one.epoch_indices(2), EpochSampler(LABELS, kind, seed=7).epoch_indices(2))
    assert not np.array_equal(one.epoch_indices(2), one.epoch_indices(3))
    assert not np.array_equal(one.epoch_indices(2), EpochSampler(LABELS, kind, seed=8).epoch_indices(2))
    one.set_epoch(4)
    assert list(one) == one.epoch_indices(4).tolist()


def _class_freq(kind: str, epochs: int = 40) -> np.ndarray:
    sampler = EpochSampler(LABELS, kind, seed=0)
    drawn = np.concatenate([sampler.epoch_indices(e) for e in range(epochs)])
    return np.bincount(LABELS[drawn], minlength=4) / len(drawn)


def test_class_balanced_frequencies_are_uniform():
    assert np.allclose(_class_freq("class_balanced"), 0.25, atol=0.01)


def test_sqrt_frequencies_follow_sqrt_counts():
    counts = np.bincount(LABELS)
    assert np.allclose(_class_freq("sqrt"), np.sqrt(counts) / np.sqrt(counts).sum(), atol=0.01)


def test_images_within_a_class_are_drawn_uniformly():
    sampler = EpochSampler(LABELS, "class_balanced", seed=1)
    drawn = np.concatenate([sampler.epoch_indices(e) for e in range(40)])
    tail = drawn[LABELS[drawn] == 3]  # 4 images, ~5,300 draws
    assert np.allclose(np.bincount(tail - 525, minlength=4) / len(tail), 0.25, atol=0.03)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler kind 'balanced'"):
        EpochSampler(LABELS, "balanced")
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(LABELS, "instance", num_replicas=2, rank=2)


def test_the_default_sampler_is_instance_sampling():
    default, instance = EpochSampler(LABELS, seed=3), EpochSampler(LABELS, "instance", seed=3)
    assert default.kind == "instance"
    np.testing.assert_array_equal(default.epoch_indices(2), instance.epoch_indices(2))
