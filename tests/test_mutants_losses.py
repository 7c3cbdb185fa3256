"""Behaviours of rayexperts.losses that the mutation run (jobs/mutation_score.py) found untested.

Each test asserts what a user relies on (a value computed by hand, a gradient that must or must not flow,
a shape, a device), not the text of the mutant that revealed the gap. Fast: no Ray, CPU only.
"""

from __future__ import annotations

import math

import pytest
import torch

from rayexperts import losses as L


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def log_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    s = math.log(sum(math.exp(x - m) for x in xs)) + m
    return [x - s for x in xs]


# ------------------------------------------------------------------------------ arguments named in errors

@pytest.mark.parametrize("call, name", [
    (lambda bad: L.router_loss(bad, bad), "router_logits"),
    (lambda bad: L.ldam_loss(bad, torch.zeros(3, dtype=torch.long), torch.ones(3)), "cos_logits"),
    (lambda bad: L.cbd_distillation_loss(bad, torch.zeros(2, 3)), "student_features"),
    (lambda bad: L.cbd_distillation_loss(torch.zeros(2, 3), [torch.zeros(2, 3), bad]), r"teacher_features\[1\]"),
    (lambda bad: L.balpoe_predict_logits([bad]), r"expert_logits\[0\]"),
    (lambda bad: L.balpoe_loss([bad], torch.zeros(3, dtype=torch.long), torch.ones(3), (0.0,)), r"expert_logits\[0\]"),
    (lambda bad: L.hard_category_mask(bad, torch.zeros(3, dtype=torch.long), 1), "anchor_logits"),
    (lambda bad: L.sade_aggregation_loss(torch.zeros(1), [bad], [torch.zeros(2, 3)]), r"view1_expert_logits\[0\]"),
    (lambda bad: L.sade_aggregation_loss(torch.zeros(1), [torch.zeros(2, 3)], [bad]), r"view2_expert_logits\[0\]"),
    (lambda bad: L.balanced_logits(bad, torch.ones(3)), "logits"),
    (lambda bad: L.balanced_softmax_loss(bad, torch.zeros(3, dtype=torch.long), torch.ones(3)), "logits"),
    (lambda bad: L.feature_kd_loss([torch.zeros(2, 3), bad]), r"expert_features\[1\]"),
    (lambda bad: L.info_nce_loss(bad, torch.zeros(2, 3), torch.zeros(4, 3), 0.1), "query"),
    (lambda bad: L.logit_kd_loss([bad]), r"expert_logits\[0\]"),
    (lambda bad: L.sade_loss([bad] * 3, torch.zeros(3, dtype=torch.long), torch.ones(3)), r"expert_logits\[0\]"),
])
def test_a_wrong_shape_is_reported_with_the_arguments_name(call, name):
    """A 1-D tensor where a ``[B, C]`` one belongs: the ValueError names the argument the caller got wrong."""
    with pytest.raises(ValueError, match=rf"^{name} must be 2-D"):
        call(torch.zeros(3))


def test_balpoe_without_experts_names_its_argument():
    with pytest.raises(ValueError, match=r"^expert_logits is empty"):
        L.balpoe_predict_logits([])
    with pytest.raises(ValueError, match=r"^expert_logits is empty"):
        L.balpoe_loss([], torch.zeros(2, dtype=torch.long), torch.ones(3), ())


# ------------------------------------------------------------------------------ limits of the RIDE helpers

