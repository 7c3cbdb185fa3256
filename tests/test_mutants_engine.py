"""Behaviours of rayexperts.engine.schedule and rayexperts.engine.mixup that the mutation run (jobs/mutation_score.py) found untested.

Each test asserts what a user relies on (a value computed by hand, a gradient that must or must not flow,
a shape, a device), not the text of the mutant that revealed the gap. Fast: no Ray, CPU only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayexperts.engine.mixup import Mixup


def test_mixup_needs_a_positive_alpha():
    """``train.mixup_alpha`` 0 means no mixup (the engine builds none); a Mixup with alpha <= 0 is an error."""
    for alpha in (0.0, -0.5):
        with pytest.raises(ValueError, match="train.mixup_alpha must be > 0"):
            Mixup(alpha, seed=1)


@pytest.mark.parametrize("seed", [7, 1000, 2**32 + 5])
def test_mixup_draws_are_a_function_of_the_seed(seed):
    """λ comes from numpy's Beta after ``RandomState(seed mod 2³²)`` and the permutation from torch's generator
    seeded with ``seed``: a resumed epoch mixes exactly as before, whatever the seed."""
    first, again = Mixup(0.4, seed), Mixup(0.4, seed)
    lam_rng, perm_rng = np.random.RandomState(seed % 2**32), torch.Generator().manual_seed(seed)
    for batch in (6, 6, 9):
        lam, perm = first.draw(batch, torch.device("cpu"))
        assert lam == pytest.approx(lam_rng.beta(0.4, 0.4), abs=0, rel=0)
        assert torch.equal(perm, torch.randperm(batch, generator=perm_rng))
        lam2, perm2 = again.draw(batch, torch.device("cpu"))
        assert lam2 == lam and torch.equal(perm2, perm)


def test_mixup_permutation_is_sent_to_the_batchs_device():
    """The permutation is drawn on the host and lands on the device of the batch (``meta`` stands in for CUDA)."""
    lam, perm = Mixup(0.2, 3).draw(5, torch.device("meta"))
    assert perm.device.type == "meta" and perm.shape == (5,) and 0 <= lam <= 1


def test_the_optimizer_applies_the_configured_weight_decay_momentum_and_nesterov():
    """SGD with the config's lr, momentum, Nesterov and weight decay: one step on a zero gradient moves a weight by
    exactly ``-lr · wd · w``."""
    from omegaconf import OmegaConf

    from rayexperts.engine.schedule import build_optimizer

    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    cfg = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4})
    opt = build_optimizer([w], cfg)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    w.grad = torch.zeros(2)
    opt.step()
    # Nesterov: d = g + wd·w; buf = d; step = d + 0.9·buf = 1.9·wd·w
    torch.testing.assert_close(w.detach(), torch.tensor([2.0, -1.0]) * (1 - 0.1 * 1.9 * 5e-4))
    cfg.momentum = 0.0  # Nesterov needs momentum: off without it
    assert build_optimizer([w], cfg).param_groups[0]["nesterov"] is False


def test_cosine_after_warm_up_spans_the_remaining_epochs_by_hand():
    """Cosine after W warm-up epochs decays over ``epochs − W`` (half-way at ``W + (epochs − W)/2``), and over one
    epoch when only one remains; a parameter group's ``lr_scale`` multiplies the scheduled lr."""
    from rayexperts.config import load_config
    from rayexperts.engine.schedule import lr_schedule, set_lr

    lr = lr_schedule(load_config(None, ["train.lr=0.2", "train.schedule=cosine", "train.epochs=10",
                                        "train.warmup_epochs=2"]).train)
    assert lr(1.0) == pytest.approx(0.1) and lr(2.0) == pytest.approx(0.2)
    assert lr(6.0) == pytest.approx(0.1) and lr(10.0) == pytest.approx(0.0, abs=1e-12)
    one = lr_schedule(load_config(None, ["train.lr=0.2", "train.schedule=cosine", "train.epochs=3",
                                         "train.warmup_epochs=2"]).train)
    assert one(2.5) == pytest.approx(0.1) and one(3.0) == pytest.approx(0.0, abs=1e-12)

    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.05)]


def test_one_warm_up_epoch_and_a_milestone_at_its_end():
    """W = 1 still warms up (half the lr half-way through it); at t = W the warm-up is over, so a milestone at W
    already applies."""
    from rayexperts.config import load_config
    from rayexperts.engine.schedule import lr_schedule

    one = lr_schedule(load_config(None, ["train.lr=0.2", "train.schedule=multistep", "train.milestones=[1]",
                                         "train.gamma=0.1", "train.warmup_epochs=1", "train.epochs=5"]).train)
    assert one(0.5) == pytest.approx(0.1) and one(1.0) == pytest.approx(0.02)
