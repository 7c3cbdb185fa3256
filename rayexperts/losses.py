"""Every paper term of MLLT, NCL, ECL and CBD as a pure function (docs/METHODS.md).

Conventions shared by all functions:

* logits are ``[B, C]``, features ``[B, d]``; ``expert_logits`` / ``expert_features`` are
  sequences with one tensor per expert (K of them, all the same shape);
* ``class_counts`` is the 1-D tensor of per-class training counts ``n_j`` (all > 0);
* every loss returns the *batch mean* of its per-sample value as a 0-dim tensor and
  applies no loss weight (λ, α, β belong to the method);
* ``KL(P ‖ Q) = Σ_j P_j log(P_j / Q_j)``. In a KL between two experts, P is the
  *target* side and Q the *student* side. Whether the target side carries gradient is
  stated per function (``detach_target``); see the docstrings for the reasoning;
* pair terms (mutual learning, NBOD, ECL distillation) return a 0-dim zero for K = 1
  (there is no pair); an empty sequence is an error.

Inputs are validated by shape only: checking values (counts > 0, targets in range,
target inside the hard set) would force a device sync every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "balanced_logits",
    "balanced_softmax_loss",
    "pc_softmax_logits",
    "mutual_learning_loss",
    "hard_category_mask",
    "restricted_log_softmax",
    "nil_loss",
    "nbod_loss",
    "bkt_weights",
    "logit_kd_loss",
    "feature_kd_loss",
    "info_nce_loss",
    "cbd_distillation_loss",
    "expert_disagreement",
]


# -- validation helpers ---------------------------------------------------------------
def _check_2d(x: Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, C], got shape {tuple(x.shape)}")


def _check_counts(class_counts: Tensor, num_classes: int) -> None:
    if class_counts.dim() != 1 or class_counts.numel() != num_classes:
        raise ValueError(
            f"class_counts must be 1-D with one entry per class ({num_classes}), "
            f"got shape {tuple(class_counts.shape)}"
        )


def _check_targets(targets: Tensor, batch: int) -> None:
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape [{batch}], got {tuple(targets.shape)}")


def _check_mask(mask: Tensor, logits_shape: torch.Size) -> Tensor:
    if mask.shape != logits_shape:
        raise ValueError(f"hard mask shape {tuple(mask.shape)} != logits shape {tuple(logits_shape)}")
    return mask.bool()


def _stack(tensors: Sequence[Tensor], name: str) -> Tensor:
    """Stack one 2-D tensor per expert into ``[K, B, C]`` after checking they match; half/bf16
    inputs are promoted to float32 (the KL and log-softmax terms are computed in float32)."""
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty: need one tensor per expert")
    shape = tensors[0].shape
    for k, t in enumerate(tensors):
        _check_2d(t, f"{name}[{k}]")
        if t.shape != shape:
            raise ValueError(f"{name}[{k}] has shape {tuple(t.shape)}, {name}[0] has {tuple(shape)}")
    stacked = torch.stack(list(tensors))
    return stacked.float() if stacked.dtype in (torch.float16, torch.bfloat16) else stacked


def _check_mode(mode: str) -> None:
    if mode not in ("restrict", "mask"):
        raise ValueError(f"mode must be 'restrict' or 'mask', got {mode!r}")


# -- shared pieces --------------------------------------------------------------------
def _pairwise_kl(
    prob: Tensor, log_prob: Tensor, detach_target: bool, student_weights: Tensor | None = None
) -> Tensor:
    """``Σ_k Σ_{q≠k} KL(P_k ‖ P_q)`` per sample, ``[B]``, for ``prob``/``log_prob`` ``[K, B, C]``.

    ``log_prob`` must be finite where ``prob`` is 0 (callers replace ``-inf`` by 0 there).
    With ``detach_target`` the gradient flows only into the student side ``P_q``.
    ``student_weights`` ``[K, B]``: each ``KL(P_k ‖ P_q)`` is multiplied by ``student_weights[q]``.
    """
    target_p = prob.detach() if detach_target else prob
    target_logp = log_prob.detach() if detach_target else log_prob
    # elementwise [K, K, B, C] rather than an einsum: no matmul, so no bf16 under autocast and
    # no cancellation between Σ P log P and Σ P log Q
    kl = (target_p.unsqueeze(1) * (target_logp.unsqueeze(1) - log_prob.unsqueeze(0))).sum(-1)
    diagonal = torch.eye(prob.shape[0], dtype=torch.bool, device=prob.device).unsqueeze(-1)
    kl = kl.masked_fill(diagonal, 0.0)
    if student_weights is not None:
        kl = kl * student_weights.unsqueeze(0)  # kl[k, q] is weighted by the student q's row
    return kl.sum((0, 1))


def _ncl_balanced_logits(stacked: Tensor, class_counts: Tensor, tau: float) -> Tensor:
    """NCL eq. 2: ``z + τ·log n_j`` (raw counts, as the official code; the constant ``log Σn``
    cancels in every softmax except the logit-mask variant, where raw counts match the code)."""
    return stacked + tau * class_counts.to(stacked.dtype).log()


def _hard_log_probs(balanced: Tensor, mask: Tensor, mode: str) -> Tensor:
    """``log p*`` for ``[K, B, C]`` balanced logits and a ``[B, C]`` mask: the softmax restricted
    to the mask (``-inf`` outside), or the official code's variant (logits multiplied by the
    0/1 mask, then a full softmax over all C classes)."""
    if mode == "restrict":
        return restricted_log_softmax(balanced, mask.expand_as(balanced))
    return (balanced * mask).log_softmax(-1)


def expert_disagreement(expert_logits: Sequence[Tensor]) -> Tensor:
    """Per sample ``[B]``, the mean over ordered expert pairs of ``KL(softmax(z^k) ‖ softmax(z^q))``
    (how much the experts disagree; NCL Fig. 1/5b). Not a loss: no gradient is meant through it."""
    z = _stack([t.float() for t in expert_logits], "expert_logits")
    num_experts = z.shape[0]
    if num_experts == 1:
        return z.new_zeros(z.shape[1])
    log_p = z.log_softmax(-1)
    return _pairwise_kl(log_p.exp(), log_p, detach_target=True) / (num_experts * (num_experts - 1))


# -- balanced softmax / PC softmax ----------------------------------------------------
def balanced_logits(logits: Tensor, class_counts: Tensor, tau: float = 1.0) -> Tensor:
    """Balanced softmax / logit adjustment (METHODS.md "BSCE, BC loss"; NCL eq. 2, ECL eq. 10).

    Returns ``z_j + τ·log(n_j / Σn)``, i.e. ``z + τ·(log p_s − log p_t)`` for a uniform test
    prior up to a per-row constant. Train with ``CE`` on these logits.
    """
    _check_2d(logits, "logits")
    _check_counts(class_counts, logits.shape[1])
    counts = class_counts.to(logits.dtype)
    return logits + tau * (counts / counts.sum()).log()


def balanced_softmax_loss(logits: Tensor, targets: Tensor, class_counts: Tensor, tau: float = 1.0) -> Tensor:
    """BSCE / ECL's BC loss: cross-entropy on :func:`balanced_logits`; batch mean."""
    _check_2d(logits, "logits")
    _check_targets(targets, logits.shape[0])
    return F.cross_entropy(balanced_logits(logits, class_counts, tau), targets)


