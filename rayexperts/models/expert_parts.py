"""K experts on one pretrained timm trunk (``model.expert_part``; docs/pretrained.md "Multi-expert methods on one
trunk"). A model capability: :class:`~rayexperts.models.experts.MultiExpertNet` calls :func:`split_trunk` for a
timm backbone with K > 1 experts, whatever the method; the methods' losses see K feature/logit pairs as before.

* ``head``: the trunk is shared as it is (``model.finetune`` applies to it); the experts are K heads on its feature.
* ``adapter``: the trunk is frozen and holds K sets of ``model.finetune=lora|adaptformer`` adapters
  (:class:`~rayexperts.models.finetune.MultiLoRALinear`, :class:`~rayexperts.models.finetune.MultiAdapter`); it
  runs once on the batch repeated K times (:class:`RepeatBatch`), expert k takes chunk k (:class:`BatchChunk`).
  Zero-initialised adapters: at step 0 every expert's feature is the pretrained model's. With BatchNorm in the
  trunk, training-mode batch statistics are taken over the K copies together.
* ``blocks``: the trunk is the model without its last ``model.expert_blocks`` transformer blocks and final norm
  (``model.finetune`` applies to it); each expert is a trained copy of those blocks, the norm and the model's
  pooling head (:class:`LastBlocks`). At step 0 every expert's feature is the pretrained model's.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import Tensor, nn

from rayexperts.errors import ConfigError

PARTS = ("head", "adapter", "blocks")
_HEAD_MODULES = ("attn_pool", "fc_norm", "head_drop", "head")  # what a timm ViT's forward_head(pre_logits) uses


class RepeatBatch(nn.Module):
    """``module`` applied to the batch repeated ``copies`` times along dimension 0 (``[K·B, ...]``)."""

    def __init__(self, module: nn.Module, copies: int) -> None:
        super().__init__()
        self.module, self.copies = module, copies
        self.out_dim = getattr(module, "out_dim", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.repeat(self.copies, *([1] * (x.dim() - 1))))


class BatchChunk(nn.Module):
    """Chunk ``index`` of ``chunks`` equal chunks of dimension 0: expert k's rows of a :class:`RepeatBatch` output."""

    def __init__(self, index: int, chunks: int) -> None:
        super().__init__()
        self.index, self.chunks = index, chunks

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (self.chunks, -1))[self.index]

    def extra_repr(self) -> str:
        return f"{self.index} of {self.chunks}"


class LastBlocks(nn.Module):
    """Copies of a timm transformer's last ``n`` blocks, its final ``norm`` and its pooling head: tokens → the pooled
    pre-logits feature (``forward_head(pre_logits=True)`` of the model, run on a copy without its other parts)."""

    def __init__(self, net: nn.Module, n: int) -> None:
        super().__init__()
        self.blocks = copy.deepcopy(net.blocks[-n:])
        self.norm = copy.deepcopy(net.norm)
        self.pool = _head_shell(net)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool.forward_head(self.norm(self.blocks(x)), pre_logits=True)


def _head_shell(net: nn.Module) -> nn.Module:
    """An object of ``net``'s class holding copies of only its head modules (no parameters of its own), so that its
    ``forward_head`` runs with the model's own pooling options (``global_pool``, ``num_prefix_tokens``, ...)."""
    shell = copy.copy(net)  # a new object sharing the attribute values: replace every container of modules/tensors
    shell._modules = OrderedDict((k, copy.deepcopy(m)) for k, m in net._modules.items() if k in _HEAD_MODULES)
    shell._parameters, shell._buffers = OrderedDict(), OrderedDict()
    shell._non_persistent_buffers_set = set()
    for hooks in [k for k, v in vars(net).items() if k.endswith(("_hooks", "_pre_hooks")) and isinstance(v, dict)]:
        setattr(shell, hooks, OrderedDict())
    return shell


def last_blocks_check(net: nn.Module, n: int, name: str) -> int:
    """The number of blocks of timm model ``net`` if its last ``n`` can be split off (``expert_part=blocks``);
    otherwise a one-line :class:`ConfigError` naming the keys."""
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(net, "norm") or not hasattr(net, "forward_head"):
        raise ConfigError(f"model.expert_part=blocks: {name} is not a transformer with `blocks`, `norm` and "
                          "`forward_head` (a ViT-family timm model); use model.expert_part=head or adapter")
    if not 1 <= n < len(blocks):
        raise ConfigError(f"model.expert_blocks={n}: {name} has {len(blocks)} blocks; the trunk keeps at least one "
                          f"(choose 1 .. {len(blocks) - 1})")
    return len(blocks)


def split_trunk(backbone: nn.Module, part: str, num_experts: int, finetune_mode: str, *,
                expert_blocks: int = 1, name: str = "") -> tuple[nn.Module, nn.ModuleList, list[nn.Module], int]:
    """A timm backbone (``TimmBackbone``, weights loaded) → ``(trunk, experts, adapted, sets)``: the shared trunk,
    the K experts' parts (the trunk's output → expert k's feature), the parts ``model.finetune`` applies to (the
    trunk; for ``blocks`` not the experts, which train whole) and the adapter sets per layer it adds there (K for
    ``adapter``, else 1). The caller applies the fine-tuning mode (after building its heads)."""
    if part not in PARTS:
        raise ConfigError(f"unknown model.expert_part={part!r} (choose one of {', '.join(PARTS)})")
    if part == "head":
        return backbone, nn.ModuleList(nn.Identity() for _ in range(num_experts)), [backbone], 1
    if part == "adapter":
        if finetune_mode not in ("lora", "adaptformer"):
            raise ConfigError(f"model.expert_part=adapter with model.finetune={finetune_mode}: the experts' adapters "
                              "are LoRA or AdaptFormer ones; set model.finetune=lora or model.finetune=adaptformer")
        return (RepeatBatch(backbone, num_experts),
                nn.ModuleList(BatchChunk(k, num_experts) for k in range(num_experts)), [backbone], num_experts)
    net = backbone.net
    last_blocks_check(net, expert_blocks, name or type(net).__name__)
    experts = nn.ModuleList(LastBlocks(net, expert_blocks) for _ in range(num_experts))
    net.blocks = net.blocks[:-expert_blocks]
    net.norm = nn.Identity()
    for head in _HEAD_MODULES:  # the experts own the pooling head (fc_norm, attn_pool): none left unused in the trunk
        if isinstance(getattr(net, head, None), nn.Module):
            setattr(net, head, nn.Identity())
    backbone.tokens = True  # forward_features: tokens [B, T, D] before the experts' blocks
    return backbone, experts, [backbone], 1


__all__ = ["PARTS", "BatchChunk", "LastBlocks", "RepeatBatch", "last_blocks_check", "split_trunk"]
