"""Every paper term of MLLT, NCL, ECL and CBD, and the losses of LDAM-DRW, RIDE, SADE and
BalPoE, as pure functions (docs/methods.md).

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

import math
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
    "ldam_margins",
    "ldam_loss",
    "drw_weights",
    "diversity_temperatures",
    "ride_loss",
    "router_targets",
    "router_loss",
    "inverse_prior",
    "sade_loss",
    "sade_aggregation_loss",
    "balpoe_loss",
    "balpoe_predict_logits",
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
    """Balanced softmax / logit adjustment (docs/methods.md "BSCE, BC loss"; NCL eq. 2, ECL eq. 10).

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
    """Post-compensated softmax (docs/methods.md "PC softmax", MLLT inference), inference only.

    ``h_PC[y] = z_y − log p_s(y) + log p_t(y)`` with ``p_s = n / Σn``. ``test_prior`` is a
    ``[C]`` tensor of non-negative weights, normalised to sum to one (uniform if None).
    """
    _check_2d(logits, "logits")
    num_classes = logits.shape[1]
    _check_counts(class_counts, num_classes)
    counts = class_counts.to(logits.dtype)
    out = logits - (counts / counts.sum()).log()
    if test_prior is None:
        return out - math.log(num_classes)  # a Python float: no host-to-device copy per call
    if test_prior.shape != (num_classes,):
        raise ValueError(f"test_prior must have shape [{num_classes}], got {tuple(test_prior.shape)}")
    prior = test_prior.to(logits.dtype)
    return out + (prior / prior.sum()).log()


# -- MLLT -----------------------------------------------------------------------------
def mutual_learning_loss(
    expert_logits: Sequence[Tensor], teacher: Literal["ensemble", "individual"] = "ensemble"
) -> Tensor:
    """MLLT mutual learning loss (MLLT eq. 3–5; docs/methods.md "MLLT"), summed over experts.

    ``"ensemble"`` (default): ``Σ_k KL(p̄_{−k} ‖ p_k)`` with ``p̄_{−k} = 1/(K−1) Σ_{l≠k} p_l``
    (mean of the *other* experts' probabilities). ``"individual"``:
    ``Σ_k 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k)``. ``p = softmax(z)``. The teacher side is detached
    (docs/methods.md; DML [32], which MLLT follows, updates each cohort with the others fixed), so
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

    ``norm`` (docs/methods.md "Checked against the official code", row 1): ``"official"`` (default)
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
    std over classes, and ``w = CE(ŷ^c, y) / CE(ŷ^r, y) = log ŷ^c_y / log ŷ^r_y`` (docs/methods.md:
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
    vector treated as logits. docs/methods.md / ECL eq. 8 print no 1/N; like every function here
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


# -- LDAM-DRW, RIDE, SADE, BalPoE (docs/methods.md "More multi-expert methods") ----------------
# In RIDE, SADE and BalPoE the network already multiplies its cosine logits by s = 30, so those
# losses take ``30·cos``; only :func:`ldam_loss` takes bare cosines and applies s itself
# (docs/methods.md, conventions of that part). No function here builds a tensor from Python data:
# every constant is a Python float combined with an existing tensor.
def _promote(x: Tensor) -> Tensor:
    """half/bf16 → float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _float_counts(class_counts: Tensor) -> Tensor:
    """``class_counts`` as a 1-D floating tensor (float32 for integer or half counts, else its dtype)."""
    if class_counts.dim() != 1 or class_counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D tensor, got shape {tuple(class_counts.shape)}")
    return _promote(class_counts) if class_counts.is_floating_point() else class_counts.float()


def _subtract_target_margin(logits: Tensor, targets: Tensor, margins: Tensor) -> Tensor:
    """``z − m_y·onehot(y)``: the target logit of each row lowered by its class margin ``m_y``."""
    index = targets.long().view(-1, 1)
    return logits.scatter_add(1, index, -margins.to(logits.dtype)[index])


def _check_class_weight(weight: Tensor | None, num_classes: int) -> None:
    if weight is not None and weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape [{num_classes}] (one per class), got {tuple(weight.shape)}")


def _check_num_experts(num_experts: int, expected: int, what: str) -> None:
    if num_experts != expected:
        raise ValueError(f"{what}: expected {expected} experts, got {num_experts}")


