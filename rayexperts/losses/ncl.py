"""NCL's terms (docs/methods.md "NCL"): the hard category set, NIL and NBOD, the contrastive branch's InfoNCE
(which ECL reuses), and the experts' disagreement (NCL Fig. 1/5b; an evaluation measure, not a loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.losses._shared import (
    _check_2d,
    _check_counts,
    _check_mask,
    _check_mode,
    _check_targets,
    _pairwise_kl,
    _stack,
)


def expert_disagreement(expert_logits: Sequence[Tensor]) -> Tensor:
    """Per sample ``[B]``, the mean over ordered expert pairs of ``KL(softmax(z^k) ‖ softmax(z^q))``
    (how much the experts disagree; NCL Fig. 1/5b). Not a loss: no gradient is meant through it."""
    z = _stack([t.float() for t in expert_logits], "expert_logits")
    num_experts = z.shape[0]
    if num_experts == 1:
        return z.new_zeros(z.shape[1])
    log_p = z.log_softmax(-1)
    return _pairwise_kl(log_p.exp(), log_p, detach_target=True) / (num_experts * (num_experts - 1))


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


# -- contrastive branch (NCL / ECL) ----------------------------------------------------------------
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
