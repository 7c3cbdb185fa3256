"""What a model is made of: parameters per part and multiply-accumulates per image.

Parts follow the multi-expert layout: ``trunk`` (shared stem and stages), ``expert<k>`` (expert k's
own stages, or its whole network), ``neck<k>`` (a projection before the classifier), ``head<k>``,
extra heads (``<name>_head<k>``) and MoCo branches (``moco<k>``: its projection head is trained, its
momentum copies are frozen). Multiply-accumulates count convolutions and linear layers of one
inference forward pass (``torch.utils.flop_counter``; MACs = FLOPs / 2).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

_PARTS = {"trunk": "trunk", "experts": "expert", "necks": "neck", "heads": "head", "branches": "moco"}


def part_of(name: str, aux: str = "aux") -> str:
    """The part a parameter (by its qualified name) belongs to."""
    tokens = name.split(".")
    for i, token in enumerate(tokens):
        if token == "trunk":
            return "trunk"
        if token in _PARTS or token == "aux_heads":
            index = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1].isdigit() else ""
            return f"{aux}_head{index}" if token == "aux_heads" else f"{_PARTS[token]}{index}"
    return "other"


def parameter_table(model: nn.Module) -> pd.DataFrame:
    """One row per part, in order of appearance: ``part``, ``trainable``, ``frozen`` parameter counts."""
    aux = next((m.aux_name for m in model.modules() if hasattr(m, "aux_name")), "aux")
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        counts = rows.setdefault(part_of(name, aux), [0, 0])
        counts[0 if p.requires_grad else 1] += p.numel()
    return pd.DataFrame([{"part": k, "trainable": v[0], "frozen": v[1]} for k, v in rows.items()])


def macs_per_image(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of one image (eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return counter.get_total_flops() // 2


def summary_text(model: nn.Module, input_shape: tuple[int, int, int], title: str) -> str:
    table = parameter_table(model)
    lines = [title, "", f"{'part':<16}{'parameters':>14}{'frozen':>12}"]
    lines += [f"{r.part:<16}{r.trainable:>14,}{r.frozen:>12,}" for r in table.itertuples()]
    total, trainable = int(table[["trainable", "frozen"]].to_numpy().sum()), int(table["trainable"].sum())
    macs = macs_per_image(model, input_shape)
    lines += ["", f"total parameters: {total}", f"trainable parameters: {trainable}",
              f"multiply-accumulates per image: {macs} ({macs / 1e6:.2f} M; one forward pass of a "
              f"{'x'.join(map(str, input_shape))} image, convolutions and linear layers)"]
    return "\n".join(lines)


def describe_model(cfg) -> str:
    """One line on the layout a config asks for."""
    m = cfg.model
    shape = "" if str(m.backbone).startswith("timm/") else f" (shortcut {m.shortcut})"
    tuning = "" if m.get("finetune", "full") == "full" else f", model.finetune={m.finetune}"
    text = f"method={cfg.method}, data.name={cfg.data.name}: {m.backbone}{shape}{tuning}, {m.num_experts} "
    text += "expert" + ("s" if m.num_experts > 1 else "")
    return text + f", {m.classifier} classifier" + (f" x{m.cosine_scale:g}" if m.classifier != "linear" else "")


__all__ = ["describe_model", "macs_per_image", "parameter_table", "part_of", "summary_text"]
