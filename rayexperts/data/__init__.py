"""Long-tailed data: data sets by name, imbalance profiles, samplers, transforms.

Names are imported on first use (PEP 562), so ``python -m rayexperts.data`` can reject a
bad config key before it pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "datasets": ("DATASETS", "build_dataset"),
    "errors": ("DataError",),
    "imbalance": (
        "counts_from_labels",
        "exponential_counts",
        "profile_counts",
        "select_first_n",
        "shot_group",
        "step_counts",
    ),
    "lt_dataset": ("LTDataset",),
    "samplers": ("SAMPLER_KINDS", "EpochSampler"),
    "sources": ("ArraySource", "FileSource", "ImageSource", "ParquetSource"),
    "transforms": ("AUGMENTS", "TransformedDataset", "TwoView", "build_transform", "moco_transform"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from rayexperts.data.datasets import DATASETS, build_dataset
    from rayexperts.data.errors import DataError
    from rayexperts.data.imbalance import (
        counts_from_labels,
        exponential_counts,
        profile_counts,
        select_first_n,
        shot_group,
        step_counts,
    )
    from rayexperts.data.lt_dataset import LTDataset
    from rayexperts.data.samplers import SAMPLER_KINDS, EpochSampler
    from rayexperts.data.sources import ArraySource, FileSource, ImageSource, ParquetSource
    from rayexperts.data.transforms import AUGMENTS, TransformedDataset, TwoView, build_transform, moco_transform


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'rayexperts.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rayexperts.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
