"""LDAM-DRW, RIDE, SADE and BalPoE losses (rayexperts.losses) against docs/methods.md's test vectors
(§1.7, §2.8, §3.7, §4.7) and against values computed by hand with numpy from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayexperts import losses as L
from rayexperts.data.imbalance import exponential_counts

DTYPES = [(torch.float64, 1e-6), (torch.float32, 1e-4)]
# docs/methods.md prints its vectors to 6 decimals: up to 5e-7 of rounding, so an absolute 1e-6 on top
# of the relative tolerance (float64 1e-6, float32 1e-4)
VEC_ATOL = 1e-6


def t(x, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def y(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


def experts(z, dtype=torch.float64) -> list[torch.Tensor]:
    return list(t(z, dtype))


def close(value: torch.Tensor, expected, rel: float, atol: float | None = None) -> None:
    got = np.asarray(value.detach().double().numpy())
    atol = rel * 1e-2 if atol is None else atol
    np.testing.assert_allclose(got, np.asarray(expected, dtype=np.float64), rtol=rel, atol=atol)


# -- plain numpy formulas (no rayexperts) -----------------------------------------------
def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_ce(logits: np.ndarray, targets, weight=None) -> float:
    """torch's cross_entropy, reduction 'mean' (a weighted mean when ``weight`` is given)."""
    targets = np.asarray(targets)
    nll = -np_log_softmax(logits)[np.arange(len(targets)), targets]
    w = np.ones(logits.shape[1]) if weight is None else np.asarray(weight)
    return float((w[targets] * nll).sum() / w[targets].sum())


def np_margins(n, max_m=0.5) -> np.ndarray:
    m = 1.0 / np.sqrt(np.sqrt(np.asarray(n, dtype=np.float64)))
    return m * (max_m / m.max())


def np_drw(n, beta=0.9999) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return w / w.sum() * len(n)


Z = [[[6, 3, -3], [1.5, 9, 0]], [[4.5, 4.5, 1.5], [0, 6, 3]], [[3, 0, 6], [3, 3, 3]]]  # docs/methods.md §2.8 _Z
Z2 = [[[5, 3.5, -2], [2, 8, 1]], [[4, 5, 1], [0.5, 5, 3.5]], [[2, 1, 7], [2, 3, 4]]]  # §3.7 _Z2
N3 = [100, 10, 1]


# == §1 LDAM-DRW ======================================================================
def ldam_drw_loss(z, targets, counts, epoch0):
    """LDAM-DRW's criterion at 0-indexed epoch ``epoch0``: DRW weights iff epoch0 // 160 == 1."""
    weight = L.drw_weights(counts) if epoch0 // 160 == 1 else None
    return L.ldam_loss(z, targets, counts, weight=weight)


_Z_LDAM = [[0.2, 0.5, -0.1], [0.9, 0.1, 0.0]]
_Z_LDAM4 = [[0.3, -0.2, 0.25, 0.0], [0.1, 0.1, 0.1, 0.1], [-0.5, 0.6, 0.2, 0.3]]
_Z_LDAM5 = [[0.1 * k - 0.3 for k in range(10)], [0.05 * ((3 * k) % 7) for k in range(10)]]
_CIFAR10_IF100 = [int(x) for x in exponential_counts(5000, 10, 100)]  # cifar_lt_counts(10, 0.01)

LDAM_VECTORS = [
    (_Z_LDAM, [1, 0], N3, None, 0.225059),
    (_Z_LDAM, [1, 0], N3, 170, 0.409031),
    (_Z_LDAM, [1, 0], N3, 159, 0.225059),
    (_Z_LDAM4, [2, 3, 1], [500, 100, 20, 5], 199, 14.714297),
    (_Z_LDAM5, [9, 0], _CIFAR10_IF100, 180, 12.082675),
]


@pytest.mark.parametrize("dtype,rel", DTYPES)
@pytest.mark.parametrize("z,targets,counts,epoch0,expected", LDAM_VECTORS)
def test_ldam_vectors(z, targets, counts, epoch0, expected, dtype, rel):
    z, targets, counts = t(z, dtype), y(targets), torch.tensor(counts)
    if epoch0 is None:
        out = L.ldam_loss(z, targets, counts)
    else:
        out = ldam_drw_loss(z, targets, counts, epoch0)
    assert out.dim() == 0 and out.dtype == dtype
    close(out, expected, rel, atol=VEC_ATOL)