def pc_softmax_logits(logits: Tensor, class_counts: Tensor, test_prior: Tensor | None = None) -> Tensor:
    """Post-compensated softmax (METHODS.md "PC softmax", MLLT inference), inference only.

    ``h_PC[y] = z_y − log p_s(y) + log p_t(y)`` with ``p_s = n / Σn``. ``test_prior`` is a
    ``[C]`` tensor of non-negative weights, normalised to sum to one (uniform if None).
    """
    _check_2d(logits, "logits")
    num_classes = logits.shape[1]
    _check_counts(class_counts, num_classes)
    counts = class_counts.to(logits.dtype)
    out = logits - (counts / counts.sum()).log()
    if test_prior is None:
        return out - torch.log(torch.tensor(float(num_classes), dtype=logits.dtype, device=logits.device))
    if test_prior.shape != (num_classes,):
        raise ValueError(f"test_prior must have shape [{num_classes}], got {tuple(test_prior.shape)}")
    prior = test_prior.to(logits.dtype)
    return out + (prior / prior.sum()).log()


# -- MLLT -----------------------------------------------------------------------------
def mutual_learning_loss(
    expert_logits: Sequence[Tensor], teacher: Literal["ensemble", "individual"] = "ensemble"
) -> Tensor:
    """MLLT mutual learning loss (MLLT eq. 3–5; METHODS.md "MLLT"), summed over experts.

    ``"ensemble"`` (default): ``Σ_k KL(p̄_{−k} ‖ p_k)`` with ``p̄_{−k} = 1/(K−1) Σ_{l≠k} p_l``
    (mean of the *other* experts' probabilities). ``"individual"``:
    ``Σ_k 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k)``. ``p = softmax(z)``. The teacher side is detached
    (METHODS.md; DML [32], which MLLT follows, updates each cohort with the others fixed), so
    the gradient flows only into ``p_k``. Batch mean of the per-sample sum; 0 for K = 1.
    """
    if teacher not in ("ensemble", "individual"):
        raise ValueError(f"teacher must be 'ensemble' or 'individual', got {teacher!r}")
    z = _stack(expert_logits, "expert_logits")
    num_experts = z.shape[0]
    if num_experts == 1:
        return z.new_zeros(())
    log_p = z.log_softmax(-1)
    if teacher == "individual":
        return (_pairwise_kl(log_p.exp(), log_p, detach_target=True) / (num_experts - 1)).mean()
    p = log_p.exp().detach()
    others = (1.0 - torch.eye(num_experts, dtype=p.dtype, device=p.device)) / (num_experts - 1)
    p_avg = (others.view(num_experts, num_experts, 1, 1) * p.unsqueeze(1)).sum(0)  # p̄_{−k} ≥ 0 exactly
    kl = (torch.xlogy(p_avg, p_avg) - p_avg * log_p).sum(-1)  # [K, B]
    return kl.sum(0).mean()


