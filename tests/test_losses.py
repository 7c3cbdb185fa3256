"""rayexperts.losses against values computed by hand (plain math) from docs/methods.md's formulas."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rayexperts import losses as L


# -- plain-Python arithmetic (no torch) -------------------------------------------------
def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(value: torch.Tensor, expected: float, tol: float = 1e-9) -> None:
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


COUNTS = t([4.0, 2.0, 1.0])  # n_j for C = 3


# -- balanced / PC softmax ----------------------------------------------------------------
def test_balanced_logits_exact():
    out = L.balanced_logits(t([[1.0, 2.0, 0.0]]), COUNTS, tau=0.5)
    expected = [1 + 0.5 * math.log(4 / 7), 2 + 0.5 * math.log(2 / 7), 0 + 0.5 * math.log(1 / 7)]
    assert out[0].tolist() == pytest.approx(expected)


def test_balanced_softmax_loss_hand_value():
    z = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    y = [2, 0]
    per_sample = []
    for row, target in zip(z, y):
        weighted = [n * math.exp(v) for n, v in zip([4, 2, 1], row)]  # NCL eq. 2
        per_sample.append(-math.log(weighted[target] / sum(weighted)))
    close(L.balanced_softmax_loss(t(z), torch.tensor(y), COUNTS), sum(per_sample) / 2)


def test_pc_softmax_undoes_balancing_and_uses_test_prior():
    z = torch.randn(5, 3, dtype=torch.float64)
    back = L.pc_softmax_logits(L.balanced_logits(z, COUNTS), COUNTS)
    diff = back - z  # a per-row constant (−log C)
    assert torch.allclose(diff, torch.full_like(diff, -math.log(3)))
    assert torch.equal(back.argmax(1), z.argmax(1))
    out = L.pc_softmax_logits(t([[0.0, 0.0, 0.0]]), COUNTS, test_prior=t([2.0, 1.0, 1.0]))
    expected = [-math.log(4 / 7) + math.log(0.5), -math.log(2 / 7) + math.log(0.25), -math.log(1 / 7) + math.log(0.25)]
    assert out[0].tolist() == pytest.approx(expected)


# -- MLLT -----------------------------------------------------------------------------------
def test_mutual_learning_k2_both_teachers():
    z1, z2 = [1.0, 0.0, -1.0], [0.0, 2.0, 0.5]
    p1, p2 = softmax(z1), softmax(z2)
    expected = kl(p2, p1) + kl(p1, p2)  # MLLT eq. 1–2
    for teacher in ("ensemble", "individual"):
        close(L.mutual_learning_loss([t([z1]), t([z2])], teacher=teacher), expected)


def test_mutual_learning_k3_ensemble_vs_individual():
    zs = [[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, -1.0]]]
    ps = [softmax(z[0]) for z in zs]
    ensemble = individual = 0.0
    for k in range(3):
        others = [ps[l] for l in range(3) if l != k]
        p_avg = [(a + b) / 2 for a, b in zip(*others)]
        ensemble += kl(p_avg, ps[k])
        individual += sum(kl(o, ps[k]) for o in others) / 2
    tensors = [t(z) for z in zs]
    close(L.mutual_learning_loss(tensors), ensemble)
    close(L.mutual_learning_loss(tensors, teacher="individual"), individual)
    assert ensemble != pytest.approx(individual)


@pytest.mark.parametrize("teacher", ["ensemble", "individual"])
def test_mutual_learning_gradient_only_into_student(teacher):
    # With the teacher detached, d/dz_k Σ KL(t ‖ softmax(z_k)) = p_k − t for a batch of one; both
    # teachers give t = p̄_{−k}. Without detaching, extra terms would appear.
    zs = [[1.0, 0.0, -0.5], [0.0, 1.5, 0.5], [2.0, -1.0, 0.0]]
    ps = [softmax(z) for z in zs]
    tensors = [t([z]).requires_grad_() for z in zs]
    L.mutual_learning_loss(tensors, teacher=teacher).backward()
    for k in range(3):
        others = [ps[l] for l in range(3) if l != k]
        expected = [ps[k][j] - (others[0][j] + others[1][j]) / 2 for j in range(3)]
        assert tensors[k].grad[0].tolist() == pytest.approx(expected)


def test_pair_losses_are_zero_for_one_expert():
    z = [t([[1.0, 2.0, 0.0]])]
    mask = torch.ones(1, 3, dtype=torch.bool)
    for value in (
        L.mutual_learning_loss(z),
        L.nbod_loss(z, COUNTS, mask),
        L.logit_kd_loss(z),
        L.feature_kd_loss(z),
    ):
        assert value.dim() == 0 and value.item() == 0.0


# -- NCL: hard category mining -----------------------------------------------------------
def test_hard_category_mask_hand_case_target_largest():
    anchor = t([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 1.0, 9.0]])
    mask = L.hard_category_mask(anchor, torch.tensor([0, 2]), num_hard=2)
    assert mask.tolist() == [[True, False, True, True], [False, True, True, True]]
    assert L.hard_category_mask(anchor, torch.tensor([0, 2]), num_hard=0).tolist() == [
        [True, False, False, False],
        [False, False, True, False],
    ]
    assert L.hard_category_mask(anchor, torch.tensor([0, 2]), num_hard=10).all()  # clipped to C − 1


def test_hard_category_mask_random():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        batch, classes = 1 + trial % 7, 2 + trial % 9
        num_hard = trial % classes
        anchor = torch.randn(batch, classes, generator=gen)
        targets = torch.randint(classes, (batch,), generator=gen)
        if trial % 2:  # the target holds the largest logit
            anchor[torch.arange(batch), targets] = anchor.max() + 1
        mask = L.hard_category_mask(anchor, targets, num_hard)
        assert mask.dtype == torch.bool and mask.shape == (batch, classes)
        assert mask[torch.arange(batch), targets].all()
        assert (mask.sum(1) == num_hard + 1).all()
        for i in range(batch):
            others = [j for j in range(classes) if j != targets[i]]
            chosen = [anchor[i, j].item() for j in others if mask[i, j]]
            left = [anchor[i, j].item() for j in others if not mask[i, j]]
            if chosen and left:
                assert min(chosen) >= max(left)


def test_hard_category_mask_rejects_bad_num_hard():
    with pytest.raises(ValueError, match="num_hard"):
        L.hard_category_mask(t([[1.0, 2.0]]), torch.tensor([0]), -1)


def test_restricted_log_softmax():
    mask = torch.tensor([[True, False, True, False]])
    out = L.restricted_log_softmax(t([[1.0, 2.0, 3.0, 0.0]]), mask)
    denom = math.exp(1) + math.exp(3)
    assert out[0, 0].item() == pytest.approx(math.log(math.exp(1) / denom))
    assert out[0, 2].item() == pytest.approx(math.log(math.exp(3) / denom))
    probs = out.exp()
    assert probs[mask].sum().item() == pytest.approx(1.0)
    assert (probs[~mask] == 0).all()
    with pytest.raises(ValueError, match="mask shape"):
        L.restricted_log_softmax(t([[1.0, 2.0, 3.0]]), mask)


# -- NCL: NIL and NBOD ------------------------------------------------------------------
NCL_Z = [[[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], [[0.0, 2.0, 1.0], [1.5, 0.0, 0.5]]]  # K = 2, B = 2, C = 3
NCL_Y = [0, 1]
NCL_MASK = [[True, False, True], [True, True, False]]  # Ψ per sample (target + 1 hard class)
N = [4.0, 2.0, 1.0]


def balanced(z: list[float]) -> list[float]:  # NCL eq. 2 as logits: z + log n
    return [v + math.log(n) for v, n in zip(z, N)]


def p_full(z: list[float]) -> list[float]:
    return softmax(balanced(z))


def p_restrict(z: list[float], m: list[bool]) -> list[float]:  # NCL eq. 4
    weights = [n * math.exp(v) if keep else 0.0 for v, n, keep in zip(z, N, m)]
    return [w / sum(weights) for w in weights]


def p_maskmode(z: list[float], m: list[bool]) -> list[float]:  # official code: (z + log n)·mask, full softmax
    return softmax([b * keep for b, keep in zip(balanced(z), m)])


def ncl_inputs():
    return [t(z) for z in NCL_Z], torch.tensor(NCL_Y), torch.tensor(NCL_MASK), t(N)


def test_nil_hand_values_both_modes():
    experts, y, mask, counts = ncl_inputs()
    for mode, p_hard in (("restrict", p_restrict), ("mask", p_maskmode)):
        total_all = total_hard = 0.0
        for i in range(2):
            for k in range(2):
                total_all += -math.log(p_full(NCL_Z[k][i])[NCL_Y[i]])
                total_hard += -math.log(p_hard(NCL_Z[k][i], NCL_MASK[i])[NCL_Y[i]])
        close(L.nil_loss(experts, y, counts, mask, mode=mode), (total_all + total_hard) / 2)
        close(L.nil_loss(experts, y, counts, mask, hard=False, mode=mode), total_all / 2)
    restrict = L.nil_loss(experts, y, counts, mask)
    assert restrict.item() != pytest.approx(L.nil_loss(experts, y, counts, mask, mode="mask").item())


def nbod_hand(p_hard, parts=("all", "hard"), norm="official") -> float:
    total = 0.0
    for i in range(2):
        for k, q in ((0, 1), (1, 0)):
            if "all" in parts:
                total += kl(p_full(NCL_Z[k][i]), p_full(NCL_Z[q][i]))
            if "hard" in parts:
                total += kl(p_hard(NCL_Z[k][i], NCL_MASK[i]), p_hard(NCL_Z[q][i], NCL_MASK[i]))
    pairs = 1 if norm == "official" else 2 * 1  # K − 1 (the official NBOD) or K(K − 1) (eq. 8–9)
    return total / pairs / 2  # batch mean


@pytest.mark.parametrize("norm", ["official", "paper"])
def test_nbod_hand_values_and_switches(norm):
    experts, _, mask, counts = ncl_inputs()
    close(L.nbod_loss(experts, counts, mask, norm=norm), nbod_hand(p_restrict, norm=norm))
    close(L.nbod_loss(experts, counts, mask, mode="mask", norm=norm), nbod_hand(p_maskmode, norm=norm))
    close(L.nbod_loss(experts, counts, mask, bod_hard=False, norm=norm), nbod_hand(p_restrict, ("all",), norm))
    close(L.nbod_loss(experts, counts, mask, bod_all=False, norm=norm), nbod_hand(p_restrict, ("hard",), norm))
    close(L.nbod_loss(experts, counts, None, bod_all=False, bod_hard=False, norm=norm), 0.0)


def test_nbod_default_is_the_official_normaliser():
    experts, _, mask, counts = ncl_inputs()
    close(L.nbod_loss(experts, counts, mask), nbod_hand(p_restrict, norm="official"))
    with pytest.raises(ValueError, match="norm must be"):
        L.nbod_loss(experts, counts, mask, norm="mean")


@pytest.mark.parametrize("norm, pairs", [("official", 2), ("paper", 6)])
def test_nbod_three_experts_normaliser(norm, pairs):
    z = [[1.0, 0.0, 2.0], [0.0, 2.0, 1.0], [-1.0, 0.5, 0.0]]
    ps = [p_full(row) for row in z]
    expected = sum(kl(ps[k], ps[q]) for k in range(3) for q in range(3) if k != q) / pairs  # K−1 = 2, K(K−1) = 6
    close(L.nbod_loss([t([row]) for row in z], t(N), None, bod_hard=False, norm=norm), expected)


def test_nbod_gradient_sides():
    z1, z2 = [1.0, 0.0, 2.0], [0.0, 2.0, 1.0]

    def grad_z1(detach_target: bool) -> list[float]:
        a, b = t([z1]).requires_grad_(), t([z2]).requires_grad_()
        L.nbod_loss([a, b], t(N), None, bod_hard=False, detach_target=detach_target, norm="paper").backward()
        return a.grad[0].tolist()

    # detached: z1 is the student only in KL(p2 ‖ p1), gradient (p1 − p2) / (K(K−1))
    p1, p2 = p_full(z1), p_full(z2)
    assert grad_z1(True) == pytest.approx([(a - b) / 2 for a, b in zip(p1, p2)])

    # not detached (default): the gradient of the full formula, by central differences in plain math
    def value(v1: list[float]) -> float:
        return (kl(p_full(v1), p_full(z2)) + kl(p_full(z2), p_full(v1))) / 2

    h = 1e-6
    numeric = [
        (value([v + h * (j == c) for j, v in enumerate(z1)]) - value([v - h * (j == c) for j, v in enumerate(z1)])) / (2 * h)
        for c in range(3)
    ]
    assert grad_z1(False) == pytest.approx(numeric, abs=1e-7)


def test_ncl_shape_errors():
    experts, y, mask, counts = ncl_inputs()
    with pytest.raises(ValueError, match="mask shape"):
        L.nil_loss(experts, y, counts, mask[:, :2])
    with pytest.raises(ValueError, match="mask shape"):
        L.nbod_loss(experts, counts, mask[:1])
    with pytest.raises(ValueError, match="expert_logits\\[1\\]"):
        L.nil_loss([experts[0], experts[1][:, :2]], y, counts, mask)
    with pytest.raises(ValueError, match="class_counts"):
        L.nil_loss(experts, y, counts[:2], mask)
    with pytest.raises(ValueError, match="mode"):
        L.nbod_loss(experts, counts, mask, mode="nope")


# -- ECL ----------------------------------------------------------------------------------
def bkt_hand(ref: list[float], cls: list[float], y: int) -> float:
    def p_target(z):
        sigma = statistics.stdev(z)  # unbiased
        return softmax([v / sigma for v in z])[y]

    return math.log(p_target(cls)) / math.log(p_target(ref))  # ECL eq. 6 (RHS)


def test_bkt_weights_hand_value_and_no_grad():
    ref, cls = [2.0, 0.0, 1.0], [0.5, 0.0, 1.0]
    ref_t, cls_t = t([ref, cls]).requires_grad_(), t([cls, ref]).requires_grad_()
    w = L.bkt_weights(ref_t, cls_t, torch.tensor([0, 0]))
    assert w.shape == (2,) and not w.requires_grad
    assert w[0].item() == pytest.approx(bkt_hand(ref, cls, 0), rel=1e-6)
    assert w[1].item() == pytest.approx(1 / w[0].item(), rel=1e-6)
    assert w[0].item() > 1  # cls head less confident on the target than ref head


def test_bkt_weight_above_one_exactly_when_cls_less_confident():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        ref, cls = torch.randn(2, 4, generator=gen, dtype=torch.float64).tolist()
        y = int(torch.randint(4, (1,), generator=gen))

        def p_target(z):
            return softmax([v / statistics.stdev(z) for v in z])[y]

        w = L.bkt_weights(t([ref]), t([cls]), torch.tensor([y]))[0].item()
        if abs(p_target(cls) - p_target(ref)) > 1e-6:
            assert (w > 1) == (p_target(cls) < p_target(ref))


def test_bkt_weights_guards():
    flat = torch.zeros(1, 3)  # σ = 0: uniform prediction instead of 0/0
    w = L.bkt_weights(flat, flat, torch.tensor([1]))
    assert w.item() == pytest.approx(1.0)
    one_hot = torch.zeros(1, 20000)
    one_hot[0, 0] = 1.0  # σ-normalised ref softmax rounds to ŷ^r_y = 1 → CE = 0
    assert torch.isfinite(L.bkt_weights(one_hot, torch.zeros(1, 20000), torch.tensor([0]))).all()


def test_logit_kd_weights_and_temperature():
    tau = 2.0
    z = [[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], [[0.0, 2.0, 1.0], [2.0, 0.0, 1.0]], [[1.0, 1.0, -1.0], [0.0, 0.0, 3.0]]]
    w = [1.5, 0.5]
    total = 0.0
    for i in range(2):
        ps = [softmax([v / tau for v in z[k][i]]) for k in range(3)]
        total += sum(w[i] * tau**2 * kl(ps[k], ps[q]) for k in range(3) for q in range(3) if k != q)
    expected = total / (2 * 3 * 2)  # N K (K−1), ECL eq. 7
    experts = [t(zk) for zk in z]
    close(L.logit_kd_loss(experts, weights=t(w), tau=tau), expected)
    unweighted = sum(
        tau**2 * kl(softmax([v / tau for v in z[k][i]]), softmax([v / tau for v in z[q][i]]))
        for i in range(2) for k in range(3) for q in range(3) if k != q
    ) / 12
    close(L.logit_kd_loss(experts, tau=tau), unweighted)
    with pytest.raises(ValueError, match="weights"):
        L.logit_kd_loss(experts, weights=t([1.0, 2.0, 3.0]))


def test_logit_kd_detach_target_gradient():
    # K = 2, B = 1, τ = 1: with the target side detached, d/dz1 = (p1 − p2) / (K(K−1))
    z1, z2 = [1.0, 0.0, 2.0], [0.0, 2.0, 1.0]
    a, b = t([z1]).requires_grad_(), t([z2]).requires_grad_()
    L.logit_kd_loss([a, b], detach_target=True).backward()
    p1, p2 = softmax(z1), softmax(z2)
    assert a.grad[0].tolist() == pytest.approx([(x - y) / 2 for x, y in zip(p1, p2)])


def test_feature_kd_batch_mean():
    tau = 2.0
    v = [[[0.5, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 0.5, 0.5], [0.0, 3.0, 1.0, 0.0]]]
    total = sum(
        tau**2 * kl(softmax([x / tau for x in v[k][i]]), softmax([x / tau for x in v[q][i]]))
        for i in range(2) for k, q in ((0, 1), (1, 0))
    )
    close(L.feature_kd_loss([t(vk) for vk in v], tau=tau), total / (2 * 1) / 2)  # /(K(K−1)), batch mean


# -- contrastive ---------------------------------------------------------------------------
def test_info_nce_hand_value_queue_of_two():
    q, k = [1.0, 0.0], [0.6, 0.8]
    queue = [[0.0, 1.0], [-1.0, 0.0]]
    T = 0.5
    pos = math.exp(0.6 / T)
    expected = -math.log(pos / (pos + math.exp(0.0 / T) + math.exp(-1.0 / T)))
    close(L.info_nce_loss(t([q]), t([k]), t(queue), T), expected)


def test_info_nce_identity_and_key_detached():
    T, Q = 0.2, 5
    query = torch.eye(3, dtype=torch.float64)[:2].requires_grad_()  # e1, e2
    key = query.detach().clone().requires_grad_()  # perfect positives
    queue = torch.tensor([[0.0, 0.0, 1.0]] * Q, dtype=torch.float64)  # orthogonal to both queries
    loss = L.info_nce_loss(query, key, queue, T)
    close(loss, -math.log(math.exp(1 / T) / (math.exp(1 / T) + Q * math.exp(0.0))))
    loss.backward()
    assert key.grad is None and query.grad is not None
    with pytest.raises(ValueError, match="queue"):
        L.info_nce_loss(query, key, torch.zeros(4, 2), T)


# -- CBD ----------------------------------------------------------------------------------
def test_cbd_single_teacher_and_scale_invariance():
    student = t([[1.0, 1.0], [0.0, 2.0]])
    teacher = t([[2.0, 0.0], [0.0, 5.0]])
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 1.0)) / 2
    close(L.cbd_distillation_loss(student, teacher), expected)
    close(L.cbd_distillation_loss(student, [teacher * 7.0]), expected)


def test_cbd_three_teachers_hand_value_and_no_teacher_grad():
    teachers = [t([[3.0, 4.0]]).requires_grad_(), t([[0.0, 2.0]]), t([[1.0, 0.0]])]
    student = t([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]]).requires_grad_()
    target = [0.6, 0.8, 0.0, 1.0, 1.0, 0.0]  # each teacher ℓ2-normalised, concatenated (norm √3)
    s = student[0].tolist()
    cos = sum(a * b for a, b in zip(s, target)) / (math.sqrt(sum(a * a for a in s)) * math.sqrt(3))
    loss = L.cbd_distillation_loss(student, teachers)
    close(loss, 1 - cos)
    close(L.cbd_distillation_loss(student, [teachers[0] * 10, teachers[1] * 0.1, teachers[2] * 3]), 1 - cos)
    loss.backward()
    assert teachers[0].grad is None and student.grad is not None
    with pytest.raises(ValueError, match="width"):
        L.cbd_distillation_loss(student[:, :4], teachers)


def test_hard_terms_have_finite_gradients_and_none_outside_the_hard_set():
    experts = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    targets = torch.tensor([0, 5, 2, 2])
    mask = L.hard_category_mask(experts[0], targets, num_hard=2)
    counts = torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0, 1.0])
    for mode in ("restrict", "mask"):
        hard_only = L.nil_loss(experts, targets, counts, mask, mode=mode) - L.nil_loss(
            experts, targets, counts, mask, hard=False
        )
        hard_only = hard_only + L.nbod_loss(experts, counts, mask, bod_all=False, mode=mode)
        grads = torch.autograd.grad(hard_only, experts)
        assert all(torch.isfinite(g).all() for g in grads)
        if mode == "restrict":  # classes outside Ψ are removed, so they get no gradient
            assert all((g[~mask] == 0).all() for g in grads)


def test_low_precision_expert_inputs_are_computed_in_float32():
    zs = [torch.randn(4, 10) for _ in range(2)]
    low = [z.bfloat16() for z in zs]
    assert L.logit_kd_loss(low).dtype == torch.float32
    expected = L.logit_kd_loss([z.float() for z in low])
    assert L.logit_kd_loss(low).item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------- device, dtype and bad input (cases the mutation run found untested)

def test_losses_compute_on_the_inputs_device():
    """Every tensor a loss creates lives on its inputs' device (``meta`` stands in for CUDA here)."""
    z = [torch.randn(4, 5, device="meta") for _ in range(3)]
    assert L.mutual_learning_loss(z).device.type == "meta"
    assert L.expert_disagreement(z).device.type == "meta"
    q = torch.randn(4, 8, device="meta")
    assert L.info_nce_loss(q, q, torch.randn(16, 8, device="meta"), 0.2).device.type == "meta"


