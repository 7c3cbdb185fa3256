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

One module per paper or concern, every public name re-exported here (``from rayexperts.losses import X``):
``prior`` (balanced softmax / logit adjustment, PC softmax), ``distill`` (MLLT's mutual learning, ECL's BKT and
KD, CBD's distillation), ``ncl`` (NCL's terms, InfoNCE, the experts' disagreement), ``ldam_ride`` (LDAM-DRW,
RIDE and its router), ``sade_balpoe`` (SADE, BalPoE); ``_shared`` holds the shape checks and the pairwise KL.
"""

from __future__ import annotations

from rayexperts.losses.distill import (
    bkt_weights,
    cbd_distillation_loss,
    feature_kd_loss,
    logit_kd_loss,
    mutual_learning_loss,
)
from rayexperts.losses.ldam_ride import (
    diversity_temperatures,
    drw_weights,
    ldam_loss,
    ldam_margins,
    ride_loss,
    router_loss,
    router_targets,
)
from rayexperts.losses.ncl import (
    expert_disagreement,
    hard_category_mask,
    info_nce_loss,
    nbod_loss,
    nil_loss,
    restricted_log_softmax,
)
from rayexperts.losses.prior import balanced_logits, balanced_softmax_loss, pc_softmax_logits
from rayexperts.losses.sade_balpoe import (
    balpoe_loss,
    balpoe_predict_logits,
    inverse_prior,
    sade_aggregation_loss,
    sade_loss,
)

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