# -- NCL ------------------------------------------------------------------------------
def hard_category_mask(anchor_logits: Tensor, targets: Tensor, num_hard: int) -> Tensor:
    """NCL Hard Category Mining (NCL eq. 3–4): bool ``[B, C]`` holding the target and the
    ``num_hard`` (``C_hard``) largest non-target logits of the anchor expert.

    ``num_hard`` is clipped to ``C − 1``. Selection is by index among the non-target columns,
    so it is exact even when the target holds the largest logit or values tie/are infinite.
    (The official code's ``HCM_N`` counts the target too: ``HCM_N = num_hard + 1``.)
    """
    _check_2d(anchor_logits, "anchor_logits")
    batch, num_classes = anchor_logits.shape
    _check_targets(targets, batch)
    if isinstance(num_hard, bool) or not isinstance(num_hard, int) or num_hard < 0:
        raise ValueError(f"num_hard must be an int >= 0, got {num_hard!r}")
    num_hard = min(num_hard, num_classes - 1)
    targets = targets.long().view(batch, 1)
    others = torch.arange(num_classes - 1, device=anchor_logits.device).expand(batch, num_classes - 1)
    others = others + (others >= targets).long()  # the C − 1 non-target class ids of each row
    top = anchor_logits.detach().gather(1, others).topk(num_hard, dim=1).indices
    mask = torch.zeros(batch, num_classes, dtype=torch.bool, device=anchor_logits.device)
    return mask.scatter(1, targets, True).scatter(1, others.gather(1, top), True)