def test_cifar10_counts_are_the_reference_ones():
    assert _CIFAR10_IF100 == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(exponential_counts(5000, 10, 100)) == 12406


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_ldam_intermediates(dtype, rel):
    counts = t(N3, dtype)
    close(L.ldam_margins(counts), [0.158114, 0.281171, 0.5], rel, atol=VEC_ATOL)
    close(L.drw_weights(counts), [0.027159, 0.270369, 2.702472], rel, atol=VEC_ATOL)  # drw_weights(n, 160)
    close(L.drw_weights(counts, beta=0.0), [1.0, 1.0, 1.0], 0)  # epochs < 160: beta = 0
    assert L.ldam_margins(counts).dtype == dtype and L.drw_weights(counts).dtype == dtype


def test_ldam_helpers_on_integer_counts_are_float32():
    counts = torch.tensor(N3)
    assert L.ldam_margins(counts).dtype == torch.float32
    assert L.drw_weights(counts).dtype == torch.float32
    assert L.diversity_temperatures(counts).dtype == torch.float32


def test_drw_weights_by_hand_and_float32_accuracy():
    counts = [5000, 1200, 300, 77, 12, 1]
    expected = np_drw(counts)
    close(L.drw_weights(torch.tensor(counts)), expected, 1e-5)  # float32: no loss of digits in 1 − β^n
    close(L.drw_weights(t(counts)), expected, 1e-12)
    close(L.drw_weights(t(counts), beta=0.99), np_drw(counts, 0.99), 1e-12)
    assert float(L.drw_weights(t(counts)).sum()) == pytest.approx(6.0)


def test_ldam_margins_by_hand():
    counts = [400, 81, 16, 16, 1]
    close(L.ldam_margins(t(counts), max_m=0.3), np_margins(counts, 0.3), 1e-12)
    close(L.ldam_margins(t(counts), max_m=0.3), [0.3 * (1 / c) ** 0.25 for c in counts], 1e-12)


def test_ldam_loss_by_hand():
    z = np.array([[0.1, -0.4, 0.7, 0.2], [0.5, 0.5, -0.1, 0.0], [-0.2, 0.3, 0.1, 0.9]])
    targets = [3, 0, 3]
    counts = [200, 50, 20, 3]
    margins = np_margins(counts, 0.4)
    shifted = z.copy()
    for i, c in enumerate(targets):
        shifted[i, c] -= margins[c]
    weight = np.array([0.5, 1.0, 2.0, 4.0])
    out = L.ldam_loss(t(z), y(targets), t(counts), max_m=0.4, s=16.0)
    close(out, np_ce(16.0 * shifted, targets), 1e-12)
    # weighted mean: Σ w_y l / Σ w_y (targets 3, 0, 3 → denominator 4 + 0.5 + 4)
    out_w = L.ldam_loss(t(z), y(targets), t(counts), max_m=0.4, s=16.0, weight=t(weight))
    nll = -np_log_softmax(16.0 * shifted)[np.arange(3), targets]
    close(out_w, (4 * nll[0] + 0.5 * nll[1] + 4 * nll[2]) / 8.5, 1e-12)


def test_ldam_margin_is_subtracted_before_scaling():
    z = t([[0.2, 0.5, -0.1], [0.9, 0.1, 0.0]]).requires_grad_()
    targets, counts, s = y([1, 0]), t(N3), 30.0
    out = L.ldam_loss(z, targets, counts, s=s)
    m = np_margins(N3)
    onehot = np.eye(3)[[1, 0]]
    before = s * (z.detach().numpy() - onehot * m[[1, 0]][:, None])
    after = s * z.detach().numpy() - onehot * m[[1, 0]][:, None]
    close(out, np_ce(before, [1, 0]), 1e-12)
    assert abs(out.item() - np_ce(after, [1, 0])) > 0.1  # subtracting m after scaling: 1e-4, not 0.225
    # d/dz = s · (softmax(s(z − m·onehot)) − onehot) / B
    (grad,) = torch.autograd.grad(out, z)
    close(grad, s * (np_softmax(before) - onehot) / 2, 1e-10)


