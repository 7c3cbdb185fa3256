"""LDAM-DRW (margins, the margin loss, DRW's class weights) and RIDE (diversity temperatures, its loss, the
expert router's targets and loss): docs/methods.md "More multi-expert methods".

In RIDE, SADE and BalPoE the network already multiplies its cosine logits by s = 30, so those
losses take ``30·cos``; only :func:`ldam_loss` takes bare cosines and applies s itself
(docs/methods.md, conventions of that part). No function here builds a tensor from Python data:
every constant is a Python float combined with an existing tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.losses._shared import (
    _check_2d,
    _check_class_weight,
    _check_counts,
    _check_targets,
    _float_counts,
    _promote,
    _stack,
    _subtract_target_margin,
)


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