def test_diversity_temperatures_at_the_ends_of_the_reweight_factor():
    """f = 0 gives every class the base temperature; f = 1 gives T_c ∝ π_c (the head class at the base)."""
    counts = f64([8.0, 4.0, 2.0])
    torch.testing.assert_close(L.diversity_temperatures(counts, 0.0, 2.0), f64([2.0, 2.0, 2.0]))
    torch.testing.assert_close(L.diversity_temperatures(counts, 1.0, 2.0), f64([2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="base_temperature must be > 0"):
        L.diversity_temperatures(counts, 0.05, 0.0)
    with pytest.raises(ValueError, match="base_temperature must be > 0"):
        L.ride_loss([f64([[1.0, 2.0, 3.0]])], torch.tensor([0]), counts, False, base_temperature=0.0)


def test_router_loss_default_positive_weight_is_100():
    """RIDE's router BCE weighs "this expert helps" 100 times by default: mean of 100·h·softplus(−x) + (1−h)·softplus(x)."""
    x, h = f64([[0.5, -1.0], [2.0, 0.0]]), f64([[1.0, 0.0], [0.0, 1.0]])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    hand = (100 * sp(-0.5) + sp(-1.0) + sp(2.0) + 100 * sp(0.0)) / 4
    assert L.router_loss(x, h).item() == pytest.approx(hand, rel=1e-12)


# ------------------------------------------------------------------------------ float64 stays float64

def test_ldam_margins_follow_float64_logits():
    """With float64 cosines the margins are computed in float64 too (integer counts): the loss equals the value by
    hand to 1e-12, not to float32's 1e-7."""
    z = f64([[0.3, -0.2, 0.7], [0.1, 0.4, -0.5]])
    counts = torch.tensor([100, 10, 3])
    y = torch.tensor([2, 0])
    m = [0.5 * (3 / n) ** 0.25 for n in (100, 10, 3)]
    rows = [[30 * (v - (m[c] if c == t else 0.0)) for c, v in enumerate(r)] for r, t in zip(z.tolist(), y.tolist())]
    hand = -sum(log_softmax(r)[t] for r, t in zip(rows, y.tolist())) / 2
    out = L.ldam_loss(z, y, counts)
    assert out.dtype == torch.float64 and out.item() == pytest.approx(hand, rel=1e-12, abs=0)


def test_balpoe_prior_follows_float64_logits():
    """``log π_test`` is added in the logits' precision, whatever the prior tensor's dtype."""
    z = [f64([[1.0, 2.0, 3.0]]), f64([[0.5, 0.0, -1.0]])]
    prior = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float32)
    hand = [(a + b) / 2 + math.log(p / sum(prior.tolist())) for a, b, p in zip([1.0, 2.0, 3.0], [0.5, 0.0, -1.0],
                                                                               prior.tolist())]
    out = L.balpoe_predict_logits(z, prior)
    assert out.dtype == torch.float64
    assert out[0].tolist() == pytest.approx(hand, rel=1e-13, abs=1e-13)


def test_cbd_distillation_is_computed_in_the_students_precision():
    """The teachers' (ℓ2-normalised) features are cast to the student's dtype, so the loss has the student's
    precision: bf16 for a bf16 student, float64 (by hand to 1e-12) for a float64 one."""
    v = f64([[1.0, 2.0, 0.5, -1.0]])
    t1, t2 = f64([[3.0, 4.0]]), f64([[1.0, -1.0]])
    target = [0.6, 0.8, 1 / math.sqrt(2), -1 / math.sqrt(2)]
    vv = v[0].tolist()
    cos = sum(a * b for a, b in zip(vv, target)) / (math.sqrt(sum(a * a for a in vv)) * math.sqrt(2))
    out = L.cbd_distillation_loss(v, [t1, t2])
    assert out.dtype == torch.float64 and out.item() == pytest.approx(1 - cos, rel=1e-12)
    low = L.cbd_distillation_loss(v.bfloat16(), [t1.float(), t2.float()])
    assert low.dtype == torch.bfloat16 and low.item() == pytest.approx(1 - cos, abs=2e-2)


def test_balpoe_loss_follows_float64_logits():
    """Integer class counts with float64 logits: ``log π`` in float64, the loss by hand to 1e-12."""
    z = [f64([[1.0, 2.0, 0.5]]), f64([[0.3, -1.0, 2.0]])]
    counts, y, taus = torch.tensor([60, 30, 7]), torch.tensor([2]), (0.0, 1.5)
    log_prior = [math.log(n / 97 + 1e-9) for n in (60, 30, 7)]
    hand = sum(-log_softmax([v + tau * lp for v, lp in zip(e[0].tolist(), log_prior)])[2] for e, tau in zip(z, taus)) / 2
    out = L.balpoe_loss(z, y, counts, taus)
    assert out.dtype == torch.float64 and out.item() == pytest.approx(hand, rel=1e-12, abs=0)


# ------------------------------------------------------------------------------ NCL's hard categories and NIL

def test_hard_category_count_must_be_a_plain_int():
    """``num_hard`` is an int >= 0: a bool or a float is refused (the mask would be silently wrong)."""
    z, y = torch.zeros(2, 4), torch.tensor([0, 1])
    for bad in (True, 1.5, -1):
        with pytest.raises(ValueError, match="num_hard must be an int >= 0"):
            L.hard_category_mask(z, y, bad)


def test_hard_category_mask_is_built_on_the_logits_device():
    """The mask and the class ids it is built from live on the logits' device (``meta`` stands in for CUDA)."""
    mask = L.hard_category_mask(torch.zeros(2, 5, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"), 2)
    assert mask.device.type == "meta" and mask.shape == (2, 5) and mask.dtype == torch.bool


def test_nil_loss_sums_over_experts_and_averages_over_the_batch():
    """L_nil with K = 2 experts and B = 3 samples: Σ_k −log p_y(x; θ_k) (+ the hard-set term), mean over the batch."""
    z = [f64([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 3.0, 1.0]]), f64([[2.0, 1.0, 0.0], [0.0, -1.0, 1.0],
                                                                       [1.0, 1.0, 1.0]])]
    y, counts = torch.tensor([0, 2, 1]), f64([4.0, 2.0, 1.0])
    mask = torch.tensor([[True, True, False], [False, True, True], [True, True, False]])
    logn = [math.log(n) for n in (4.0, 2.0, 1.0)]
    plain = hard = 0.0
    for e in z:
        for row, t, m in zip(e.tolist(), y.tolist(), mask.tolist()):
            bal = [v + ln for v, ln in zip(row, logn)]
            plain -= log_softmax(bal)[t]
            kept = [c for c in range(3) if m[c]]
            hard -= log_softmax([bal[c] for c in kept])[kept.index(t)]
    assert L.nil_loss(z, y, counts, None, hard=False).item() == pytest.approx(plain / 3, rel=1e-12)
    assert L.nil_loss(z, y, counts, mask).item() == pytest.approx((plain + hard) / 3, rel=1e-12)


def test_nbod_keeps_the_gradient_on_both_sides_by_default():
    """NCL's distillation has no stop-gradient by default (eq. 8–9, the official NBOD): the target side ``p(θ_k)``
    gets gradient too, so the default equals ``detach_target=False`` and differs from ``True``."""
    def grads(**kw):
        a = f64([[1.0, 0.0, -1.0], [0.2, 0.4, 0.1]]).requires_grad_()
        b = f64([[0.0, 2.0, 0.5], [1.0, -1.0, 0.0]]).requires_grad_()
        L.nbod_loss([a, b], f64([3.0, 2.0, 1.0]), None, bod_hard=False, **kw).backward()
        return a.grad, b.grad

    default, both, detached = grads(), grads(detach_target=False), grads(detach_target=True)
    torch.testing.assert_close(default, both)
    assert not torch.allclose(default[0], detached[0])


def test_ldam_helpers_on_a_single_class_and_integer_counts():
    """One class is a valid (if degenerate) count vector; an empty one is not. Integer counts give float32 weights,
    the DRW weights of β = 0 (all ones) included."""
    torch.testing.assert_close(L.ldam_margins(torch.tensor([5])), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="class_counts must be a non-empty 1-D"):
        L.ldam_margins(torch.tensor([], dtype=torch.long))
    ones = L.drw_weights(torch.tensor([5, 3, 1]), beta=0.0)
    assert ones.dtype == torch.float32 and ones.tolist() == [1.0, 1.0, 1.0]


def test_nil_loss_with_float32_counts_stays_float64():
    """``τ·log n`` is taken in the logits' precision even when the class counts are float32."""
    z = [f64([[1.0, 0.0, -1.0]]), f64([[0.3, 0.2, 0.1]])]
    counts = torch.tensor([7.0, 3.0, 1.0])
    hand = -sum(log_softmax([v + 0.7 * math.log(n) for v, n in zip(e[0].tolist(), (7.0, 3.0, 1.0))])[1] for e in z)
    out = L.nil_loss(z, torch.tensor([1]), counts, None, tau=0.7, hard=False)
    assert out.dtype == torch.float64 and out.item() == pytest.approx(hand, rel=1e-13, abs=0)


def test_nbod_detach_target_also_stops_the_hard_term_gradient():
    """``detach_target=True`` detaches the target side of BOD_hard as well: alone, the hard term's gradient then
    differs from the undetached one."""
    mask = torch.tensor([[True, True, False], [True, False, True]])

    def grad(detach: bool):
        a = f64([[1.0, 0.0, -1.0], [0.2, 0.4, 0.1]]).requires_grad_()
        b = f64([[0.0, 2.0, 0.5], [1.0, -1.0, 0.0]]).requires_grad_()
        L.nbod_loss([a, b], f64([3.0, 2.0, 1.0]), mask, bod_all=False, detach_target=detach).backward()
        return a.grad

    assert not torch.allclose(grad(True), grad(False))


def test_sade_aggregation_weights_are_softmaxed_in_the_logits_precision():
    """float32 raw weights with float64 logits: ``softmax(w)`` and the loss are computed in float64 (by hand, 1e-12)."""
    w = torch.tensor([0.1, 0.5, -0.2])
    z1 = [f64([[1.0, 2.0, 0.0]]), f64([[0.0, 1.0, 3.0]]), f64([[2.0, 2.0, 1.0]])]
    z2 = [f64([[0.5, 2.0, 1.0]]), f64([[1.0, 0.0, 2.0]]), f64([[1.0, 3.0, 0.0]])]
    wl = w.tolist()
    a = [math.exp(v) / sum(math.exp(u) for u in wl) for v in wl]

    def probs(z):
        agg = [sum(a[k] * z[k][0, c].item() for k in range(3)) for c in range(3)]
        return [math.exp(v) for v in log_softmax(agg)]

    p1, p2 = probs(z1), probs(z2)
    cos = sum(x * y for x, y in zip(p1, p2)) / math.sqrt(sum(x * x for x in p1) * sum(y * y for y in p2))
    out = L.sade_aggregation_loss(w, z1, z2)
    assert out.dtype == torch.float64 and out.item() == pytest.approx(-cos, rel=1e-13, abs=0)


# ------------------------------------------------------------------------------ which side of a KL learns

def _kd_grads(loss, **kw):
    a = f64([[1.0, 0.0, 2.0], [0.5, -0.5, 0.0]]).requires_grad_()
    b = f64([[0.0, 2.0, 1.0], [1.0, 1.0, -1.0]]).requires_grad_()
    loss([a, b], **kw).backward()
    return a.grad, b.grad


def _by_hand_kd_grad(tau: float, detached: bool) -> torch.Tensor:
    """d/dz_a of the mean over the batch and the two ordered pairs of τ²·KL(p_k ‖ p_q), p = softmax(z/τ), with
    the target side stopped (``detached``) or not."""
    a = f64([[1.0, 0.0, 2.0], [0.5, -0.5, 0.0]]).requires_grad_()
    b = f64([[0.0, 2.0, 1.0], [1.0, 1.0, -1.0]])
    la, lb = (a / tau).log_softmax(-1), (b / tau).log_softmax(-1)
    ta = la.detach() if detached else la
    kl_ab = (ta.exp() * (ta - lb)).sum(-1)  # a the target
    kl_ba = (lb.exp() * (lb - la)).sum(-1)  # a the student
    (tau**2 * (kl_ab + kl_ba).mean() / 2).backward()
    return a.grad


@pytest.mark.parametrize("loss", [L.logit_kd_loss, L.feature_kd_loss])
def test_ecl_distillation_lets_both_sides_learn_by_default(loss):
    """ECL's eq. 7–8 have no stop-gradient: by default an expert learns as target and as student; with
    ``detach_target=True`` only as student. Both by hand (K = 2, τ = 2)."""
    default = _kd_grads(loss, tau=2.0)
    torch.testing.assert_close(default[0], _by_hand_kd_grad(2.0, detached=False))
    torch.testing.assert_close(_kd_grads(loss, tau=2.0, detach_target=False)[0], default[0])
    torch.testing.assert_close(_kd_grads(loss, tau=2.0, detach_target=True)[0], _by_hand_kd_grad(2.0, detached=True))


def test_logit_kd_with_per_expert_weights_keeps_both_sides_learning():
    """``[K, B]`` BKT weights weight each student's incoming KL; the target side still learns by default."""
    w = f64([[1.5, 0.5], [0.2, 1.0]])
    default = _kd_grads(L.logit_kd_loss, weights=w)
    detached = _kd_grads(L.logit_kd_loss, weights=w, detach_target=True)
    assert not torch.allclose(default[0], detached[0])


def test_expert_disagreement_of_one_expert_is_zero_per_sample():
    """With one expert there is no pair: a zero per sample, ``[B]``, like the per-sample values of K > 1."""
    out = L.expert_disagreement([torch.randn(4, 3)])
    assert out.shape == (4,) and torch.equal(out, torch.zeros(4))
    assert L.expert_disagreement([torch.randn(4, 3), torch.randn(4, 3)]).shape == (4,)


def test_feature_kd_temperature_by_hand():
    """ECL eq. 8 for two experts: τ²·(KL(P1‖P2) + KL(P2‖P1))/2 with P = softmax(v/τ); τ = 1 by default."""
    v1, v2 = f64([[1.0, 0.0, 2.0]]), f64([[0.0, 1.0, 0.0]])

    def hand(tau):
        p, q = [math.exp(x) for x in log_softmax([x / tau for x in v1[0].tolist()])], \
            [math.exp(x) for x in log_softmax([x / tau for x in v2[0].tolist()])]
        kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))  # noqa: E731
        return tau**2 * (kl(p, q) + kl(q, p)) / 2

    assert L.feature_kd_loss([v1, v2]).item() == pytest.approx(hand(1.0))
    assert L.feature_kd_loss([v1, v2], tau=3.0).item() == pytest.approx(hand(3.0))
    assert L.feature_kd_loss([v1, v2], tau=0.5).item() == pytest.approx(hand(0.5))