# == §2 RIDE ==========================================================================
def np_ride(z, targets, counts, reweighted, lam, f=0.05, base_t=1.0, max_m=0.5, s=30.0, quirk=False):
    """RIDELoss.forward with plain numpy (docs/methods.md §2.1)."""
    z = np.asarray(z, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    num_classes = len(n)
    m = np_margins(n, max_m)
    w = np_drw(n) if reweighted else None
    if reweighted:
        pi = n / n.sum()
        v = num_classes * pi * f + 1 - f
        temp = base_t * v / v.max()
        temp_mean = temp.mean()
    else:
        temp = temp_mean = base_t
    zbar = z.mean(0)
    total = 0.0
    for ze in z:
        ce_in = zbar if (quirk and lam == 0) else ze
        shifted = ce_in.copy()
        for i, c in enumerate(targets):
            shifted[i, c] -= s * m[c]
        total += np_ce(shifted, targets, w)
        p = np_softmax(zbar / temp)
        log_q = np_log_softmax(ze / temp)
        kl = (p * (np.log(p) - log_q)).sum() / len(targets)
        total += lam * temp_mean**2 * kl
    return total


RIDE_VECTORS = [  # (targets, reweighted, diversity_factor, reweight_factor, quirk, expected)
    ([0, 1], False, -0.45, 0.05, False, 14.258713),  # epoch 100, reweight_epoch 160
    ([0, 1], True, -0.45, 0.05, False, 14.873632),  # epoch 161
    ([0, 1], False, -0.45, 0.05, False, 14.258713),  # epoch 160: strict >
    ([2, 0], True, -0.2, 0.02, False, 54.086861),  # epoch 81 > reweight_epoch 80, f = 0.02
    ([0, 1], False, 0.0, 0.05, True, 12.028796),  # epoch 1, λ = 0: CE on the mean logits (quirk)
]


@pytest.mark.parametrize("dtype,rel", DTYPES)
@pytest.mark.parametrize("targets,reweighted,lam,f,quirk,expected", RIDE_VECTORS)
def test_ride_vectors(targets, reweighted, lam, f, quirk, expected, dtype, rel):
    out = L.ride_loss(
        experts(Z, dtype),
        y(targets),
        torch.tensor(N3),
        reweighted,
        diversity_factor=lam,
        reweight_factor=f,
        mean_logits_ce_when_no_diversity=quirk,
    )
    assert out.dim() == 0 and out.dtype == dtype
    close(out, expected, rel, atol=VEC_ATOL)
    close(out, np_ride(Z, targets, N3, reweighted, lam, f=f, quirk=quirk), 1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_diversity_temperatures_vector(dtype, rel):
    close(L.diversity_temperatures(t(N3, dtype), 0.05), [1.0, 0.88792, 0.876712], rel, atol=VEC_ATOL)
    out = L.diversity_temperatures(t(N3, dtype), 0.05, base_temperature=2.0)
    close(out, [2.0, 1.77584, 1.753424], rel, atol=VEC_ATOL)


def test_diversity_temperatures_by_hand():
    counts = [30, 30, 20, 10, 10]
    pi = np.array(counts) / 100
    v = 5 * pi * 0.3 + 0.7
    close(L.diversity_temperatures(t(counts), 0.3, 1.5), 1.5 * v / v.max(), 1e-12)


def test_ride_quirk_flag_is_explicit():
    z, targets, counts = experts(Z), y([0, 1]), t(N3)
    plain = L.ride_loss(z, targets, counts, False, diversity_factor=0.0)
    close(plain, np_ride(Z, [0, 1], N3, False, 0.0, quirk=False), 1e-12)
    assert abs(float(plain) - 12.028796) > 1.0
    # the flag only acts when the diversity factor is 0
    a = L.ride_loss(z, targets, counts, True, -0.45, mean_logits_ce_when_no_diversity=True)
    b = L.ride_loss(z, targets, counts, True, -0.45)
    assert float(a) == float(b)


@pytest.mark.parametrize("reweighted", [False, True])
def test_ride_loss_by_hand(reweighted):
    z = [
        [[2.0, -1.0, 0.5, 4.0], [0.0, 3.0, -2.0, 1.0], [1.0, 1.0, 1.0, 1.0]],
        [[-3.0, 2.5, 0.0, 1.0], [5.0, 0.0, 1.0, -1.0], [0.5, -0.5, 2.0, 0.0]],
    ]
    targets, counts = [3, 1, 2], [60, 25, 9, 2]
    out = L.ride_loss(
        experts(z), y(targets), t(counts), reweighted, diversity_factor=-0.3, reweight_factor=0.1,
        base_temperature=1.5, max_m=0.4, s=10.0,
    )
    close(out, np_ride(z, targets, counts, reweighted, -0.3, f=0.1, base_t=1.5, max_m=0.4, s=10.0), 1e-12)


def test_ride_sums_over_experts():
    z = t(Z)
    one = L.ride_loss([z[0]], y([0, 1]), t(N3), True, -0.45)
    three = L.ride_loss([z[0], z[0], z[0]], y([0, 1]), t(N3), True, -0.45)  # identical experts: KL = 0
    close(three, 3 * float(one), 1e-12)


def _ride_kl_term(z: torch.Tensor, temp, temp_mean: float, lam: float, detach: bool) -> torch.Tensor:
    """Reference λ·T̄²·Σ_e KL(softmax(z̄/T) ‖ softmax(z_e/T)) (batchmean), target detached or not."""
    zbar = z.mean(0)
    target_log_p = ((zbar.detach() if detach else zbar) / temp).log_softmax(-1)
    kl = (target_log_p.exp() * (target_log_p - (z / temp).log_softmax(-1))).sum(-1).mean(-1).sum()
    return lam * temp_mean**2 * kl


@pytest.mark.parametrize("reweighted", [False, True])
def test_ride_kl_target_is_detached(reweighted):
    """The KL term's gradient is λ·T̄²·(softmax(z_e/T) − softmax(z̄/T)) / (T·B) for each expert.

    Because z̄ is the exact mean of the same logits, the path through the target contributes
    J_softmax(z̄/T)ᵀ·Σ_e (log p̄ − log q_e)/T = J_softmaxᵀ·(per-row constant) = 0: the first-order
    gradient is the same with or without the detach. What the detach changes is the derivative of
    that gradient (the target is a constant in the graph), so the check is on a Hessian-vector
    product: removing the detach makes it equal the undetached reference and fail here."""
    z = t(Z).requires_grad_()
    targets, counts, lam = y([0, 1]), t(N3), -0.45
    with_kl = L.ride_loss(list(z), targets, counts, reweighted, diversity_factor=lam)
    without_kl = L.ride_loss(list(z), targets, counts, reweighted, diversity_factor=0.0)
    (grad_kl,) = torch.autograd.grad(with_kl - without_kl, z, create_graph=True)

    zn = np.array(Z, dtype=np.float64)
    if reweighted:
        temp = L.diversity_temperatures(counts, 0.05).numpy()
        temp_mean = float(temp.mean())
    else:
        temp, temp_mean = 1.0, 1.0
    p_bar = np_softmax(zn.mean(0) / temp)
    q = np_softmax(zn / temp)
    close(grad_kl, lam * temp_mean**2 * (q - p_bar) / temp / 2, 1e-10)

    direction = torch.linspace(-1.0, 1.0, z.numel(), dtype=torch.float64).view_as(z)
    (hvp,) = torch.autograd.grad((grad_kl * direction).sum(), z)

    temp_t = torch.as_tensor(temp, dtype=torch.float64)
    reference = {}
    for detach in (True, False):
        z_ref = t(Z).requires_grad_()
        (g,) = torch.autograd.grad(_ride_kl_term(z_ref, temp_t, temp_mean, lam, detach), z_ref, create_graph=True)
        close(g, grad_kl.detach(), 1e-10)  # same first-order gradient either way
        (reference[detach],) = torch.autograd.grad((g * direction).sum(), z_ref)
    assert (reference[True] - reference[False]).abs().max() > 1e-3  # the check can tell them apart
    close(hvp, reference[True].numpy(), 1e-10)


def test_ride_ce_part_has_no_gradient_through_other_experts():
    z = t(Z).requires_grad_()
    out = L.ride_loss(list(z), y([0, 1]), t(N3), False, diversity_factor=0.0)
    (grad,) = torch.autograd.grad(out, z)
    m = 30.0 * np_margins(N3)
    onehot = np.eye(3)[[0, 1]]
    for e in range(3):
        shifted = np.array(Z[e], dtype=np.float64) - onehot * m[[0, 1]][:, None]
        close(grad[e], (np_softmax(shifted) - onehot) / 2, 1e-10)


def test_router_vectors():
    zr = [[[6, 3, -3], [1.5, 9, 0]], [[4.5, 4.5, 1.5], [9, 0, 0]], [[0, 9, 0], [3, 3, 3]]]
    help_ = L.router_targets(experts(zr), y([1, 0]))
    assert help_.shape == (2, 2) and not help_.requires_grad
    close(help_, [[1, 1], [1, 0]], 0)
    for dtype, rel in DTYPES:
        out = L.router_loss(t([[0.5, -1], [2, 0.3]], dtype), help_.to(dtype), pos_weight=100)
        close(out, 48.070256, rel, atol=VEC_ATOL)


def test_router_targets_layout_by_hand():
    """E = 4, B = 3: rows are samples, column i is router i (help from expert i + 1 on)."""
    z = np.zeros((4, 3, 3))
    # sample 0 (y = 2): correct only from the 4-expert ensemble → [1, 1, 1]
    z[:, 0] = [[5, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 9]]
    # sample 1 (y = 0): correct from expert 0 on → [0, 0, 0]
    z[:, 1] = [[3, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]]
    # sample 2 (y = 1): correct after 2 experts, wrong after 3 and 4 → [1, 0, 0]
    z[:, 2] = [[2, 0, 0], [0, 4, 0], [9, 0, 0], [0, 0, 0]]
    targets = [2, 0, 1]
    cum = z.cumsum(0)
    correct = cum.argmax(-1) == np.array(targets)  # [E, B]
    expected = np.stack([~correct[i] & correct[i + 1 :].any(0) for i in range(3)], axis=1).astype(float)
    assert expected.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    help_ = L.router_targets(list(torch.tensor(z, requires_grad=True)), y(targets))
    close(help_, expected, 0)
    assert not help_.requires_grad


def test_router_loss_by_hand_matches_bce_with_logits():
    x = np.array([[0.3, -2.0, 4.0], [-0.7, 1.1, 0.0]])
    h = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expected = (7.0 * h * sp(-x) + (1 - h) * sp(x)).mean()
    out = L.router_loss(t(x), t(h), pos_weight=7.0)
    close(out, expected, 1e-12)
    close(out, float(F.binary_cross_entropy_with_logits(t(x), t(h), pos_weight=t([7.0]))), 1e-12)


# == §3 SADE ==========================================================================
SADE_VECTORS = [
    ([0, 1], N3, 2.0, 3.541651),
    ([2, 2], N3, 2.0, 27.857161),
    ([1, 0], [50, 30, 20], 1.0, 11.436214),
]


@pytest.mark.parametrize("dtype,rel", DTYPES)
@pytest.mark.parametrize("targets,counts,tau,expected", SADE_VECTORS)
def test_sade_vectors(targets, counts, tau, expected, dtype, rel):
    out = L.sade_loss(experts(Z, dtype), y(targets), torch.tensor(counts), tau=tau)
    assert out.dim() == 0 and out.dtype == dtype
    close(out, expected, rel, atol=VEC_ATOL)


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_inverse_prior_vectors(dtype, rel):
    close(L.inverse_prior(t([0.5, 0.3, 0.2], dtype)), [0.2, 0.3, 0.5], rel, atol=VEC_ATOL)
    close(L.inverse_prior(t([0.4, 0.2, 0.2, 0.1, 0.1], dtype)), [0.1, 0.2, 0.1, 0.4, 0.2], rel, atol=VEC_ATOL)


def np_inverse_prior(prior) -> np.ndarray:
    prior = np.asarray(prior, dtype=np.float64)
    idx0 = np.argsort(prior, kind="stable")
    rank = np.argsort(idx0, kind="stable")
    return prior[idx0][len(prior) - 1 - rank]


def test_inverse_prior_stable_sort_ties():
    prior = [0.4, 0.2, 0.2, 0.1, 0.1]
    out = L.inverse_prior(t(prior))
    assert out.tolist() == [0.1, 0.2, 0.1, 0.4, 0.2]
    assert out.tolist() != prior[::-1]  # not a plain flip inside the tie blocks
    # a long tied tail like CIFAR-100-LT's (…8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5): many ties, still a permutation
    counts = [9, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5]
    pi = np.array(counts) / sum(counts)
    out = L.inverse_prior(t(pi))
    close(out, np_inverse_prior(pi), 0)
    assert sorted(out.tolist()) == sorted(pi.tolist())
    # strictly decreasing prior: the plain reversal
    close(L.inverse_prior(t([0.5, 0.25, 0.15, 0.1])), [0.1, 0.15, 0.25, 0.5], 0)
    # a tied tail pair: the tied classes keep their order in the sort, so they get [0.4, 0.3], not a flip
    close(L.inverse_prior(t([0.4, 0.3, 0.3])), [0.3, 0.4, 0.3], 0)


def test_sade_loss_by_hand_with_ties():
    z = np.array([
        [[1.0, 2.0, 0.0, -1.0], [0.0, 0.5, 3.0, 1.0]],
        [[2.0, -1.0, 1.0, 0.0], [1.5, 1.5, 0.0, 2.0]],
        [[0.0, 0.0, 4.0, 1.0], [-2.0, 1.0, 0.5, 0.5]],
    ])
    targets, counts, tau = [3, 1], [40, 10, 10, 5], 1.5
    pi = np.array(counts, dtype=np.float64) / 65
    pi_inv = np_inverse_prior(pi)  # [5, 10, 10, 40]/65 by rank; the tie keeps class order
    assert np.allclose(pi_inv * 65, [5, 10, 10, 40])
    lp, lpi = np.log(pi + 1e-9), np.log(pi_inv + 1e-9)
    expected = np_ce(z[0], targets) + np_ce(z[1] + lp, targets) + np_ce(z[2] + lp - tau * lpi, targets)
    close(L.sade_loss(experts(z), y(targets), t(counts), tau=tau), expected, 1e-12)


def np_tta(w, z1, z2) -> float:
    a = np_softmax(np.asarray(w, dtype=np.float64))
    p1 = np_softmax(np.tensordot(a, np.asarray(z1, dtype=np.float64), 1))
    p2 = np_softmax(np.tensordot(a, np.asarray(z2, dtype=np.float64), 1))
    cos = (p1 * p2).sum(1) / np.maximum(np.linalg.norm(p1, axis=1) * np.linalg.norm(p2, axis=1), 1e-6)
    return -float(cos.mean())


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_sade_aggregation_vectors(dtype, rel):
    w = t([1 / 3, 1 / 3, 1 / 3], dtype).requires_grad_()
    loss = L.sade_aggregation_loss(w, experts(Z, dtype), experts(Z2, dtype))
    assert loss.dim() == 0 and loss.dtype == dtype
    close(loss, -0.954900, rel, atol=VEC_ATOL)
    loss.backward()
    close(w.grad, [-0.030616, 0.022471, 0.008145], rel, atol=VEC_ATOL)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt.step()
    close(w.detach(), [0.339119, 0.329032, 0.331754], rel, atol=VEC_ATOL)
    out = L.sade_aggregation_loss(t([0.5, 0, -0.5], dtype), experts(Z, dtype), experts(Z2, dtype))
    close(out, -0.967567, rel, atol=VEC_ATOL)


def test_sade_aggregation_by_hand():
    z1 = np.array([[[1.0, 0.0, 2.0, -1.0]], [[0.0, 3.0, 1.0, 1.0]]])
    z2 = np.array([[[0.5, 0.5, 1.0, 0.0]], [[2.0, 1.0, -1.0, 0.0]]])
    w = [0.2, -0.6]
    close(L.sade_aggregation_loss(t(w), experts(z1), experts(z2)), np_tta(w, z1, z2), 1e-12)


def test_sade_aggregation_gradient_only_reaches_the_raw_weights():
    w = t([0.1, 0.4, -0.2]).requires_grad_()
    z1, z2 = experts(Z), experts(Z2)  # constants
    loss = L.sade_aggregation_loss(w, z1, z2)
    loss.backward()
    assert all(z.grad is None and not z.requires_grad for z in z1 + z2)
    # central finite differences of the numpy formula
    eps = 1e-6
    fd = []
    for k in range(3):
        hi, lo = [0.1, 0.4, -0.2], [0.1, 0.4, -0.2]
        hi[k] += eps
        lo[k] -= eps
        fd.append((np_tta(hi, Z, Z2) - np_tta(lo, Z, Z2)) / (2 * eps))
    close(w.grad, fd, 1e-6)
    # a uniform shift of w changes nothing (softmax): the gradient sums to zero
    assert abs(float(w.grad.sum())) < 1e-12


# == §4 BalPoE ========================================================================
BALPOE_VECTORS = [
    ([0, 1], (0, 1, 2), 0.798700),
    ([2, 2], (0, 1, 2), 7.752577),
    ([1, 0], (0, 1.25, 2.5), 4.235007),
]


@pytest.mark.parametrize("dtype,rel", DTYPES)
@pytest.mark.parametrize("targets,taus,expected", BALPOE_VECTORS)
def test_balpoe_vectors(targets, taus, expected, dtype, rel):
    out = L.balpoe_loss(experts(Z, dtype), y(targets), torch.tensor(N3), taus=taus)
    assert out.dim() == 0 and out.dtype == dtype
    close(out, expected, rel, atol=VEC_ATOL)


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_balpoe_mixup_vector(dtype, rel):
    """docs/methods.md §4.7 #4: ``lam·L(y_a) + (1 − lam)·L(y_b)`` (the mixup lives in the method)."""
    z, counts, lam = experts(Z, dtype), torch.tensor(N3), 0.3
    out = lam * L.balpoe_loss(z, y([0, 1]), counts) + (1 - lam) * L.balpoe_loss(z, y([2, 0]), counts)
    close(out, 4.229604, rel, atol=VEC_ATOL)


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_balpoe_predict_vectors(dtype, rel):
    close(L.balpoe_predict_logits(experts(Z, dtype)), [[4.5, 2.5, 1.5], [1.5, 6, 2]], rel, atol=VEC_ATOL)
    close(
        L.balpoe_predict_logits(experts(Z, dtype), t([1, 10, 100], dtype)),
        [[-0.20953, 0.093055, 1.39564], [-3.20953, 3.593055, 1.89564]],
        rel, atol=VEC_ATOL,
    )


def test_balpoe_by_hand():
    z = np.array([
        [[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]],
        [[0.0, 2.0, 1.0, 0.0], [3.0, -1.0, 0.0, 1.0]],
    ])
    targets, counts, taus = [2, 0], [50, 25, 20, 5], (-0.5, 1.5)
    lp = np.log(np.array(counts, dtype=np.float64) / 100 + 1e-9)
    expected = (np_ce(z[0] - 0.5 * lp, targets) + np_ce(z[1] + 1.5 * lp, targets)) / 2
    close(L.balpoe_loss(experts(z), y(targets), t(counts), taus=taus), expected, 1e-12)
    prior = np.array([3.0, 1.0, 1.0, 4.0])
    close(L.balpoe_predict_logits(experts(z), t(prior)), z.mean(0) + np.log(prior / prior.sum()), 1e-12)


# == dtype promotion, validation ========================================================
def test_half_inputs_are_promoted_to_float32():
    zb = experts(Z, torch.bfloat16)
    counts, targets = torch.tensor(N3), y([0, 1])
    assert L.ride_loss(zb, targets, counts, True, -0.45).dtype == torch.float32
    assert L.sade_loss(zb, targets, counts).dtype == torch.float32
    assert L.balpoe_loss(zb, targets, counts).dtype == torch.float32
    assert L.balpoe_predict_logits(zb).dtype == torch.float32
    assert L.sade_aggregation_loss(t([0.0, 0.0, 0.0], torch.bfloat16), zb, zb).dtype == torch.float32
    assert L.ldam_loss(t(_Z_LDAM, torch.float16), targets, counts).dtype == torch.float32
    assert L.router_loss(t([[0.5, -1.0]], torch.bfloat16), t([[1.0, 0.0]])).dtype == torch.float32
    close(L.sade_loss(zb, targets, counts), 3.541651, 1e-3)  # Z is exact in bf16


def test_pc_softmax_uniform_prior_unchanged():
    z, counts = t([[1.0, 2.0, 0.0]]), t([4.0, 2.0, 1.0])
    expected = [v - math.log(c / 7) - math.log(3) for v, c in zip([1.0, 2.0, 0.0], [4, 2, 1])]
    close(L.pc_softmax_logits(z, counts)[0], expected, 1e-12)
    close(L.pc_softmax_logits(z, counts, t([1.0, 1.0, 1.0])), L.pc_softmax_logits(z, counts), 1e-12)


BAD_CALLS = [
    (lambda: L.ldam_loss(t([0.1, 0.2]), y([0]), t(N3)), "2-D"),
    (lambda: L.ldam_loss(t(_Z_LDAM), y([1, 0, 0]), t(N3)), "targets must have shape"),
    (lambda: L.ldam_loss(t(_Z_LDAM), y([1, 0]), t([1.0, 2.0])), "class_counts"),
    (lambda: L.ldam_loss(t(_Z_LDAM), y([1, 0]), t(N3), weight=t([1.0, 1.0])), "weight must have shape"),
    (lambda: L.ldam_margins(t([[1.0, 2.0]])), "class_counts must be a non-empty 1-D"),
    (lambda: L.drw_weights(t(N3), beta=1.0), "beta"),
    (lambda: L.diversity_temperatures(t(N3), reweight_factor=1.5), "reweight_factor"),
    (lambda: L.ride_loss([], y([0, 1]), t(N3), False), "empty"),
    (lambda: L.ride_loss([t(Z[0]), t([[1.0, 2.0]])], y([0, 1]), t(N3), False), r"expert_logits\[1\]"),
    (lambda: L.ride_loss(experts(Z), y([0, 1]), t([1.0, 2.0]), False), "class_counts"),
    (lambda: L.ride_loss(experts(Z), y([0]), t(N3), False), "targets must have shape"),
    (lambda: L.router_targets(experts(Z), y([0])), "targets must have shape"),
    (lambda: L.router_loss(t([[0.5, -1.0]]), t([[1.0, 0.0, 1.0]])), "help_targets shape"),
    (lambda: L.router_loss(t([0.5, -1.0]), t([1.0, 0.0])), "2-D"),
    (lambda: L.inverse_prior(t([[0.5, 0.5]])), "prior must be a non-empty 1-D"),
    (lambda: L.sade_loss(experts(Z)[:2], y([0, 1]), t(N3)), "expected 3 experts, got 2"),
    (lambda: L.sade_loss(experts(Z), y([0, 1]), t([1.0, 2.0])), "class_counts"),
    (lambda: L.sade_aggregation_loss(t([0.0, 0.0]), experts(Z), experts(Z2)), "raw_weights must have shape"),
    (lambda: L.sade_aggregation_loss(t([0.0, 0.0, 0.0]), experts(Z), experts(Z2)[:2]), "view2 expert logits"),
    (lambda: L.balpoe_loss(experts(Z), y([0, 1]), t(N3), taus=(0.0, 1.0)), "taus has 2 entries"),
    (lambda: L.balpoe_loss(experts(Z), y([0, 1]), t([1.0, 2.0])), "class_counts"),
    (lambda: L.balpoe_predict_logits(experts(Z), t([1.0, 2.0])), "test_prior must have shape"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_bad_shapes_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_new_names_are_public():
    for name in [
        "ldam_margins", "ldam_loss", "drw_weights", "diversity_temperatures", "ride_loss", "router_targets",
        "router_loss", "inverse_prior", "sade_loss", "sade_aggregation_loss", "balpoe_loss", "balpoe_predict_logits",
    ]:
        assert name in L.__all__
        assert getattr(L, name).__doc__ and "docs/methods.md §" in getattr(L, name).__doc__
