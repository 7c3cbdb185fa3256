"""Test-time ensembling (``eval.tta``): each held-out image seen as several views, the logits of every method view
averaged over them, reported as extra views ``<view>_<mode>`` (``expert0_fivecrop``) beside the plain ones
(docs/methods.md "LIFT", "Test-time crop ensembling").

* ``flip``: the plain test view and its mirror image (2 views);
* ``fivecrop``: the image's short side resized to ``data.image_size + eval.tta_expand`` (the test view's
  interpolation), then its 4 corner crops and centre crop of ``data.image_size`` (LIFT's code: trainer.py
  ``tte_mode=fivecrop``, ``expand`` 24: 248 → 224);
* ``tencrop``: those 5 crops and their mirror images (10 views).

Each view's logits (the method's views: ``expert0``, ``ensemble``, ``*_pc``, ...) are the mean over the image's
views of that view's logits, as LIFT's test loop averages its scaled cosine logits. Only the image itself is
used: nothing is learnt on the test set (not transductive). The views are evaluated at the last evaluation, on
every held-out split, never as the primary view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.methods.base import Method

TTA_VIEWS = {"flip": 2, "fivecrop": 5, "tencrop": 10}  # eval.tta → views per image


def tta_name(view: str, mode: str) -> str:
    """The name of ``view`` ensembled over ``mode``'s views: ``expert0_fivecrop``."""
    return f"{view}_{mode}"


def is_tta_view(name: str) -> bool:
    """Whether ``name`` is a test-time ensembled view (``<view>_<mode>``)."""
    return "_" in name and name.rsplit("_", 1)[1] in TTA_VIEWS


def tta_views(method: Method, mode: str) -> list[str]:
    """The view names ``eval.tta=mode`` adds for ``method`` (none for ``none``)."""
    return [tta_name(v, mode) for v in method.view_names()] if mode in TTA_VIEWS else []


class CropViews:
    """One image → ``[n, C, S, S]``: short side resized to ``size + expand``, then FiveCrop (``n = 5``: top-left,
    top-right, bottom-left, bottom-right, centre; torchvision's order) or TenCrop (``n = 10``: those, then the same
    of the mirror image), each crop normalised by ``normalise`` (the run's own test normalisation)."""

    def __init__(self, mode: str, size: int, expand: int, interpolation: str, normalise: Callable) -> None:
        from torchvision.transforms import v2

        if mode not in ("fivecrop", "tencrop"):
            raise ValueError(f"CropViews: mode {mode!r} is not fivecrop or tencrop")
        interp = getattr(v2.InterpolationMode, interpolation.upper())
        self.resize = v2.Resize(size + expand, interpolation=interp)
        self.crops = v2.FiveCrop(size) if mode == "fivecrop" else v2.TenCrop(size)
        self.normalise = normalise

    def __call__(self, image: Any) -> Tensor:
        return torch.stack([self.normalise(crop) for crop in self.crops(self.resize(image))])


def ensembled_logits(method: Method, model: nn.Module, views: Tensor,
                     memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, Tensor]:
    """Every method view's logits averaged over the image views ``views`` [B, n, C, H, W] (one forward pass per
    view index, in float32 as the plain evaluation)."""
    total: dict[str, Tensor] = {}
    n = views.shape[1]
    for k in range(n):
        with torch.autocast(views.device.type, enabled=False):
            logits, _, _ = method.predict(model, views[:, k].contiguous(memory_format=memory_format))
        for name, z in logits.items():
            total[name] = total[name] + z.float() if name in total else z.float()
    return {name: z / n for name, z in total.items()}


def evaluate_tta(method: Method, model: nn.Module, batches, mode: str, opts: Any, num_classes: int) -> EvalAccumulator:
    """The statistics of ``mode``'s ensembled views over ``batches`` (``(views [B, n, C, H, W], targets)``),
    summed over workers."""
    model.eval()
    names = method.view_names()
    acc = EvalAccumulator([tta_name(v, mode) for v in names], num_classes, opts.ece_bins, opts.device)
    with torch.no_grad():
        for views, targets in batches:
            views = views.to(opts.device, non_blocking=True)
            targets = targets.to(opts.device, non_blocking=True)
            logits = ensembled_logits(method, model, views, opts.memory_format)
            for name in names:
                acc.update(tta_name(name, mode), logits[name], targets)
    acc.all_reduce()
    return acc


def merge_views(into: EvalAccumulator, other: EvalAccumulator) -> None:
    """Add ``other``'s views (their per-class counts and confidence bins) to ``into``."""
    for view in other.views:
        if view in into.views:
            raise ValueError(f"view {view!r} is evaluated twice")
        into.views.append(view)
        into.correct[view], into.total[view], into.bins[view] = other.correct[view], other.total[view], other.bins[view]


def flip_batches(loader) -> Any:
    """The plain test batches as ``(views [B, 2, C, H, W], targets)``: each image and its mirror image."""
    for items in loader:
        x, y = items[0], items[-1]
        yield torch.stack([x, x.flip(-1)], dim=1), y


def crop_loader(source, mode: str, *, image_kind: str, image_size: int, expand: int, options: Any, rank: int,
                world: int, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This worker's share of ``source`` as ``(views [B, n, C, S, S], targets)`` batches of :class:`CropViews`, each
    crop normalised as the run's test view normalises (its ``options``; the crop is already ``image_size``)."""
    from rayexperts.data import TransformedDataset, build_transform

    normalise = build_transform(image_kind, "none", train=False, image_size=image_size,
                                options=replace(options, crop_pct=1.0))
    views = CropViews(mode, image_size, expand, options.interpolation, normalise)
    shard = Subset(TransformedDataset(source, views), range(rank, len(source), world))
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)


def add_tta_views(run: Any, accs: Mapping[str, EvalAccumulator], last: bool = True) -> list[str]:
    """The engine's hook (``eval.tta``): at the ``last`` evaluation, ``run``'s ensembled views on every held-out
    split, added to that split's accumulator in ``accs``; returns the names added (none for ``eval.tta=none``)."""
    cfg = run.cfg
    mode = str(cfg.eval.tta)
    if mode not in TTA_VIEWS or not last:
        return []
    sources = run.loaders.sources()
    for prefix, acc in accs.items():
        if mode == "flip":
            batches = flip_batches(run.eval_loaders[prefix])
        else:
            batches = crop_loader(sources[prefix], mode, image_kind=run.data.image_kind,
                                  image_size=int(cfg.data.image_size), expand=int(cfg.eval.tta_expand),
                                  options=run.loaders.augment_options(), rank=run.rank, world=run.world,
                                  batch_size=int(cfg.data.test_batch_size), num_workers=int(cfg.data.num_workers),
                                  pin_memory=run.device.type == "cuda")
        merge_views(acc, evaluate_tta(run.method, run.eval_model, batches, mode, run.opts, run.data.num_classes))
    return tta_views(run.method, mode)


__all__ = ["TTA_VIEWS", "CropViews", "add_tta_views", "crop_loader", "ensembled_logits", "evaluate_tta",
           "flip_batches", "is_tta_view", "merge_views", "tta_name", "tta_views"]