def ldam_margins(class_counts: Tensor, max_m: float = 0.5) -> Tensor:
    """LDAM per-class margins (docs/methods.md §1.1): ``m_c = K / n_c^{1/4}`` with ``K`` such that
    ``max_c m_c = max_m``, i.e. ``m_c = max_m · (min_j n_j / n_c)^{1/4}``. ``[C]``, float32 for
    integer counts (else the counts' floating dtype)."""
    margins = _float_counts(class_counts).pow(-0.25)
    return margins * (max_m / margins.max())


def ldam_loss(
    cos_logits: Tensor,
    targets: Tensor,
    class_counts: Tensor,
    max_m: float = 0.5,
    s: float = 30.0,
    weight: Tensor | None = None,
) -> Tensor:
    """LDAM loss (docs/methods.md §1.1; LDAM-DRW ``LDAMLoss``):

    ``L = CE_w( s·(z − m_y·onehot(y)), y )`` with ``z = cos θ`` the bare NormedLinear cosines
    ``[B, C]`` (no s inside the model) and ``m`` = :func:`ldam_margins`. The margin is subtracted
    in cosine units **before** scaling by ``s``. ``weight``: per-class ``[C]`` weights (DRW:
    :func:`drw_weights` from the 0-indexed epoch 160 on, None before); the reduction is torch's
    weighted mean ``Σ_i w_{y_i} l_i / Σ_i w_{y_i}``.
    """
    _check_2d(cos_logits, "cos_logits")
    batch, num_classes = cos_logits.shape
    _check_targets(targets, batch)
    _check_counts(class_counts, num_classes)
    _check_class_weight(weight, num_classes)
    z = _promote(cos_logits)
    margins = ldam_margins(class_counts.to(z.dtype), max_m)
    logits = s * _subtract_target_margin(z, targets, margins)
    return F.cross_entropy(logits, targets.long(), weight=None if weight is None else weight.to(z.dtype))


