"""``ecl``: Towards Effective Collaborative Learning in Long-Tailed Recognition (Xu et al.; docs/methods.md "ECL").

K independent experts, each with a ``cls`` head ``z^{k,c}`` (distilled) and a ``ref`` head
``z^{k,r}`` (BC loss only) on the same feature ``v^k``, plus a MoCo branch per expert:

    w^k_i  = CE(ŷ^{k,c}_i, y_i) / CE(ŷ^{k,r}_i, y_i),  ŷ = softmax(z / σ(z))            # BKT, eq. 5–6
    L_sup  = (1/K) Σ_k ( L_BC(z^{k,r}) + L_BC(z^{k,c}) )                              # eq. 10
    L_kd^logit   = Σ_k Σ_{q≠k} Σ_i w^q_i τ² KL(ς(z_i^{k,c}/τ) ‖ ς(z_i^{q,c}/τ)) / (N K (K−1))  # eq. 7
    L_kd^feature = Σ_k Σ_{q≠k} τ² KL(ς(v_i^k/τ) ‖ ς(v_i^q/τ)) / (K (K−1)), batch mean     # eq. 8
    L_con  = Σ_k InfoNCE_k                                                            # eq. 9
    L      = L_sup + α (L_kd^logit + L_kd^feature) + β L_con                          # eq. 11

L_BC is the balanced softmax with ``τ = ecl.tau``; ``τ`` in eq. 7–8 is ``ecl.distill_temperature``;
α = ``ecl.distill_weight``, β = ``ecl.contrastive_weight``; InfoNCE temperature ``ecl.moco.temperature``.

BKT pairing. Eq. 6–7 write one ``ŵ_{x_i}`` from "the" ref and cls heads, but every expert has its
own pair of heads, so the pair (k, q) must take its weight from one of them. We use the
*student* q's heads: BKT rests on the observation that "the classifier supervised by knowledge
distillation" grows over-confident on over-represented samples, and in ``KL(p_k ‖ p_q)`` the
head being supervised by distillation is q's. Weighting q's incoming distillation by q's own
cls-vs-ref gap damps KD exactly where it has made that head over-confident (w < 1) and
strengthens it where the head lags its label-only reference (w > 1). The weights carry no
gradient; neither KL side is detached (eq. 7–8 have no stop-gradient and follow NCL's online
distillation). ``ecl.balanced_transfer=false`` sets w = 1.

Ablation switches (ECL Table III): ``ecl.balanced_transfer`` (BKT), ``ecl.feature_distillation``
(L_kd^feature), ``ecl.contrastive`` (L_con and the MoCo branch). Logged terms, weighted as they
enter L: ``sup``, ``kd_logit`` (α·L_kd^logit), ``kd_feature`` (α·L_kd^feature), ``con`` (β·L_con).
Inference: the cls heads only, per expert and their mean (``ensemble``); the ref heads and MoCo
branches are unused. Horizontal-flip TTA is the engine's ``eval.tta_flip``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rayexperts.methods.base import LossOutput, Method, register_method
from rayexperts.methods.contrastive import MOCO_RENAMED, MocoOptions, check_moco_batches, contrastive_loss, with_moco

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models import ContrastiveOutput

REF = "ref"  # the name of the ref heads' logits in the model output


@dataclass
class ECLOptions:
    tau: float = 1.0  # BC loss: balanced softmax z + τ·log n_j (eq. 10)
    distill_weight: float = 0.6  # α (eq. 11)
    contrastive_weight: float = 1.0  # β (eq. 11)
    distill_temperature: float = 1.0  # τ of the logit and feature distillation (eq. 7–8)
    balanced_transfer: bool = True  # BKT weights w (eq. 5–6); false: w = 1
    feature_distillation: bool = True  # L_kd^feature (eq. 8)
    contrastive: bool = True  # L_con with a MoCo branch per expert (eq. 9)
    moco: MocoOptions = field(default_factory=MocoOptions)


@register_method("ecl")
class EffectiveCollaborative(Method):
    Options = ECLOptions
    defaults = {"model.num_experts": 3, "model.classifier": "linear"}
    renamed = {
        "loss.tau": "tau", "loss.ecl_alpha": "distill_weight", "loss.ecl_beta": "contrastive_weight",
        "loss.kd_tau": "distill_temperature", "loss.bkt": "balanced_transfer", "loss.fld": "feature_distillation",
        "loss.cpt": "contrastive", **MOCO_RENAMED,
    }
    primary_view = "ensemble"

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        check_moco_batches(cfg, "ecl")

    @property
    def uses_key_view(self) -> bool:
        return bool(self.opts.contrastive)

    def build_model(self) -> nn.Module:
        """The experts' cls heads, a ref head per expert on the same feature, and the MoCo branches."""
        from torch import nn

        from rayexperts.models import WithExtraHeads, build_classifier, build_experts

        m = self.cfg.model

        def build() -> nn.Module:
            net = build_experts(m, self.num_classes, self.in_channels, shared_trunk=False)
            ref = nn.ModuleList(build_classifier(m.classifier, net.feature_dim, self.num_classes, m.cosine_scale,
                                                 bool(m.cosine_bias)) for _ in range(net.num_experts))
            return WithExtraHeads(net, REF, ref)

        model = build()
        return with_moco(model, self.opts.moco, build) if self.opts.contrastive else model

    def bkt(self, ref: list[Tensor], cls: list[Tensor], targets: Tensor) -> Tensor | None:
        """``[K, B]`` BKT weights, row q from expert q's (ref, cls) heads; None (w = 1) when switched off."""
        import torch

        from rayexperts.losses import bkt_weights

        if not self.opts.balanced_transfer:
            return None
        return torch.stack([bkt_weights(r, c, targets) for r, c in zip(ref, cls, strict=True)])

    def loss(self, out: ContrastiveOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import balanced_softmax_loss, feature_kd_loss, logit_kd_loss

        o = self.opts
        if REF not in out.aux:
            raise ValueError("ECL needs the ref heads' logits: build the model with EffectiveCollaborative.build_model")
        alpha, tau_kd, tau_bc = float(o.distill_weight), float(o.distill_temperature), float(o.tau)
        cls, ref = [z.float() for z in out.logits], [z.float() for z in out.aux[REF]]
        bc = [
            balanced_softmax_loss(r, targets, self.class_counts, tau_bc)
            + balanced_softmax_loss(c, targets, self.class_counts, tau_bc)
            for r, c in zip(ref, cls, strict=True)
        ]
        terms = {
            "sup": sum(bc) / len(bc),
            "kd_logit": alpha * logit_kd_loss(cls, self.bkt(ref, cls, targets), tau=tau_kd),
        }
        if o.feature_distillation:
            terms["kd_feature"] = alpha * feature_kd_loss([v.float() for v in out.features], tau=tau_kd)
        if o.contrastive:
            terms["con"] = float(o.contrastive_weight) * contrastive_loss(out, float(o.moco.temperature))
        total = sum(terms.values())
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})
