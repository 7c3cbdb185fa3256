"""Class-prior corrections of the logits: balanced softmax / logit adjustment (BSCE, ECL's BC loss) and the
post-compensated softmax of MLLT's inference (docs/methods.md "BSCE, BC loss", "PC softmax").
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from rayexperts.losses._shared import _check_2d, _check_counts, _check_targets


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