def drw_weights(class_counts: Tensor, beta: float = 0.9999) -> Tensor:
    """Deferred re-weighting by the effective number of samples (docs/methods.md §1.1, §2.1):

    ``w_c = (1 − β) / (1 − β^{n_c})``, then ``w ← w / Σw · C`` (``[C]``, sums to C). ``β = 0``
    gives all ones. Computed as ``1 / −expm1(n_c · ln β)`` (``(1 − β)`` cancels in the
    normalisation), accurate in float32 where ``1 − β^{n}`` would lose digits.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    counts = _float_counts(class_counts)
    if beta == 0.0:
        return torch.ones_like(counts)
    weights = 1.0 / -torch.expm1(counts * math.log(beta))
    return weights * (counts.numel() / weights.sum())


def diversity_temperatures(
    class_counts: Tensor, reweight_factor: float = 0.05, base_temperature: float = 1.0
) -> Tensor:
    """RIDE's per-class diversity temperature (docs/methods.md §2.1, used once re-weighting is on):

    ``T_c = base_temperature · v_c``, ``v_c = (C·π_c·f + 1 − f) / max_j (C·π_j·f + 1 − f)``,
    ``π = n / Σn``, ``f = reweight_factor``: the head class gets ``T = base_temperature``,
    tail classes less. ``[C]``. ``f`` must lie in [0, 1] (then every ``v_c > 0``).
    """
    if not 0.0 <= reweight_factor <= 1.0:
        raise ValueError(f"reweight_factor must lie in [0, 1], got {reweight_factor}")
    if base_temperature <= 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    counts = _float_counts(class_counts)
    prior = counts / counts.sum()
    v = counts.numel() * reweight_factor * prior + (1.0 - reweight_factor)
    return base_temperature * (v / v.max())


def ride_loss(
    expert_logits: Sequence[Tensor],
    targets: Tensor,
    class_counts: Tensor,
    reweighted: bool,
    diversity_factor: float = -0.2,
    reweight_factor: float = 0.05,
    base_temperature: float = 1.0,
    max_m: float = 0.5,
    s: float = 30.0,
    *,
    mean_logits_ce_when_no_diversity: bool = False,
) -> Tensor:
    """RIDE stage-1 loss (docs/methods.md §2.1; RIDE ``RIDELoss``), **summed** over the E experts:

    ``L = Σ_e [ CE_w( z_e − s·m_y·onehot(y), y ) + λ_div · T̄² · KL( softmax(z̄/T) ‖ softmax(z_e/T) ) ]``

    * ``z_e`` = expert logits **already ×s** (s inside the network), ``z̄ = mean_e z_e``; the
      LDAM margin (:func:`ldam_margins`, ``max_m``) is therefore multiplied by ``s``;
    * ``reweighted`` (RIDE: ``epoch > reweight_epoch``, 1-indexed): ``w`` = :func:`drw_weights`
      (β = 0.9999) and the per-class ``T_c`` = :func:`diversity_temperatures`,
      ``T̄ = mean_c T_c``; otherwise ``w`` = None (plain mean) and ``T = T̄ = base_temperature``;
    * the KL target ``softmax(z̄/T)`` is **detached** (computed under no_grad in the official
      code): the gradient flows only through ``log softmax(z_e/T)``; KL is ``batchmean``
      (sum over classes, mean over the batch). As z̄ is the exact mean of the same logits,
      the path through the target would add ``J_softmax(z̄/T)ᵀ·Σ_e (log p̄ − log q_e)/T``, a
      softmax Jacobian applied to a per-row constant, i.e. 0: the detach leaves the gradient
      unchanged and only saves backward work (it does change second derivatives);
    * ``λ_div = diversity_factor`` is negative (maximise diversity); CIFAR-100 uses −0.45.

    ``mean_logits_ce_when_no_diversity=True`` reproduces the official quirk: when
    ``diversity_factor == 0`` each expert's CE term is computed on ``z̄`` instead of ``z_e``
    (so ``E·CE_w(z̄ − s·m_y·onehot(y), y)``, with gradient through ``z̄``). It has no effect
    when ``diversity_factor != 0``. No ``base_loss_factor`` here (1.0 in every config; loss
    weights belong to the method).
    """
    z = _stack(expert_logits, "expert_logits")
    num_experts, batch, num_classes = z.shape
    _check_targets(targets, batch)
    _check_counts(class_counts, num_classes)
    if base_temperature <= 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    counts = class_counts.to(z.dtype)
    margins = s * ldam_margins(counts, max_m)
    weight = drw_weights(counts) if reweighted else None
    mean_logits = z.mean(0)

    if mean_logits_ce_when_no_diversity and diversity_factor == 0:
        ce_logits = mean_logits.expand(num_experts, batch, num_classes)
    else:
        ce_logits = z
    flat_targets = targets.long().repeat(num_experts)
    adjusted = _subtract_target_margin(ce_logits.reshape(num_experts * batch, num_classes), flat_targets, margins)
    # each expert's weighted mean has the same denominator Σ_i w_{y_i}, so the weighted mean over
    # the E·B flattened rows is the mean over experts: × E gives the sum over experts
    ce = num_experts * F.cross_entropy(adjusted, flat_targets, weight=weight)

    if reweighted:
        temperature = diversity_temperatures(counts, reweight_factor, base_temperature)  # [C], per class
        temperature_mean = temperature.mean()  # a tensor: no .item() sync
    else:
        temperature = temperature_mean = base_temperature
    target_log_p = (mean_logits.detach() / temperature).log_softmax(-1)  # [B, C], no gradient
    student_log_p = (z / temperature).log_softmax(-1)  # [E, B, C]
    kl = (target_log_p.exp() * (target_log_p - student_log_p)).sum(-1).mean(-1)  # [E], batchmean
    return ce + diversity_factor * temperature_mean**2 * kl.sum()


@torch.no_grad()
def router_targets(expert_logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Targets of RIDE's expert-assignment router (docs/methods.md §2.4; RIDE ``ea_resnet_cifar.py``).

    ``expert_logits``: E tensors ``[B, C]`` in expert order. ``correct_i = argmax(Σ_{k≤i} z_k) == y``
    (the running ensemble of the first i + 1 experts; argmax ties go to the first class) and
    ``help_i = (not correct_i) and any(correct_{i+1..E−1})`` for the routers i = 0 … E−2: "adding
    expert i + 1 (or a later one) is needed". Returns 0/1 floats ``[B, E−1]`` (column i = router
    i, the layout of the official ``expert_help_preds``), no gradient.
    """
    z = _stack(expert_logits, "expert_logits")
    num_experts, batch, _ = z.shape
    _check_targets(targets, batch)
    correct = z.cumsum(0).argmax(-1) == targets.long().view(1, batch)  # [E, B]
    correct_from = correct.flip(0).long().cumsum(0).flip(0) > 0  # [E, B]: any(correct_{i..E−1})
    help_ = ~correct[:-1] & correct_from[1:]  # [E−1, B]
    return help_.t().to(z.dtype).contiguous()


