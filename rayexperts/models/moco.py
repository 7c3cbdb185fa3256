"""MoCo v2 branches on a multi-expert model (docs/methods.md NCL "Self-supervision", ECL's CPT).

:class:`MocoBranch`: for one expert, a momentum copy of its encoder and of its MLP projection
head, and a FIFO queue of ℓ2-normalised keys. :class:`MocoExperts` wraps a
:class:`~rayexperts.models.experts.MultiExpertNet` with one branch per expert. The temperature
belongs to the loss (``rayexperts.losses.info_nce_loss``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rayexperts.models.experts import MultiExpertNet
from rayexperts.models.output import ModelOutput


@dataclass
class MocoConfig:
    dim: int = 64  # projection (key) dimension
    hidden: int = 0  # hidden width of the projection MLP; 0: the feature dimension
    queue_size: int = 1024
    momentum: float = 0.999
    key_init: str = "copy"  # copy: the key encoder starts as the query encoder (MoCo); random: its own init (NCL's code)


def projection_head(in_dim: int, hidden: int, dim: int) -> nn.Sequential:
    """MoCo v2's MLP: Linear–ReLU–Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def _frozen_copy(module: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(module)
    frozen.requires_grad_(False)
    return frozen


def gather_from_ranks(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order (no gradient); ``x`` itself when not distributed.
    Every rank must pass the same shape (equal per-rank batches, as DistributedSampler gives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class MocoBranch(nn.Module):
    """Projection head, momentum key encoder + head, and the key queue of one expert.

    ``encoder`` maps an image to the expert's feature (``[B, feature_dim]``); it is not stored
    here (it belongs to the model) but passed to :meth:`keys`, which updates the momentum copy
    from it. The momentum parameters never require gradients.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, cfg: MocoConfig,
                 key_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.momentum = cfg.momentum
        self.proj = projection_head(feature_dim, cfg.hidden or feature_dim, cfg.dim)
        if key_encoder is None:  # MoCo: the key side starts as a copy of the query side
            self.key_encoder, self.key_proj = _frozen_copy(encoder), _frozen_copy(self.proj)
        else:  # built anew with its own random initialisation (NCL's code)
            self.key_encoder = _frozen_copy(key_encoder)
            self.key_proj = _frozen_copy(projection_head(feature_dim, cfg.hidden or feature_dim, cfg.dim))
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query(self, features: Tensor) -> Tensor:
        """``normalize(proj(v))`` of the query view's features."""
        return F.normalize(self.proj(features), dim=1)

    @torch.no_grad()
    def momentum_update(self, encoder: nn.Module) -> None:
        """``θ_k ← m θ_k + (1 − m) θ_q`` for the key encoder and the key projection head."""
        m = self.momentum
        keys = chain(self.key_encoder.parameters(), self.key_proj.parameters())
        queries = chain(encoder.parameters(), self.proj.parameters())
        for k, q in zip(keys, queries, strict=True):
            k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def keys(self, encoder: nn.Module, x_key: Tensor) -> Tensor:
        """Momentum-update from ``encoder``, then ``normalize(key_proj(key_encoder(x_key)))``."""
        self.momentum_update(encoder)
        return F.normalize(self.key_proj(self.key_encoder(x_key)), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Gather ``keys`` from all ranks, then overwrite the oldest queue entries (FIFO, wrapping)."""
        keys = gather_from_ranks(keys)
        size = self.queue.shape[0]
        keys = keys[-size:]  # more keys than slots: only the newest survive anyway
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)


@dataclass
class ContrastiveOutput(ModelOutput):
    """A :class:`ModelOutput` plus, per expert, the MoCo query, key and queue of this forward pass."""

    queries: Optional[list[Tensor]] = None  # l2-normalised projections of the query view
    keys: Optional[list[Tensor]] = None  # l2-normalised momentum-encoder keys of the key view
    queues: Optional[list[Tensor]] = None  # each expert's queue *before* this batch's keys


class MocoExperts(nn.Module):
    """``net`` with one :class:`MocoBranch` per expert.

    With ``cfg.key_init="random"`` each key encoder (and key projection head) starts from its own random
    initialisation, a network ``rebuild()`` builds anew, instead of a copy of the query side.

    ``forward(x, x_key=None)``: in training mode with ``x_key``, the output also holds per expert
    the query ``normalize(proj(v))`` of this pass, the key of ``x_key`` from the momentum encoder
    (updated first), and a snapshot of the queue before this batch's keys are enqueued; otherwise
    it is the plain output of ``net``.
    """

    def __init__(self, net: MultiExpertNet | nn.Module, cfg: MocoConfig,
                 rebuild: Callable[[], MultiExpertNet | nn.Module] | None = None) -> None:
        super().__init__()
        self.net = net
        if cfg.key_init == "random" and rebuild is None:
            raise ValueError("MoCo key_init='random' needs rebuild: a function that builds the network anew")
        fresh = rebuild() if cfg.key_init == "random" else None  # another draw of the same architecture
        self.branches = nn.ModuleList(
            MocoBranch(net.encoder(k), net.feature_dim, cfg, None if fresh is None else fresh.encoder(k))
            for k in range(net.num_experts))

    @property
    def heads(self) -> nn.ModuleList:
        return self.net.heads

    def forward(self, x: Tensor, x_key: Tensor | None = None) -> ContrastiveOutput:
        out = self.net(x)
        res = ContrastiveOutput(out.features, out.logits, out.aux)
        if self.training and x_key is not None:
            res.queries = [branch.query(v) for branch, v in zip(self.branches, out.features)]
            res.keys = [branch.keys(self.net.encoder(k), x_key) for k, branch in enumerate(self.branches)]
            res.queues = [branch.queue.detach().clone() for branch in self.branches]
            for branch, keys in zip(self.branches, res.keys):
                branch.enqueue(keys)
        return res
