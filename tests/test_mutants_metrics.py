"""Behaviours of rayexperts.eval.metrics and rayexperts.eval.tables that the mutation run (jobs/mutation_score.py) found untested.

Each test asserts what a user relies on (a value computed by hand, a gradient that must or must not flow,
a shape, a device), not the text of the mutant that revealed the gap. Fast: no Ray, CPU only.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from rayexperts.eval import metrics
from rayexperts.eval.metrics import EvalAccumulator, expected_calibration_error

GROUPS = np.array(["many", "many", "medium", "few"])


def test_ece_has_15_bins_by_default():
    """Two samples of confidence 0.62 and 0.65 share bin 9 of 15 (|0.5 − 0.635|) but not of 16."""
    probs = torch.tensor([[0.62, 0.38], [0.35, 0.65]])
    targets = torch.tensor([0, 0])  # the first right, the second wrong
    assert expected_calibration_error(probs, targets) == pytest.approx(abs(0.5 - 0.635))
    assert expected_calibration_error(probs, targets, 16) == pytest.approx(0.5 * 0.38 + 0.5 * 0.65)


def test_ece_accumulates_on_the_inputs_device(monkeypatch):
    """ECE's sums are kept where the probabilities are (a GPU tensor is never summed on the host; ``meta`` stands
    in for CUDA)."""
    seen = []

    class Built(Exception):
        pass

    class Spy(EvalAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.bins["v"].device)
            raise Built  # a meta tensor has no values to read back: stop once the sums exist

    monkeypatch.setattr(metrics, "EvalAccumulator", Spy)
    with pytest.raises(Built):
        expected_calibration_error(torch.full((2, 3), 1 / 3, device="meta"), torch.tensor([0, 1], device="meta"))
    assert seen == [torch.device("meta")]


def test_a_per_sample_statistic_by_class_and_shot_group():
    """``update_stat`` sums a statistic and counts samples per class over batches; ``stat_summary`` gives its mean
    overall and per shot group (NaN for a group without samples), with the prefix in front of every name."""
    acc = EvalAccumulator(["v"], num_classes=4)
    acc.update_stat("experts", torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 0, 1]))
    acc.update_stat("experts", torch.tensor([2.0, 2.0], requires_grad=True), torch.tensor([1, 3]))
    sums, counts = acc.stats["experts"]
    assert sums.tolist() == [4.0, 4.0, 0.0, 2.0] and counts.tolist() == [2.0, 2.0, 0.0, 1.0]
    assert sums.dtype == torch.float64
    s = acc.stat_summary("experts", GROUPS, prefix="val_")
    assert set(s) == {"val_experts", "val_experts_many", "val_experts_medium", "val_experts_few"}
    assert s["val_experts"] == pytest.approx(10 / 5) and s["val_experts_many"] == pytest.approx(8 / 4)
    assert s["val_experts_few"] == pytest.approx(2.0) and math.isnan(s["val_experts_medium"])
    assert acc.stat_summary("experts", GROUPS)["experts"] == pytest.approx(2.0)


def test_an_empty_shot_group_is_nan_without_a_warning():
    """A shot group with no test sample reports NaN quietly (no 0/0 RuntimeWarning in the run's log)."""
    acc = EvalAccumulator(["v"], num_classes=4)
    acc.update("v", torch.eye(4)[[0, 1, 3]] * 5, torch.tensor([0, 1, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = acc.summary("v", GROUPS)
    assert math.isnan(s["top1_medium"]) and s["top1_many"] == 1.0 and s["top1"] == 1.0


def test_the_expert_kl_of_a_single_sample_is_reported():
    """One evaluated sample is enough for the experts' mean KL (only no sample at all gives no entry)."""
    acc = EvalAccumulator(["v"], num_classes=4)
    assert acc.expert_kl_summary(GROUPS) == {}
    a, b = torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    acc.update_expert_kl([a, b], torch.tensor([2]))
    s = acc.expert_kl_summary(GROUPS, prefix="test_")
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    kl_pq, kl_qp = (p * (p / q).log()).sum().item(), (q * (q / p).log()).sum().item()
    assert s["test_expert_kl"] == pytest.approx(s["test_expert_kl_medium"])
    assert s["test_expert_kl"] in (pytest.approx(kl_pq), pytest.approx(kl_qp), pytest.approx((kl_pq + kl_qp) / 2))
    assert math.isnan(s["test_expert_kl_many"])


def test_the_summary_reports_the_views_ece():
    """``summary`` carries the view's ECE (the number the run report prints beside top-1)."""
    acc = EvalAccumulator(["v"], num_classes=4)
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    acc.update("v", logits, torch.tensor([0, 2, 3]))
    s = acc.summary("v", GROUPS, prefix="test_")
    expected = expected_calibration_error(torch.softmax(logits, 1), torch.tensor([0, 2, 3]))
    assert s["test_ece"] == pytest.approx(expected) and s["test_ece"] > 0


def test_an_accumulator_has_15_confidence_bins_by_default():
    acc = EvalAccumulator(["v"], num_classes=4)
    acc.update("v", torch.tensor([[0.0, 3.0, 0.0, 0.0]]), torch.tensor([1]))
    assert len(acc.reliability("v")["bin"]) == 15 == len(acc.reliability("v")["count"])


def test_evaluating_a_batch_warns_about_nothing():
    """``update`` takes the softmax over the class dimension explicitly (no implicit-dim warning in the run's log)."""
    acc = EvalAccumulator(["v"], num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc.update("v", torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), torch.tensor([1, 2]))
        acc.update_expert_kl([torch.zeros(2, 4), torch.ones(2, 4)], torch.tensor([1, 2]))
    assert acc.summary("v", GROUPS)["top1"] == 0.5


def test_the_expert_kl_accumulates_over_batches():
    """Two batches count as the union of their samples, per class."""
    acc = EvalAccumulator(["v"], num_classes=4)
    a, b = torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 4)
    acc.update_expert_kl([a, b], torch.tensor([0]))
    one = acc.expert_kl_summary(GROUPS)["expert_kl"]
    acc.update_expert_kl([b, b], torch.tensor([1]))  # identical experts: KL 0
    acc.update_expert_kl([a, b], torch.tensor([2]))
    s = acc.expert_kl_summary(GROUPS)
    assert acc.kl_count.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert s["expert_kl"] == pytest.approx(2 * one / 3) and s["expert_kl_many"] == pytest.approx(one / 2)
    assert s["expert_kl_medium"] == pytest.approx(one)
