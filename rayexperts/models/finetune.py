"""Fine-tuning modes of a (pretrained) backbone, a model capability every method gets (``model.finetune``;
docs/pretrained.md "Fine-tuning modes"). Applied to the backbone part of a model (the shared trunk and the
experts' own stages) after building it, before the method's heads, which always train.

* ``full``: everything trains.
* ``linear``: the backbone is frozen (only the heads train).
* ``bias``: only the backbone's biases train (BitFit).
* ``lora``: the backbone is frozen; each target ``nn.Linear`` ``W`` becomes ``W x + (alpha / r) B A x`` with
  ``A`` ∈ R^{r×in} (Kaiming-uniform) and ``B`` ∈ R^{out×r} = 0 (Hu et al. 2021), so step 0 is the plain model.
* ``adaptformer``: the backbone is frozen; each transformer block's MLP gets a parallel bottleneck adapter,
  ``mlp(h) + s · up(relu(down(h)))`` on the MLP's input ``h``, with ``up`` = 0 (Chen et al. 2022, AdaptFormer's
  parallel form), so step 0 is the plain model.

With ``sets = K > 1`` (``model.expert_part=adapter``, docs/pretrained.md "Multi-expert methods on one trunk") every
adapted layer holds K independent adapters, one per expert, stacked along a first dimension: the trunk sees the
batch K times (``[K·B, ...]``, expert k's copy at rows ``k·B .. (k+1)·B − 1``) and chunk k goes through adapter k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rayexperts.errors import ConfigError

MODES = ("full", "linear", "bias", "lora", "adaptformer")
ADAPTER_MARK = ("lora_", "adapter.")  # names of the parameters this module adds (they are never pretrained)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · x Aᵀ Bᵀ``; ``base`` frozen, ``B`` starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA code does

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


class MultiLoRALinear(nn.Module):
    """K LoRA updates on one frozen ``base``: chunk k of the input's batch (``[K·B, ..., in]``) gets
    ``base(x) + (alpha / rank) · x A_kᵀ B_kᵀ``; each ``A_k`` drawn as :class:`LoRALinear` draws it, ``B_k = 0``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, sets: int) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(sets, rank, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(sets, base.out_features, rank, **kw))
        for a in self.lora_a.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        xs = x.reshape(self.lora_a.shape[0], -1, x.shape[-1])  # [K, B·..., in]
        delta = xs @ self.lora_a.transpose(1, 2) @ self.lora_b.transpose(1, 2)
        return self.base(x) + delta.reshape(*x.shape[:-1], -1) * self.scale


class Adapter(nn.Module):
    """AdaptFormer's bottleneck: ``scale · up(relu(down(x)))``, ``up`` zero-initialised."""

    def __init__(self, dim: int, width: int, scale: float) -> None:
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(dim, width), nn.Linear(width, dim), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


class MultiAdapter(nn.Module):
    """K :class:`Adapter` bottlenecks stacked: chunk k of the input's batch (``[K·B, ..., dim]``) gets
    ``scale · up_k(relu(down_k(x)))``; each ``down_k`` drawn as :class:`Adapter` draws it, ``up_k = 0``."""

    def __init__(self, dim: int, width: int, scale: float, sets: int) -> None:
        super().__init__()
        self.scale = scale
        self.down_weight = nn.Parameter(torch.empty(sets, width, dim))
        self.down_bias = nn.Parameter(torch.zeros(sets, 1, width))
        self.up_weight = nn.Parameter(torch.zeros(sets, dim, width))
        self.up_bias = nn.Parameter(torch.zeros(sets, 1, dim))
        for w in self.down_weight.data:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        xs = x.reshape(self.down_weight.shape[0], -1, x.shape[-1])  # [K, B·..., dim]
        h = torch.relu(xs @ self.down_weight.transpose(1, 2) + self.down_bias)
        return ((h @ self.up_weight.transpose(1, 2) + self.up_bias) * self.scale).reshape(x.shape)


class MlpWithAdapter(nn.Module):
    """A transformer block's MLP with a parallel :class:`Adapter` on its input."""

    def __init__(self, mlp: nn.Module, dim: int, width: int, scale: float, sets: int = 1) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = Adapter(dim, width, scale) if sets == 1 else MultiAdapter(dim, width, scale, sets)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x) + self.adapter(x)