def router_loss(router_logits: Tensor, help_targets: Tensor, pos_weight: float = 100.0) -> Tensor:
    """RIDE router loss (docs/methods.md §2.4): the mean over the E − 1 routers of
    ``BCEWithLogits(pred_i, help_i, pos_weight)``, each a batch mean, i.e. the mean over all
    ``[B, E−1]`` entries of ``pos_weight·h·softplus(−x) + (1 − h)·softplus(x)``.

    ``router_logits`` ``[B, E−1]`` (column i = router i), ``help_targets`` the same shape
    (:func:`router_targets`). ``pos_weight`` is a Python float (no device tensor is built).
    """
    _check_2d(router_logits, "router_logits")
    if help_targets.shape != router_logits.shape:
        raise ValueError(
            f"help_targets shape {tuple(help_targets.shape)} != router_logits shape {tuple(router_logits.shape)}"
        )
    x = _promote(router_logits)
    h = help_targets.to(x.dtype)
    return (pos_weight * h * F.softplus(-x) + (1.0 - h) * F.softplus(x)).mean()


def inverse_prior(prior: Tensor) -> Tensor:
    """SADE's inverse prior by rank (docs/methods.md §3.1; SADE ``DiverseExpertLoss.inverse_prior``).

    ``value, idx0 = sort(π)`` ascending (**stable**), ``rank = argsort(idx0)``,
    ``π_inv[c] = value[C − 1 − rank(c)]``: the class with the k-th largest prior gets the k-th
    smallest prior value. For a strictly decreasing prior this is ``π[C − 1 − c]``; inside a block
    of tied priors the stable sort makes it differ from a plain flip, e.g.
    ``[0.4, 0.2, 0.2, 0.1, 0.1] → [0.1, 0.2, 0.1, 0.4, 0.2]`` (the flip gives ``[0.1, 0.1, 0.2, 0.2, 0.4]``).
    """
    if prior.dim() != 1 or prior.numel() == 0:
        raise ValueError(f"prior must be a non-empty 1-D tensor, got shape {tuple(prior.shape)}")
    value, order = torch.sort(prior, stable=True)
    rank = order.argsort()
    return value[prior.numel() - 1 - rank]


def sade_loss(expert_logits: Sequence[Tensor], targets: Tensor, class_counts: Tensor, tau: float = 2.0) -> Tensor:
    """SADE training loss (docs/methods.md §3.1; SADE ``DiverseExpertLoss``), the **sum** of three CEs:

    ``L = CE(z_1, y) + CE(z_2 + log(π + 1e-9), y) + CE(z_3 + log(π + 1e-9) − τ·log(π_inv + 1e-9), y)``

    with ``π = n / Σn``, ``π_inv`` = :func:`inverse_prior` (stable sort), ``z_k`` = logits already
    ×30. Expert 1 is the head ("forward") expert, 2 the balanced one, 3 the inverse-prior
    ("backward") expert. Exactly three experts; unweighted batch means.
    """
    z = _stack(expert_logits, "expert_logits")
    num_experts, batch, num_classes = z.shape
    _check_num_experts(num_experts, 3, "sade_loss")
    _check_targets(targets, batch)
    _check_counts(class_counts, num_classes)
    counts = class_counts.to(z.dtype)
    prior = counts / counts.sum()
    log_prior = (prior + 1e-9).log()
    log_inverse = (inverse_prior(prior) + 1e-9).log()
    bias = torch.stack([torch.zeros_like(log_prior), log_prior, log_prior - tau * log_inverse])  # [3, C]
    adjusted = (z + bias.unsqueeze(1)).reshape(num_experts * batch, num_classes)
    # the mean over the 3·B flattened rows is the mean of the three batch means: × 3 gives their sum
    return num_experts * F.cross_entropy(adjusted, targets.long().repeat(num_experts))


