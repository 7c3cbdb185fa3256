"""``ncl``: Nested Collaborative Learning (Li et al., CVPR 2022; docs/methods.md "NCL").

K independent networks (no shared trunk), each trained with the balanced softmax
``p_j(x; θ_k) = n_j e^{z^k_j} / Σ_l n_l e^{z^k_l}`` (eq. 2), plus a MoCo branch per expert:

    Ψ      = TopHard_{C_hard}{ z^a_j | j ≠ y } ∪ {y}                              # HCM, eq. 3
    p*     = balanced softmax restricted to Ψ                                      # eq. 4
    L_nil  = Σ_k −log p_y(x; θ_k) + Σ_k −log p*_y(x; θ_k)                          # eq. 5–7
    L_dis  = 1/Z Σ_k Σ_{q≠k} [ KL(p(θ_k) ‖ p(θ_q)) + KL(p*(θ_k) ‖ p*(θ_q)) ]         # eq. 8–10, Z: see below
    L_con  = Σ_k InfoNCE_k                                                         # eq. 11
    L      = L_nil + L_con + λ · L_dis                                             # eq. 12

``C_hard = round(ncl.hard_ratio · C)`` non-target classes plus the target (``ncl.hard_count=paper``), or
the official code's ``int(β·C)`` classes including the target (``official``); λ = ``ncl.distill_weight``;
L_dis divided by K − 1 (``ncl.distill_norm=official``, the form λ = 0.6 was tuned with) or by K(K − 1)
(``paper``, eq. 8–9 as printed); InfoNCE temperature ``ncl.moco.temperature``. One hard set Ψ per sample is shared by all experts. It is mined
from the *raw* logits ``z^a`` of the anchor expert ``a``: eq. 3 ranks ``z^k_ij``, not the
balanced logits, and the official code does the same (``inputs[0]`` before ``+ log n``).
The anchor is ``ncl.anchor_expert`` (default 0, as the official code), or with
``ncl.hard_anchor=random`` an expert drawn per step (the paper's wording). ``ncl.hard_mode``:
``restrict`` removes the other classes from the normaliser (eq. 4), ``mask`` is the official
code's logit mask. No side of any KL is detached: eq. 8–9 and the official ``NBOD`` let every
expert be teacher and student at once.

Ablation switches (NCL Table 5): ``ncl.learn_hard`` (the ``p*`` sum of L_nil), ``ncl.distill_all``,
``ncl.distill_hard`` (the two halves of L_dis), ``ncl.contrastive`` (L_con and the MoCo branch).
Logged terms, weighted as they enter L: ``nil``, ``dis`` (= λ·L_dis), ``con``.
Inference: each expert, and the ensemble (mean logits); balanced training needs no PC softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, register_method
from rayexperts.methods.contrastive import MOCO_RENAMED, MocoOptions, check_moco_batches, contrastive_loss, with_moco

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models import ContrastiveOutput


@dataclass
class NCLOptions:
    tau: float = 1.0  # balanced softmax: z + τ·log n_j (eq. 2)
    hard_ratio: float = 0.3  # β = C_hard / C, the share of classes mined as hard (HCM, eq. 3)
    hard_anchor: Literal["fixed", "random"] = "fixed"  # the expert that mines Ψ: anchor_expert, or one per step
    anchor_expert: int = 0
    hard_mode: Literal["restrict", "mask"] = "restrict"  # p* over Ψ (eq. 4), or the official code's logit mask
    hard_count: Literal["paper", "official"] = "paper"  # Ψ: round(β·C) others + the target, or int(β·C) in all
    distill_weight: float = 0.6  # λ (eq. 12)
    distill_norm: Literal["official", "paper"] = "official"  # L_dis ÷ (K − 1) as the official NBOD, or ÷ K(K − 1)
    learn_hard: bool = True  # NIL's hard-category term: the −log p*_y sum of eq. 5–7
    distill_all: bool = True  # BOD_all: distillation over all classes (eq. 8)
    distill_hard: bool = True  # BOD_hard: distillation over the hard categories (eq. 9)
    contrastive: bool = True  # L_con with a MoCo branch per expert (eq. 11)
    moco: MocoOptions = field(default_factory=MocoOptions)


@register_method("ncl")
class NestedCollaborative(Method):
    Options = NCLOptions
    defaults = {"model.num_experts": 3, "model.classifier": "linear"}
    official = {  # docs/methods.md "Checked against the official code", rows 1-2, and NCL's lib/loss/loss.py
        "ncl.hard_count": ("official", "Bazinga699/NCL@f64fddb:lib/loss/loss.py (HCM_N = int(beta*C) incl. the target)",
                           "P", "hard set size"),
        "ncl.hard_mode": ("mask", "Bazinga699/NCL@f64fddb:lib/loss/loss.py (balanced logits times the 0/1 mask)", "P",
                          "hard set softmax"),
        "ncl.distill_norm": ("official", "Bazinga699/NCL@f64fddb:lib/loss/loss.py (NBOD: sum over pairs / (K-1))", "P",
                             "NBOD normaliser"),
    }
    renamed = {
        "loss.tau": "tau", "loss.hard_ratio": "hard_ratio", "loss.hard_anchor": "hard_anchor",
        "loss.anchor_expert": "anchor_expert", "loss.hard_mode": "hard_mode", "loss.ncl_lambda": "distill_weight",
        "loss.nil_hard": "learn_hard", "loss.bod_all": "distill_all", "loss.bod_hard": "distill_hard",
        "loss.self_sup": "contrastive", "loss.bod_norm": "distill_norm", **MOCO_RENAMED,
    }
    primary_view = "ensemble"

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        beta_c = float(self.opts.hard_ratio) * self.num_classes
        # C_hard non-target classes: β·C rounded (the paper), or int(β·C) counting the target (the code)
        self.num_hard = round(beta_c) if self.opts.hard_count == "paper" else max(int(beta_c) - 1, 0)

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        o = cfg.ncl
        if not 0 <= o.hard_ratio <= 1:
            raise ConfigError(f"'ncl.hard_ratio' must lie in [0, 1], got {o.hard_ratio}")
        if not 0 <= o.anchor_expert < cfg.model.num_experts:
            raise ConfigError(f"'ncl.anchor_expert'={o.anchor_expert} must lie in [0, {cfg.model.num_experts - 1}] "
                              "(model.num_experts)")
        check_moco_batches(cfg, "ncl")

    @property
    def uses_key_view(self) -> bool:
        return bool(self.opts.contrastive)

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        def build():
            return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)

        net = build()
        return with_moco(net, self.opts.moco, build) if self.opts.contrastive else net

    def anchor(self) -> int:
        """The expert whose logits mine the hard categories for this step."""
        if self.opts.hard_anchor == "random":
            import torch

            return int(torch.randint(self.num_experts, ()))
        return int(self.opts.anchor_expert)

    def loss(self, out: ContrastiveOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import hard_category_mask, nbod_loss, nil_loss

        o = self.opts
        logits = [z.float() for z in out.logits]
        mask = hard_category_mask(logits[self.anchor()], targets, self.num_hard) if o.learn_hard or o.distill_hard else None
        counts, tau, mode = self.class_counts, float(o.tau), str(o.hard_mode)
        terms = {"nil": nil_loss(logits, targets, counts, mask, tau, hard=bool(o.learn_hard), mode=mode)}
        if o.contrastive:
            terms["con"] = contrastive_loss(out, float(o.moco.temperature))
        if o.distill_all or o.distill_hard:
            dis = nbod_loss(logits, counts, mask, tau, bod_all=bool(o.distill_all), bod_hard=bool(o.distill_hard),
                            mode=mode, norm=str(o.distill_norm))
            terms["dis"] = float(o.distill_weight) * dis
        total = sum(terms.values())
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})
