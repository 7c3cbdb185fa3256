"""Each method's loss assembly and the metrics that decide results, against values computed by hand
from docs/methods.md's formulas with plain Python floats (issue 16: mutations that no test caught)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayexperts.config import load_config
from rayexperts.eval.metrics import EvalAccumulator, expected_calibration_error, pairwise_kl
from rayexperts.methods import METHODS
from rayexperts.models import ModelOutput

LOGITS = [[[1.0, 0.2, -0.5], [0.3, -1.0, 2.0]],  # expert 0: 2 samples, 3 classes
          [[0.0, 1.5, 0.5], [1.0, 0.0, -1.0]],  # expert 1
          [[-0.4, 0.1, 0.9], [2.0, 0.5, 0.0]]]  # expert 2
TARGETS = [0, 2]
COUNTS = [50.0, 10.0, 2.0]


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def ce(z: list[float], y: int) -> float:
    return -math.log(softmax(z)[y])


def method(name: str, *overrides: str):
    cfg = load_config(None, [f"method={name}", "data.name=digits-lt", *overrides])
    return METHODS.get(name)(cfg, torch.tensor(COUNTS), in_channels=1)  # digits: 8×8 grey


def output(num_experts: int) -> ModelOutput:
    logits = [torch.tensor(z) for z in LOGITS[:num_experts]]
    return ModelOutput([torch.zeros(2, 4)] * num_experts, logits)


# -------------------------------------------------------------------------- MLLT

@pytest.mark.parametrize("teacher", ["ensemble", "individual"])
def test_mllt_loss_is_ce_plus_mutual_learning_of_its_teacher(teacher: str):
    """MLLT eq. 3-5: L = Σ_k CE(z^k, y) + L_mut^k, with the ensemble (mean of the others' p) or the
    individual (mean of the KLs to each other expert) teacher; batch mean."""
    res = method("mllt", f"mllt.teacher={teacher}").loss(output(3), torch.tensor(TARGETS))
    cls = mut = 0.0
    for b, y in enumerate(TARGETS):
        p = [softmax(LOGITS[k][b]) for k in range(3)]
        for k in range(3):
            cls += ce(LOGITS[k][b], y) / 2
            others = [p[l] for l in range(3) if l != k]
            if teacher == "ensemble":
                mean = [sum(o[j] for o in others) / 2 for j in range(3)]
                mut += kl(mean, p[k]) / 2
            else:
                mut += sum(kl(o, p[k]) for o in others) / 2 / 2
    assert res.terms["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert res.terms["mutual"].item() == pytest.approx(mut, rel=1e-5)
    assert res.total.item() == pytest.approx(cls + mut, rel=1e-5)


def test_mllt_teachers_give_different_losses():
    y = torch.tensor(TARGETS)
    ensemble = method("mllt", "mllt.teacher=ensemble").loss(output(3), y).terms["mutual"].item()
    individual = method("mllt", "mllt.teacher=individual").loss(output(3), y).terms["mutual"].item()
    assert individual > ensemble + 1e-3  # Jensen: the KL to the mean is below the mean of the KLs


# -------------------------------------------------------------------------- BSCE

@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_bsce_loss_is_ce_on_logits_plus_tau_log_prior(tau: float):
    """Balanced softmax: CE(z_j + τ·log(n_j / n), y), batch mean, summed over experts."""
    res = method("bsce", f"bsce.tau={tau}").loss(output(1), torch.tensor(TARGETS))
    n = sum(COUNTS)
    expected = sum(ce([z + tau * math.log(c / n) for z, c in zip(LOGITS[0][b], COUNTS)], y)
                   for b, y in enumerate(TARGETS)) / 2
    assert res.total.item() == pytest.approx(expected, rel=1e-5)
    assert res.terms["bsce"].item() == pytest.approx(expected, rel=1e-5)


# -------------------------------------------------------------------------- cosine classifier scale

@pytest.mark.parametrize("scale", [16.0, 32.0])
def test_models_are_built_with_the_configured_cosine_scale(scale: float):
    """docs/methods.md "Cosine classifier": z = γ · normalize(W) normalize(v), γ = model.cosine_scale."""
    m = method("mllt", f"model.cosine_scale={scale}")
    model = m.build_model().eval()
    torch.manual_seed(0)
    out = model(torch.randn(2, 1, 8, 8))
    for head, v, z in zip(model.heads, out.features, out.logits):
        w = torch.nn.functional.normalize(head.weight, dim=1)
        cos = torch.nn.functional.normalize(v, dim=1) @ w.T
        torch.testing.assert_close(z, scale * cos)
        assert z.abs().max() <= scale + 1e-5


# -------------------------------------------------------------------------- ECE

def test_ece_bins_are_equal_width_over_num_bins():
    """conf 0.62 and 0.66 share bin ⌊15·conf⌋ = 9 (one gap |0.5 − 0.64|); with ⌊14·conf⌋ they split."""
    probs = torch.tensor([[0.62, 0.38], [0.66, 0.34]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    assert expected_calibration_error(probs, targets, 15) == pytest.approx(abs(0.5 - 0.64), abs=1e-6)
    acc = EvalAccumulator(["v"], 2, 15)
    acc.update("v", probs.log(), targets)
    rel = acc.reliability("v")
    assert rel["count"].tolist() == [0] * 9 + [2] + [0] * 5


def test_ece_weights_each_bin_by_its_share_of_samples():
    """Σ_b (n_b/N)|acc_b − conf_b|: three correct at 0.95 (gap 0.05) and one wrong at 0.55 (gap 0.55)
    give 0.75·0.05 + 0.25·0.55 = 0.175 (the unweighted mean of the two gaps would be 0.3)."""
    probs = torch.tensor([[0.95, 0.05]] * 3 + [[0.55, 0.45]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, targets, 15) == pytest.approx(0.175, abs=1e-6)


def test_ece_of_a_confidence_of_one_falls_in_the_last_bin():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    acc = EvalAccumulator(["v"], 2, 10)
    acc.update("v", probs.clamp_min(1e-30).log(), torch.tensor([0, 1]))
    assert acc.reliability("v")["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]


# -------------------------------------------------------------------------- inter-expert KL

def test_expert_kl_is_the_mean_over_ordered_pairs_for_three_experts():
    """NCL Fig. 1/5b: per sample, 1/(K(K−1)) Σ_{k≠q} KL(p_k ‖ p_q); with K = 3 the divisor is 6."""
    got = pairwise_kl([torch.tensor(z) for z in LOGITS]).tolist()
    for b in range(2):
        p = [softmax(LOGITS[k][b]) for k in range(3)]
        expected = sum(kl(p[k], p[q]) for k in range(3) for q in range(3) if q != k) / 6
        assert got[b] == pytest.approx(expected, rel=1e-5)


def test_expert_kl_columns_by_shot_group():
    """``expert_kl`` is the sample mean over the test set; ``expert_kl_<group>`` over the samples of the
    group's classes (what the metrics table's expert_kl* columns hold)."""
    acc = EvalAccumulator(["v"], 3)
    acc.update_expert_kl([torch.tensor(z) for z in LOGITS], torch.tensor(TARGETS))
    per_sample = pairwise_kl([torch.tensor(z) for z in LOGITS]).tolist()
    s = acc.expert_kl_summary(np.array(["many", "medium", "few"]))
    assert s["expert_kl"] == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    assert s["expert_kl_many"] == pytest.approx(per_sample[0], rel=1e-6)  # sample 0 is of class 0
    assert s["expert_kl_few"] == pytest.approx(per_sample[1], rel=1e-6)  # sample 1 is of class 2
    assert math.isnan(s["expert_kl_medium"])


# ------------------------------------------------- metrics: the cases the mutation run found untested

def test_ece_of_a_single_sample_is_its_confidence_gap():
    """One test image, predicted with confidence p: ECE = |0 − p| when wrong, |1 − p| when right."""
    probs = torch.tensor([[0.8, 0.2]])
    assert expected_calibration_error(probs, torch.tensor([1])) == pytest.approx(0.8)
    assert expected_calibration_error(probs, torch.tensor([0])) == pytest.approx(0.2)


def test_reliability_table_columns_and_values():
    acc = EvalAccumulator(["v"], 2, num_bins=2)
    acc.update("v", torch.tensor([[0.9, 0.8, 0.4], [0.1, 0.2, 0.6]]).t().log(), torch.tensor([0, 1, 1]))
    rel = acc.reliability("v")
    assert list(rel) == ["bin", "count", "confidence", "accuracy"]
    np.testing.assert_allclose(rel["count"], [0, 3])
    np.testing.assert_allclose(rel["confidence"], [np.nan, (0.9 + 0.8 + 0.6) / 3])
    np.testing.assert_allclose(rel["accuracy"], [np.nan, 2 / 3])


def test_a_class_without_test_images_is_nan_without_a_warning(recwarn):
    acc = EvalAccumulator(["v"], 3)
    acc.update("v", torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 0]))
    np.testing.assert_allclose(acc.per_class_accuracy("v"), [0.5, np.nan, np.nan])
    acc.reliability("v")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_expert_kl_is_recorded_for_two_experts():
    acc = EvalAccumulator(["v"], 3)
    acc.update_expert_kl([torch.tensor(LOGITS[0]), torch.tensor(LOGITS[1])], torch.tensor(TARGETS))
    expect = [(kl(softmax(LOGITS[0][b]), softmax(LOGITS[1][b])) + kl(softmax(LOGITS[1][b]), softmax(LOGITS[0][b]))) / 2
              for b in range(2)]
    groups = np.array(["many", "medium", "few"])
    summary = acc.expert_kl_summary(groups)
    assert summary["expert_kl"] == pytest.approx(sum(expect) / 2)
    assert summary["expert_kl_many"] == pytest.approx(expect[0]) and summary["expert_kl_few"] == pytest.approx(expect[1])


def test_all_reduce_sums_every_statistic(monkeypatch):
    """Two workers that saw the same images: every count doubles, every rate (top-1, ECE, expert KL) stays."""
    import torch.distributed as dist

    acc = EvalAccumulator(["v"], 3)
    acc.update("v", torch.tensor(LOGITS[0]), torch.tensor(TARGETS))
    acc.update_expert_kl([torch.tensor(z) for z in LOGITS], torch.tensor(TARGETS))
    groups = np.array(["many", "medium", "few"])
    before, kl_before = acc.summary("v", groups), acc.expert_kl_summary(groups)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))
    acc.all_reduce()
    after = acc.summary("v", groups)
    assert after["num_samples"] == 2 * before["num_samples"] == 4
    assert {k: v for k, v in after.items() if k != "num_samples"} == pytest.approx(
        {k: v for k, v in before.items() if k != "num_samples"}, nan_ok=True)
    assert acc.expert_kl_summary(groups) == pytest.approx(kl_before, nan_ok=True)
    assert acc.kl_count.sum().item() == 4 and acc.bins["v"][0].sum().item() == 4


def test_shot_table_is_in_percent_rounded_to_two_decimals():
    import pandas as pd

    from rayexperts.eval.tables import shot_table

    rows = pd.DataFrame([{"view": "a", "top1": 0.123456, "top1_many": 0.5, "top1_medium": 0.25, "top1_few": np.nan}])
    table = shot_table(rows, "view")
    assert list(table.columns) == ["Many", "Medium", "Few", "All"]
    assert table.loc["a", "All"] == 12.35 and table.loc["a", "Many"] == 50.0 and np.isnan(table.loc["a", "Few"])


# -------------------------------------------------------------------------- CE

def test_ce_loss_reports_its_term():
    res = method("ce").loss(output(1), torch.tensor(TARGETS))
    expect = sum(ce(LOGITS[0][b], y) for b, y in enumerate(TARGETS)) / 2
    assert res.total.item() == pytest.approx(expect)
    assert list(res.terms) == ["ce"] and res.terms["ce"].item() == pytest.approx(expect)