def test_info_nce_casts_the_queue_to_the_query_dtype():
    """A queue kept in another precision (float64 here; bf16 under autocast) is cast to the query's."""
    g = torch.Generator().manual_seed(0)
    q, k, queue = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (4, 4, 16))
    expect = L.info_nce_loss(q, k, queue, 0.2)
    got = L.info_nce_loss(q, k, queue.double(), 0.2)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expect.item(), abs=1e-6)


def test_expert_disagreement_has_no_gradient_into_the_target_side():
    """``KL(P_k ‖ P_q)`` with ``P_k`` detached: the gradient is that of ``−Σ P_k log P_q`` alone."""
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], requires_grad=True)
    w = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.5]], requires_grad=True)
    L.expert_disagreement([z, w]).sum().backward()
    z2, w2 = z.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lz, lw = z2.log_softmax(-1), w2.log_softmax(-1)
    hand = (-(lz.detach().exp() * lw).sum(-1) - (lw.detach().exp() * lz).sum(-1)) / 2
    hand.sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("loss", [
    lambda z: L.mutual_learning_loss(z),
    lambda z: L.expert_disagreement(z),
    lambda z: L.nbod_loss(z, torch.ones(3), None),
])
def test_expert_losses_name_their_argument_on_bad_input(loss):
    with pytest.raises(ValueError, match=r"^expert_logits is empty"):
        loss([])
    with pytest.raises(ValueError, match=r"^expert_logits\[1\] has shape \(2, 4\), expert_logits\[0\] has \(2, 3\)"):
        loss([torch.zeros(2, 3), torch.zeros(2, 4)])


def test_pc_softmax_names_its_argument_on_bad_input():
    with pytest.raises(ValueError, match=r"^logits must be 2-D"):
        L.pc_softmax_logits(torch.zeros(3), torch.ones(3))
