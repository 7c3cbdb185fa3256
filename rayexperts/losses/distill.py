"""Distillation between experts and from teachers: MLLT's mutual learning, ECL's balanced knowledge transfer
(BKT weights, logit and feature KD) and CBD's feature distillation (docs/methods.md "MLLT", "ECL", "CBD").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.losses._shared import _check_2d, _check_targets, _pairwise_kl, _stack


# -- MLLT ------------------------------------------------------------------------------------------
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


# -- ECL -------------------------------------------------------------------------------------------
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


# -- CBD -------------------------------------------------------------------------------------------
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
