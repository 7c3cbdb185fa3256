"""The data-set registry: ``build_dataset(cfg.data)`` by ``data.name`` (INTERFACES.md names)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

from rayexperts.data.cifar import build_cifar
from rayexperts.data.digits import build_digits
from rayexperts.data.errors import DataError
from rayexperts.data.folders import build_imagefolder
from rayexperts.data.lt_dataset import LTDataset
from rayexperts.data.parquet import build_parquet
from rayexperts.data.split_files import build_split_files

DATASETS: dict[str, Callable[..., LTDataset]] = {
    "digits-lt": build_digits,
    "cifar10-lt": partial(build_cifar, name="cifar10-lt"),
    "cifar100-lt": partial(build_cifar, name="cifar100-lt"),
    "imagenet-lt": partial(build_split_files, name="imagenet-lt"),
    "places-lt": partial(build_split_files, name="places-lt"),
    "inat2018": partial(build_split_files, name="inat2018"),
    "imagefolder": build_imagefolder,
    "parquet": build_parquet,
}


def build_dataset(data_cfg) -> LTDataset:
    """The :class:`LTDataset` named by ``data_cfg.name`` (``cfg.data``: the ``DataConfig`` keys)."""
    name = data_cfg.name
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=2, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(DATASETS)}"
        raise DataError(f"unknown data set data.name={name!r}: {hint}")
    return DATASETS[name](data_cfg)
