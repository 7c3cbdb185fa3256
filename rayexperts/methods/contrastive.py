"""The contrastive branch NCL and ECL share: MoCo v2 per expert and ``L_con = Σ_k InfoNCE_k``
(NCL eq. 11, ECL eq. 9; docs/methods.md NCL "Self-supervision")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor, nn

    from rayexperts.models import ContrastiveOutput, MocoExperts, MultiExpertNet


@dataclass
class MocoOptions:
    """MoCo v2 settings of the official NCL CIFAR config (docs/methods.md)."""

    dim: int = 64  # projection (key) dimension
    hidden: int = 0  # hidden width of the projection MLP; 0: the feature dimension
    queue_size: int = 1024  # keys in each expert's queue
    momentum: float = 0.999  # key encoder: θ_k ← m θ_k + (1 − m) θ_q
    temperature: float = 0.2  # InfoNCE temperature
    # The key encoder starts as a copy of the query encoder (MoCo v2), or from its own random initialisation
    # (random: NCL's code builds the momentum networks anew).
    key_init: Literal["copy", "random"] = "copy"


# Where these settings lived before they moved into the method sections.
MOCO_RENAMED = {
    "model.moco_dim": "moco.dim",
    "model.moco_hidden": "moco.hidden",
    "model.moco_queue": "moco.queue_size",
    "model.moco_momentum": "moco.momentum",
    "model.moco_temperature": "moco.temperature",
}


def check_moco_batches(cfg, section: str) -> None:
    """Refuse ``data.drop_last=false`` on several workers with the MoCo branch on: the key queues gather
    equal per-worker batches from every worker, and the last, partial batch is split unevenly."""
    from rayexperts.errors import ConfigError

    if cfg[section].contrastive and not bool(cfg.data.drop_last) and int(cfg.scaling.num_workers) > 1:
        raise ConfigError(f"data.drop_last=false with scaling.num_workers={cfg.scaling.num_workers} and "
                          f"{section}.contrastive=true: the MoCo queues need equal batches on every worker; "
                          "set data.drop_last=true or scaling.num_workers=1")


def with_moco(net: MultiExpertNet | nn.Module, opts: MocoOptions,
              rebuild: Callable[[], MultiExpertNet | nn.Module] | None = None) -> MocoExperts:
    """``net`` with one MoCo branch per expert; ``rebuild`` builds the same network anew (``key_init=random``)."""
    from rayexperts.models import MocoConfig, MocoExperts

    cfg = MocoConfig(int(opts.dim), int(opts.hidden), int(opts.queue_size), float(opts.momentum), str(opts.key_init))
    return MocoExperts(net, cfg, rebuild)


def contrastive_loss(out: ContrastiveOutput, temperature: float) -> Tensor:
    """``L_con = Σ_k InfoNCE(q^k, k^k, Q^k)`` over the experts' MoCo branches."""
    from rayexperts.losses import info_nce_loss

    if out.queries is None or out.keys is None or out.queues is None:
        raise ValueError("the contrastive term needs MoCo outputs: call the model in training mode with the key view")
    return sum(
        info_nce_loss(q.float(), k.float(), queue, temperature)
        for q, k, queue in zip(out.queries, out.keys, out.queues, strict=True)
    )