def test_sade_loss_names_itself_when_it_gets_the_wrong_number_of_experts():
    with pytest.raises(ValueError, match=r"^sade_loss: expected 3 experts, got 2"):
        L.sade_loss([torch.zeros(2, 3)] * 2, torch.zeros(2, dtype=torch.long), torch.ones(3))


def test_info_nce_needs_a_positive_temperature():
    q = torch.nn.functional.normalize(torch.ones(2, 3), dim=1)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="temperature"):
            L.info_nce_loss(q, q, q, bad)


def test_inverse_prior_keeps_tied_classes_in_order_on_a_long_prior():
    """SADE's inverse prior: the class with the k-th largest prior gets the k-th smallest value, ties broken by
    class index (a stable sort); on 100 classes with many ties an unstable sort would reorder them. A single class
    is its own inverse; an empty prior is an error."""
    prior = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(0)).double() + 1
    prior = prior / prior.sum()
    values = sorted(prior.tolist())
    order = sorted(range(100), key=lambda c: prior[c].item())  # Python's sort is stable
    rank = {c: r for r, c in enumerate(order)}
    expected = torch.tensor([values[99 - rank[c]] for c in range(100)], dtype=torch.float64)
    torch.testing.assert_close(L.inverse_prior(prior), expected, rtol=0, atol=0)
    torch.testing.assert_close(L.inverse_prior(f64([1.0])), f64([1.0]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        L.inverse_prior(torch.zeros(0))


@pytest.mark.parametrize("name", ["balanced_logits", "pc_softmax_logits", "sade_loss", "ldam_loss", "balpoe_loss"])
def test_class_counts_are_used_in_the_logits_precision(name):
    """Integer counts (or a float32 test prior) with float64 logits give the float64 result (the logs taken in
    float64), and float32 logits with float64 counts stay float32."""
    z = f64([[0.3, -1.2, 2.0], [1.0, 0.5, -0.7]])
    y = torch.tensor([0, 2])
    counts = torch.tensor([1000, 30, 7])
    calls = {
        "balanced_logits": lambda z, c, p: L.balanced_logits(z, c),
        "pc_softmax_logits": lambda z, c, p: L.pc_softmax_logits(z, c, p),
        "sade_loss": lambda z, c, p: L.sade_loss([z, z * 2, z - 1], y, c),
        "ldam_loss": lambda z, c, p: L.ldam_loss(z.tanh(), y, c),
        "balpoe_loss": lambda z, c, p: L.balpoe_loss([z, z * 2], y, c, (0.0, 1.0)),
    }
    call = calls[name]
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float32)
    exact = call(z, counts.double(), prior.double())
    torch.testing.assert_close(call(z, counts, prior), exact, rtol=0, atol=1e-14)
    assert call(z.float(), counts.double(), prior.double()).dtype == torch.float32


def test_logit_kd_weights_do_not_change_the_logits_precision():
    """float64 BKT weights on float32 logits: the loss stays float32 (per-sample weights and per-expert rows)."""
    z = [torch.randn(4, 3, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    assert L.logit_kd_loss(z, torch.rand(4, dtype=torch.float64)).dtype == torch.float32
    assert L.logit_kd_loss(z, torch.rand(2, 4, dtype=torch.float64)).dtype == torch.float32


def test_mutual_learning_of_four_experts_by_hand_in_float64():
    """``Σ_k KL(p̄_{−k} ‖ p_k)`` with p̄_{−k} the mean of the three other experts, in float64 to 1e-14."""
    z = [torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    p = [t.softmax(-1) for t in z]
    total = torch.zeros(3, dtype=torch.float64)
    for k in range(4):
        avg = sum(p[q] for q in range(4) if q != k) / 3
        total += (avg * (avg.log() - p[k].log())).sum(-1)
    torch.testing.assert_close(L.mutual_learning_loss(z), total.mean(), rtol=0, atol=1e-14)