def restricted_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over the classes in ``mask`` only (NCL eq. 4's normaliser over Ψ).

    Classes outside the mask are removed from the normaliser and get ``-inf`` (probability 0,
    zero gradient). Every row of the mask needs at least one class.
    """
    mask = _check_mask(mask, logits.shape)
    return logits.masked_fill(~mask, float("-inf")).log_softmax(-1)


def nil_loss(
    expert_logits: Sequence[Tensor],
    targets: Tensor,
    class_counts: Tensor,
    hard_mask: Tensor | None,
    tau: float = 1.0,
    hard: bool = True,
    mode: Literal["restrict", "mask"] = "restrict",
) -> Tensor:
    """NCL Nested Individual Learning (NCL eq. 5–7).

    ``L_nil = Σ_k [−log p_y(x; θ_k)] + Σ_k [−log p*_y(x; θ_k)]`` with ``p`` the balanced
    softmax (softmax of ``z + τ·log n``, eq. 2) and ``p*`` the balanced softmax restricted to
    the hard set Ψ = ``hard_mask`` (eq. 4; the target must be in Ψ, which
    :func:`hard_category_mask` guarantees). ``mode="mask"`` is the official code's variant:
    the balanced logits multiplied by the 0/1 mask, then a full softmax. ``hard=False`` drops
    the second sum (``hard_mask`` may then be None). Batch mean of the per-sample sum.
    """
    _check_mode(mode)
    z = _stack(expert_logits, "expert_logits")
    _, batch, num_classes = z.shape
    _check_targets(targets, batch)
    _check_counts(class_counts, num_classes)
    balanced = _ncl_balanced_logits(z, class_counts, tau)
    index = targets.long().view(1, batch, 1).expand(z.shape[0], batch, 1)
    loss = -balanced.log_softmax(-1).gather(2, index).sum(0).mean()
    if not hard:
        return loss
    if hard_mask is None:
        raise ValueError("hard_mask is required when hard=True")
    mask = _check_mask(hard_mask, torch.Size((batch, num_classes)))
    return loss - _hard_log_probs(balanced, mask, mode).gather(2, index).sum(0).mean()


def nbod_loss(
    expert_logits: Sequence[Tensor],
    class_counts: Tensor,
    hard_mask: Tensor | None,
    tau: float = 1.0,
    bod_all: bool = True,
    bod_hard: bool = True,
    mode: Literal["restrict", "mask"] = "restrict",
    detach_target: bool = False,
    norm: Literal["official", "paper"] = "official",
) -> Tensor:
    """NCL Nested Balanced Online Distillation (NCL eq. 8–10).

    ``L_dis = 1/Z Σ_k Σ_{q≠k} KL(p(θ_k) ‖ p(θ_q))``   (BOD_all, eq. 8, ``bod_all``)
    ``      + 1/Z Σ_k Σ_{q≠k} KL(p*(θ_k) ‖ p*(θ_q))`` (BOD_hard, eq. 9, ``bod_hard``)
    on the balanced probabilities (eq. 2) and the balanced probabilities restricted to the
    hard set (eq. 4; ``mode="mask"``: the official logit-mask variant). Batch mean; 0 for
    K = 1 or with both parts off.

    ``norm`` (METHODS.md "Checked against the official code", row 1): ``"official"`` (default)
    Z = K − 1, as the official ``NBOD`` divides the sum over ordered pairs, the form NCL's λ = 0.6
    and its λ sweep were tuned with; ``"paper"`` Z = K(K − 1), eq. 8–9 as printed (K× weaker).

    ``detach_target=False`` (default): no stop-gradient. The paper's eq. 8–9 have none and
    it describes online mutual distillation where "each expert can be a teacher to others
    and also can be a student"; the official code (``lib/loss/loss.py``, ``NBOD``) also
    back-propagates through both sides of ``F.kl_div``. ``True`` detaches ``p(θ_k)`` (the
    target of each ordered pair), DML style.
    """
    _check_mode(mode)
    if norm not in ("official", "paper"):
        raise ValueError(f"norm must be 'official' or 'paper', got {norm!r}")
    z = _stack(expert_logits, "expert_logits")
    num_experts, batch, num_classes = z.shape
    _check_counts(class_counts, num_classes)
    if num_experts == 1 or not (bod_all or bod_hard):
        return z.new_zeros(())
    balanced = _ncl_balanced_logits(z, class_counts, tau)
    per_sample = z.new_zeros(batch)
    if bod_all:
        log_p = balanced.log_softmax(-1)
        per_sample = per_sample + _pairwise_kl(log_p.exp(), log_p, detach_target)
    if bod_hard:
        if hard_mask is None:
            raise ValueError("hard_mask is required when bod_hard=True")
        mask = _check_mask(hard_mask, torch.Size((batch, num_classes)))
        log_p_hard = _hard_log_probs(balanced, mask, mode)
        finite_log_p = log_p_hard.masked_fill(~mask, 0.0) if mode == "restrict" else log_p_hard  # 0·log 0 := 0
        per_sample = per_sample + _pairwise_kl(log_p_hard.exp(), finite_log_p, detach_target)
    pairs_per_expert = num_experts - 1
    return per_sample.mean() / (pairs_per_expert if norm == "official" else num_experts * pairs_per_expert)


# -- ECL ------------------------------------------------------------------------------
@torch.no_grad()
def bkt_weights(ref_logits: Tensor, cls_logits: Tensor, targets: Tensor, *, eps: float = 1e-6) -> Tensor:
    """ECL Balanced Knowledge Transfer weights (ECL eq. 5–6), ``[B]`` float32, no gradient.

    ``ŷ^r = softmax(z^r/σ^r)``, ``ŷ^c = softmax(z^c/σ^c)`` with σ the sample's (unbiased) logit
    std over classes, and ``w = CE(ŷ^c, y) / CE(ŷ^r, y) = log ŷ^c_y / log ŷ^r_y`` (METHODS.md:
    eq. 6's middle expression is printed upside down; the text and right-hand side give this
    direction): a sample whose cls head is less confident than its ref head gets ``w > 1``.

    Guards: σ is clamped to ``≥ eps`` (a row of equal logits gives a uniform ŷ instead of
    0/0) and the denominator ``CE(ŷ^r, y)`` to ``≥ eps`` (with many classes a
    σ-normalised softmax can round to ŷ^r_y = 1, i.e. CE = 0); ``eps = 1e-6`` is about the
    resolution of a float32 log-softmax. Computed in float32 (bf16 autocast safe).
    """
    _check_2d(ref_logits, "ref_logits")
    if cls_logits.shape != ref_logits.shape:
        raise ValueError(f"cls_logits shape {tuple(cls_logits.shape)} != ref_logits shape {tuple(ref_logits.shape)}")
    batch, num_classes = ref_logits.shape
    if num_classes < 2:
        raise ValueError("bkt_weights needs at least 2 classes (the logit std is undefined for 1)")
    _check_targets(targets, batch)

    def target_ce(z: Tensor) -> Tensor:
        z = z.float()
        sigma = z.std(dim=-1, keepdim=True).clamp_min(eps)
        return -(z / sigma).log_softmax(-1).gather(1, targets.long().view(-1, 1)).squeeze(1)

    return target_ce(cls_logits) / target_ce(ref_logits).clamp_min(eps)


def logit_kd_loss(
    expert_logits: Sequence[Tensor], weights: Tensor | None = None, tau: float = 1.0, detach_target: bool = False
) -> Tensor:
    """ECL logit-level distillation (ECL eq. 7), averaged over ordered expert pairs:

    ``Σ_k Σ_{q≠k} Σ_i w_i τ² KL(softmax(z_i^k/τ) ‖ softmax(z_i^q/τ)) / (N K (K−1))``.

    ``weights``: the ``[B]`` BKT weights (:func:`bkt_weights`; treated as constants), all
    ones if None; or ``[K, B]``, one row per expert, where row ``q`` weights the pairs in which
    expert ``q`` is the student (``w_i^q`` multiplies ``KL(… ‖ softmax(z_i^q/τ))``).
    ``detach_target=False`` (default): ECL eq. 7 has no stop-gradient and
    "follow[s] NCL" online distillation, whose paper and official code both keep the
    gradient on both sides; ``True`` detaches ``softmax(z^k/τ)``. 0 for K = 1.
    """
    z = _stack(expert_logits, "expert_logits")
    num_experts, batch, _ = z.shape
    if weights is not None and weights.shape not in ((batch,), (num_experts, batch)):
        raise ValueError(f"weights must have shape [{batch}] or [{num_experts}, {batch}], got {tuple(weights.shape)}")
    if num_experts == 1:
        return z.new_zeros(())
    log_p = (z / tau).log_softmax(-1)
    if weights is not None and weights.dim() == 2:
        per_sample = _pairwise_kl(log_p.exp(), log_p, detach_target, weights.detach().to(log_p.dtype))
    else:
        per_sample = _pairwise_kl(log_p.exp(), log_p, detach_target)
        if weights is not None:
            per_sample = weights.detach().to(per_sample.dtype) * per_sample
    return tau**2 * per_sample.mean() / (num_experts * (num_experts - 1))


def feature_kd_loss(expert_features: Sequence[Tensor], tau: float = 1.0, detach_target: bool = False) -> Tensor:
    """ECL feature-level distillation (ECL eq. 8), averaged over ordered expert pairs:

    ``Σ_k Σ_{q≠k} τ² KL(softmax(v_i^k/τ) ‖ softmax(v_i^q/τ)) / (K (K−1))``, the feature
    vector treated as logits. METHODS.md / ECL eq. 8 print no 1/N; like every function here
    this returns the *batch mean* over i (so it is on the same scale as eq. 7).
    ``detach_target`` as in :func:`logit_kd_loss` (default False). 0 for K = 1.
    """
    v = _stack(expert_features, "expert_features")
    num_experts = v.shape[0]
    if num_experts == 1:
        return v.new_zeros(())
    log_p = (v / tau).log_softmax(-1)
    per_sample = _pairwise_kl(log_p.exp(), log_p, detach_target)
    return tau**2 * per_sample.mean() / (num_experts * (num_experts - 1))


# -- contrastive branch (NCL / ECL) ---------------------------------------------------
def info_nce_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE of one expert (NCL eq. 11, ECL eq. 9), batch mean:

    ``−log( exp(q·k⁺/T) / (exp(q·k⁺/T) + Σ_{n ∈ queue} exp(q·n/T)) )``.

    ``query`` ``[B, d]``, ``key`` ``[B, d]`` (momentum encoder; detached here), ``queue``
    ``[Q, d]`` (detached), all ℓ2-normalised by the caller. Computed as cross-entropy over
    ``[B, 1 + Q]`` logits with target 0. Sum over experts in the method (``L_con = Σ_k``).
    """
    _check_2d(query, "query")
    if key.shape != query.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != query shape {tuple(query.shape)}")
    if queue.dim() != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be [Q, {query.shape[1]}], got shape {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    positive = (query * key.detach()).sum(-1, keepdim=True)
    negatives = query @ queue.detach().to(query.dtype).t()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


# -- CBD ------------------------------------------------------------------------------
def cbd_distillation_loss(student_features: Tensor, teacher_features: Tensor | Sequence[Tensor]) -> Tensor:
    """CBD feature distillation ``1 − cos(v, [v̂¹ … v̂ᴷ])`` (CBD eq. 2, K = 1; eq. 4, K > 1).

    ``teacher_features``: one ``[B, d]`` tensor or K tensors ``[B, d_k]``; each is
    ℓ2-normalised, then they are concatenated (``[B, Σd_k]``). ``student_features`` is ``v``
    (K = 1) or ``h(v)`` (K > 1, already projected) with matching width. The teachers are
    frozen: their side is detached. Batch mean.
    """
    _check_2d(student_features, "student_features")
    teachers = [teacher_features] if isinstance(teacher_features, Tensor) else list(teacher_features)
    if not teachers:
        raise ValueError("teacher_features is empty")
    for k, t in enumerate(teachers):
        _check_2d(t, f"teacher_features[{k}]")
        if t.shape[0] != student_features.shape[0]:
            raise ValueError(f"teacher_features[{k}] has batch {t.shape[0]}, student has {student_features.shape[0]}")
    target = torch.cat([F.normalize(t.detach(), dim=1) for t in teachers], dim=1)
    if target.shape[1] != student_features.shape[1]:
        raise ValueError(
            f"student feature width {student_features.shape[1]} != concatenated teacher width {target.shape[1]}"
        )
    return (1.0 - F.cosine_similarity(student_features, target.to(student_features.dtype), dim=1)).mean()
