"""Shape checks and pieces several papers' terms share (the package's conventions: rayexperts/losses/__init__.py).

Inputs are validated by shape only: checking values would force a device sync every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