def sade_aggregation_loss(
    raw_weights: Tensor, view1_expert_logits: Sequence[Tensor], view2_expert_logits: Sequence[Tensor]
) -> Tensor:
    """SADE test-time self-supervised aggregation objective (docs/methods.md §3.4 (b)):

    ``a = softmax(w)``, ``agg(v) = Σ_k a_k z_k(v)`` (weighted **logits**), and
    ``L = − mean_i cos( softmax(agg(v1_i)), softmax(agg(v2_i)) )`` (CosineSimilarity, eps 1e-6).

    ``raw_weights`` ``w``: ``[E]`` (initialised to 1/3 each in SADE, the only trainable
    parameter); ``view{1,2}_expert_logits``: E tensors ``[B, C]`` of the frozen network on two
    augmented views of the same unlabelled test images. Nothing is detached here: compute the
    logits under ``no_grad`` so that the gradient reaches ``w`` only.
    """
    z1 = _stack(view1_expert_logits, "view1_expert_logits")
    z2 = _stack(view2_expert_logits, "view2_expert_logits")
    if z1.shape != z2.shape:
        raise ValueError(f"view2 expert logits {tuple(z2.shape)} != view1 expert logits {tuple(z1.shape)}")
    num_experts = z1.shape[0]
    if raw_weights.shape != (num_experts,):
        raise ValueError(
            f"raw_weights must have shape [{num_experts}] (one per expert), got {tuple(raw_weights.shape)}"
        )
    w = _promote(raw_weights)
    dtype = torch.promote_types(w.dtype, z1.dtype)
    a = w.to(dtype).softmax(0).view(num_experts, 1, 1)
    p1 = (a * z1.to(dtype)).sum(0).softmax(-1)
    p2 = (a * z2.to(dtype)).sum(0).softmax(-1)
    return -F.cosine_similarity(p1, p2, dim=1, eps=1e-6).mean()


def balpoe_loss(
    expert_logits: Sequence[Tensor],
    targets: Tensor,
    class_counts: Tensor,
    taus: Sequence[float] = (0.0, 1.0, 2.0),
) -> Tensor:
    """BalPoE loss (docs/methods.md §4.1; BalPoE ``BSExpertLoss``), the **mean** over the E experts:

    ``L = (1/E) Σ_e CE( z_e + τ_e·log(π + 1e-9), y )``, ``π = n / Σn``, ``z_e`` = logits already ×30.

    ``τ = 0``: plain CE, ``1``: Balanced Softmax, ``2``: "inverse" expert (the paper's
    ``λ = 1 − τ``); ``taus`` are Python floats, one per expert (ImageNet-LT: (0, 1.25, 2.5)).
    Mixup is the method's job: ``lam·L(y_a) + (1 − lam)·L(y_b)`` on the mixed batch's logits.
    """
    z = _stack(expert_logits, "expert_logits")
    num_experts, batch, num_classes = z.shape
    if len(taus) != num_experts:
        raise ValueError(f"taus has {len(taus)} entries, expected one per expert ({num_experts})")
    _check_targets(targets, batch)
    _check_counts(class_counts, num_classes)
    counts = class_counts.to(z.dtype)
    log_prior = (counts / counts.sum() + 1e-9).log()
    adjusted = torch.stack([z[e] + float(tau) * log_prior for e, tau in enumerate(taus)])
    # mean over the E·B flattened rows = mean over experts of the batch means
    return F.cross_entropy(adjusted.reshape(num_experts * batch, num_classes), targets.long().repeat(num_experts))


def balpoe_predict_logits(expert_logits: Sequence[Tensor], test_prior: Tensor | None = None) -> Tensor:
    """BalPoE test-time logits (docs/methods.md §4.4): the mean of the **raw** expert logits
    ``mean_e z_e`` (no training-time ``τ_e·log π``), plus ``log π_test`` when the test prior
    is known (``--posthoc_bias_correction``; no eps). ``test_prior``: ``[C]`` non-negative
    weights (e.g. test counts), normalised to sum to one. Returns ``[B, C]``.
    """
    z = _stack(expert_logits, "expert_logits")
    out = z.mean(0)
    if test_prior is None:
        return out
    num_classes = out.shape[1]
    if test_prior.shape != (num_classes,):
        raise ValueError(f"test_prior must have shape [{num_classes}], got {tuple(test_prior.shape)}")
    prior = test_prior.to(out.dtype)
    return out + (prior / prior.sum()).log()
