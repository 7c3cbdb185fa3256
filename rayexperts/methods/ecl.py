"""``ecl``: Towards Effective Collaborative Learning in Long-Tailed Recognition (Xu et al.; METHODS.md "ECL").

K independent experts, each with a ``cls`` head ``z^{k,c}`` (distilled) and a ``ref`` head
``z^{k,r}`` (BC loss only) on the same feature ``v^k``, plus a MoCo branch per expert:

    w^k_i  = CE(ŷ^{k,c}_i, y_i) / CE(ŷ^{k,r}_i, y_i),  ŷ = softmax(z / σ(z))            # BKT, eq. 5–6
    L_sup  = (1/K) Σ_k ( L_BC(z^{k,r}) + L_BC(z^{k,c}) )                              # eq. 10
    L_kd^logit   = Σ_k Σ_{q≠k} Σ_i w^q_i τ² KL(ς(z_i^{k,c}/τ) ‖ ς(z_i^{q,c}/τ)) / (N K (K−1))  # eq. 7
    L_kd^feature = Σ_k Σ_{q≠k} τ² KL(ς(v_i^k/τ) ‖ ς(v_i^q/τ)) / (K (K−1)), batch mean     # eq. 8
    L_con  = Σ_k InfoNCE_k                                                            # eq. 9
    L      = L_sup + α (L_kd^logit + L_kd^feature) + β L_con                          # eq. 11

L_BC is the balanced softmax with ``τ = loss.tau``; ``τ`` in eq. 7–8 is ``loss.kd_tau``;
α = ``loss.ecl_alpha``, β = ``loss.ecl_beta``; InfoNCE temperature ``model.moco_temperature``.

BKT pairing. Eq. 6–7 write one ``ŵ_{x_i}`` from "the" ref and cls heads, but every expert has its
own pair of heads, so the pair (k, q) must take its weight from one of them. We use the
*student* q's heads: BKT rests on the observation that "the classifier supervised by knowledge
distillation" grows over-confident on over-represented samples, and in ``KL(p_k ‖ p_q)`` the
head being supervised by distillation is q's. Weighting q's incoming distillation by q's own
cls-vs-ref gap damps KD exactly where it has made that head over-confident (w < 1) and
strengthens it where the head lags its label-only reference (w > 1). The weights carry no
gradient; neither KL side is detached (eq. 7–8 have no stop-gradient and follow NCL's online
distillation). ``loss.bkt=false`` sets w = 1.

Ablation switches (ECL Table III): ``loss.bkt``, ``loss.fld`` (L_kd^feature), ``loss.cpt``
(L_con and the MoCo branch). Logged terms, weighted as they enter L: ``sup``, ``kd_logit``
(α·L_kd^logit), ``kd_feature`` (α·L_kd^feature), ``con`` (β·L_con).
Inference: the cls heads only, per expert and their mean (``ensemble``); the ref heads and MoCo
branches are unused. Horizontal-flip TTA is the engine's ``eval.tta_flip``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from rayexperts.losses import balanced_softmax_loss, bkt_weights, feature_kd_loss, logit_kd_loss
from rayexperts.methods.base import LossOutput, Method
from rayexperts.methods.ncl import contrastive_loss
from rayexperts.models import build_model
from rayexperts.models.output import ModelOutput


class EffectiveCollaborative(Method):
    name = "ecl"
    primary_view = "ensemble"

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.uses_key_view = bool(cfg.loss.cpt)

    def build_model(self) -> nn.Module:
        return build_model(
            self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False, ref_head=True,
            moco=self.uses_key_view,
        )

    def bkt(self, ref: list[Tensor], cls: list[Tensor], targets: Tensor) -> Tensor | None:
        """``[K, B]`` BKT weights, row q from expert q's (ref, cls) heads; None (w = 1) with ``loss.bkt=false``."""
        if not self.cfg.loss.bkt:
            return None
        return torch.stack([bkt_weights(r, c, targets) for r, c in zip(ref, cls, strict=True)])

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        lc = self.cfg.loss
        if out.ref_logits is None:
            raise ValueError("ECL needs the ref heads: build the model with ref_head=True")
        alpha, tau_kd, tau_bc = float(lc.ecl_alpha), float(lc.kd_tau), float(lc.tau)
        cls, ref = [z.float() for z in out.logits], [z.float() for z in out.ref_logits]
        bc = [
            balanced_softmax_loss(r, targets, self.class_counts, tau_bc)
            + balanced_softmax_loss(c, targets, self.class_counts, tau_bc)
            for r, c in zip(ref, cls, strict=True)
        ]
        terms = {
            "sup": sum(bc) / len(bc),
            "kd_logit": alpha * logit_kd_loss(cls, self.bkt(ref, cls, targets), tau=tau_kd),
        }
        if lc.fld:
            terms["kd_feature"] = alpha * feature_kd_loss([v.float() for v in out.features], tau=tau_kd)
        if lc.cpt:
            terms["con"] = float(lc.ecl_beta) * contrastive_loss(out, float(self.cfg.model.moco_temperature))
        total = sum(terms.values())
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})
