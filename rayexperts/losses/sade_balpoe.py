"""SADE (the inverse prior, its three experts' losses, the test-time aggregation loss) and BalPoE (its loss and
its prior-corrected ensemble): docs/methods.md "More multi-expert methods" (conventions:
rayexperts/losses/ldam_ride.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.losses._shared import (
    _check_counts,
    _check_num_experts,
    _check_targets,
    _promote,
    _stack,
)


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
