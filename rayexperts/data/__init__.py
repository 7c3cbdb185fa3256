"""Long-tailed data: data sets by name, imbalance profiles, samplers, transforms.

Names are imported on first use (PEP 562), so ``python -m rayexperts.data`` can reject a
bad config key before it pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "SAMPLER_KINDS",
    "ArraySource",
    "DataError",
    "EpochSampler",
    "FileSource",
    "ImageSource",
    "LTDataset",
    "ParquetSource",
    "TransformedDataset",
    "TwoView",
    "build_dataset",
    "build_transform",
    "counts_from_labels",
    "exponential_counts",
    "moco_transform",
    "profile_counts",
    "select_first_n",
    "shot_group",
    "step_counts",
]
# Searched in this order on first use of a name (the cheap modules first).
_MODULES = ("errors", "imbalance", "samplers", "sources", "lt_dataset", "augment.recipes", "augment.per_image",
            "datasets")

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
    from rayexperts.data.augment.per_image import TransformedDataset, TwoView, build_transform, moco_transform
    from rayexperts.data.augment.recipes import AUGMENTS


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            found = importlib.import_module(f"rayexperts.data.{module}")
            if hasattr(found, name):
                globals()[name] = value = getattr(found, name)
                return value
    raise AttributeError(f"module 'rayexperts.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
