"""``ncl``: Nested Collaborative Learning (Li et al., CVPR 2022; METHODS.md "NCL").

K independent networks (no shared trunk), each trained with the balanced softmax
``p_j(x; θ_k) = n_j e^{z^k_j} / Σ_l n_l e^{z^k_l}`` (eq. 2), plus a MoCo branch per expert:

    Ψ      = TopHard_{C_hard}{ z^a_j | j ≠ y } ∪ {y}                              # HCM, eq. 3
    p*     = balanced softmax restricted to Ψ                                      # eq. 4
    L_nil  = Σ_k −log p_y(x; θ_k) + Σ_k −log p*_y(x; θ_k)                          # eq. 5–7
    L_dis  = 1/(K(K−1)) Σ_k Σ_{q≠k} [ KL(p(θ_k) ‖ p(θ_q)) + KL(p*(θ_k) ‖ p*(θ_q)) ]  # eq. 8–10
    L_con  = Σ_k InfoNCE_k                                                         # eq. 11
    L      = L_nil + L_con + λ · L_dis                                             # eq. 12

``C_hard = round(loss.hard_ratio · C)``, λ = ``loss.ncl_lambda``, InfoNCE temperature
``model.moco_temperature``. One hard set Ψ per sample is shared by all experts. It is mined
from the *raw* logits ``z^a`` of the anchor expert ``a``: eq. 3 ranks ``z^k_ij``, not the
balanced logits, and the official code does the same (``inputs[0]`` before ``+ log n``).
The anchor is ``loss.anchor_expert`` (default 0, as the official code), or with
``loss.hard_anchor=random`` an expert drawn per step (the paper's wording). ``loss.hard_mode``:
``restrict`` removes the other classes from the normaliser (eq. 4), ``mask`` is the official
code's logit mask. No side of any KL is detached: eq. 8–9 and the official ``NBOD`` let every
expert be teacher and student at once.

Ablation switches (NCL Table 5): ``loss.nil_hard`` (the ``p*`` sum of L_nil), ``loss.bod_all``,
``loss.bod_hard`` (the two halves of L_dis), ``loss.self_sup`` (L_con and the MoCo branch).
Logged terms, weighted as they enter L: ``nil``, ``dis`` (= λ·L_dis), ``con``.
Inference: each expert, and the ensemble (mean logits); balanced training needs no PC softmax.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from rayexperts.losses import hard_category_mask, info_nce_loss, nbod_loss, nil_loss
from rayexperts.methods.base import LossOutput, Method
from rayexperts.models import build_model
from rayexperts.models.output import ModelOutput


def contrastive_loss(out: ModelOutput, temperature: float) -> Tensor:
    """``L_con = Σ_k InfoNCE(q^k, k^k, Q^k)`` (NCL eq. 11, ECL eq. 9) over the experts' MoCo branches."""
    if out.queries is None or out.keys is None or out.queues is None:
        raise ValueError("the contrastive term needs MoCo outputs: call the model in training mode with x_key")
    return sum(
        info_nce_loss(q.float(), k.float(), queue, temperature)
        for q, k, queue in zip(out.queries, out.keys, out.queues, strict=True)
    )


class NestedCollaborative(Method):
    name = "ncl"
    primary_view = "ensemble"

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.uses_key_view = bool(cfg.loss.self_sup)
        self.num_hard = round(float(cfg.loss.hard_ratio) * self.num_classes)  # C_hard = β·C
        num_experts, anchor = int(cfg.model.num_experts), int(cfg.loss.anchor_expert)
        if not 0 <= anchor < num_experts:
            raise ValueError(f"'loss.anchor_expert'={anchor} must lie in [0, {num_experts - 1}] (model.num_experts)")

    def build_model(self) -> nn.Module:
        return build_model(
            self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False, moco=self.uses_key_view
        )

    def anchor(self, num_experts: int) -> int:
        """The expert whose logits mine the hard categories for this step."""
        if self.cfg.loss.hard_anchor == "random":
            return int(torch.randint(num_experts, ()))
        return int(self.cfg.loss.anchor_expert)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        lc = self.cfg.loss
        logits = [z.float() for z in out.logits]
        mask = None
        if lc.nil_hard or lc.bod_hard:
            mask = hard_category_mask(logits[self.anchor(len(logits))], targets, self.num_hard)
        counts, tau, mode = self.class_counts, float(lc.tau), str(lc.hard_mode)
        terms = {"nil": nil_loss(logits, targets, counts, mask, tau, hard=bool(lc.nil_hard), mode=mode)}
        if lc.self_sup:
            terms["con"] = contrastive_loss(out, float(self.cfg.model.moco_temperature))
        if lc.bod_all or lc.bod_hard:
            dis = nbod_loss(logits, counts, mask, tau, bod_all=bool(lc.bod_all), bod_hard=bool(lc.bod_hard), mode=mode)
            terms["dis"] = float(lc.ncl_lambda) * dis
        total = sum(terms.values())
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})