def apply_finetune(parts: Sequence[nn.Module], mode: str, *, lora_rank: int = 8, lora_alpha: float = 8.0,
                   lora_targets: Iterable[str] = ("qkv", "proj"), adapter_width: int = 64,
                   adapter_scale: float = 0.1, sets: int = 1) -> int:
    """Apply fine-tuning ``mode`` to the backbone ``parts`` in place; returns the number of layers adapted
    (0 for full, linear and bias). ``sets`` > 1: K adapters per layer, one per expert (lora and adaptformer only).
    A mode that finds nothing to adapt is a :class:`ConfigError`."""
    if mode not in MODES:
        raise ConfigError(f"unknown model.finetune={mode!r} (choose one of {', '.join(MODES)})")
    if mode == "full":
        return 0
    for part in parts:
        for name, p in part.named_parameters():
            p.requires_grad_(mode == "bias" and name.rsplit(".", 1)[-1] == "bias")
    if mode in ("linear", "bias"):
        if sets != 1:
            raise ConfigError(f"model.finetune={mode} has no adapters to give each expert: use lora or adaptformer")
        return 0
    adapted = 0
    targets = tuple(str(t) for t in lora_targets)
    for part in parts:
        if mode == "lora":
            adapted += _add_lora(part, targets, int(lora_rank), float(lora_alpha), sets)
        else:
            adapted += _add_adapters(part, int(adapter_width), float(adapter_scale), sets)
    if adapted == 0:
        what = (f"no nn.Linear named by model.lora_targets={list(targets)}" if mode == "lora"
                else "no transformer block with an `mlp` (AdaptFormer adapts ViT-style blocks)")
        raise ConfigError(f"model.finetune={mode}: the backbone has {what}")
    return adapted


def finetune_options(model_cfg: Any) -> dict[str, Any]:
    """``model.finetune`` and its sizes as :func:`~rayexperts.models.finetune.apply_finetune`'s arguments."""
    get = model_cfg.get
    return {"mode": str(get("finetune", "full")), "lora_rank": int(get("lora_rank", 8)),
            "lora_alpha": float(get("lora_alpha", 8.0)), "lora_targets": list(get("lora_targets", ["qkv", "proj"])),
            "adapter_width": int(get("adapter_width", 64)), "adapter_scale": float(get("adapter_scale", 0.1))}


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _add_lora(part: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, sets: int = 1) -> int:
    found = [(name, m) for name, m in part.named_modules() if isinstance(m, nn.Linear) and _matches(name, targets)]
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        lora = LoRALinear(linear, rank, alpha) if sets == 1 else MultiLoRALinear(linear, rank, alpha, sets)
        setattr(part.get_submodule(parent) if parent else part, child, lora)
    return len(found)


def _add_adapters(part: nn.Module, width: int, scale: float, sets: int = 1) -> int:
    blocks = [m for m in part.modules() if isinstance(getattr(m, "mlp", None), nn.Module)
              and not isinstance(m.mlp, MlpWithAdapter)]
    for block in blocks:
        fc1 = next((m for m in block.mlp.modules() if isinstance(m, nn.Linear)), None)
        if fc1 is None:
            continue
        block.mlp = MlpWithAdapter(block.mlp, fc1.in_features, width, scale, sets)
    return sum(isinstance(getattr(b, "mlp", None), MlpWithAdapter) for b in blocks)


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` belongs to an adapter this module added (never pretrained)."""
    return any(mark in name for mark in ADAPTER_MARK)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def optimizer_groups(model: nn.Module, backbone_lr_scale: float = 1.0) -> list[dict]:
    """The trainable parameters as optimizer groups (frozen ones are left out, so neither the optimizer nor its
    weight decay sees them): the pretrained backbone's with ``lr_scale = backbone_lr_scale`` (read by
    ``engine.schedule.set_lr``), everything else (heads, adapters, fresh layers) at ``lr_scale = 1``."""
    pretrained: set[int] = set()
    for m in model.modules():
        pretrained |= {id(p) for p in getattr(m, "pretrained_parameters", list)()}
    params = [p for p in model.parameters() if p.requires_grad]
    backbone = [p for p in params if id(p) in pretrained]
    rest = [p for p in params if id(p) not in pretrained]
    if not backbone or backbone_lr_scale == 1.0:
        return [{"params": params, "lr_scale": 1.0}]
    return [g for g in ({"params": backbone, "lr_scale": float(backbone_lr_scale)},
                        {"params": rest, "lr_scale": 1.0}) if g["params"]]


__all__ = ["MODES", "Adapter", "LoRALinear", "MlpWithAdapter", "MultiAdapter", "MultiLoRALinear", "apply_finetune",
           "finetune_options", "is_adapter", "optimizer_groups", "parameter_counts"]
