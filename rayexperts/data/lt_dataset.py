"""The long-tailed data set every builder returns, and the checks they all share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayexperts.data.errors import DataError
from rayexperts.data.imbalance import (
    counts_from_labels,
    profile_counts,
    shot_group,
    shuffled_rank_in_class,
    split_long_tail,
)
from rayexperts.data.sources import ImageSource


@dataclass
class LTDataset:
    """Train/test (and optional balanced val) splits of one long-tailed data set."""

    name: str
    num_classes: int
    class_names: list[str]
    train: ImageSource
    test: ImageSource
    val: ImageSource | None
    train_counts: np.ndarray  # [C] int64
    image_kind: str  # digits | cifar | imagenet

    @property
    def in_channels(self) -> int:
        return 1 if self.image_kind == "digits" else 3

    def shot_groups(self, many_threshold: int = 100, few_threshold: int = 20) -> np.ndarray:
        """Per class ``"many"`` / ``"medium"`` / ``"few"`` from the training counts."""
        return shot_group(self.train_counts, many_threshold, few_threshold)


@dataclass(frozen=True)
class DataSetEntry:
    """What a data set registers under its ``data.name`` (``rayexperts.registry.DATASETS``)."""

    build: Callable[[Any], LTDataset]  # data config (the ``data.*`` keys) -> the data set
    defaults: Mapping[str, Any] = field(default_factory=dict)  # dotted config keys it sets: a config layer
    num_classes: int | None = None  # known without reading the data (None: the data decide)
    in_channels: int = 3
    needs_root: bool = True  # data.root must name the data (unless data.download=true where offered)

    def check(self, data_cfg: Any, name: str) -> None:
        """What can be checked before anything starts, in one line (a DataError naming the key): a data set that
        needs ``data.root`` has one, a local ``data.root`` exists, and so do the split files it names."""
        from pathlib import Path

        root = data_cfg.root
        if root and "://" not in str(root) and not Path(str(root)).expanduser().exists():
            raise DataError(f"data.root={str(root)!r} does not exist (data set {name})")
        if self.needs_root and not root and not data_cfg.download:
            raise DataError(f"data set {name} needs data.root: a folder or file of its images "
                            f"(`python -m rayexperts.data describe {name} --help` says which)")
        for key in ("train_split", "val_split", "test_split"):
            value = data_cfg[key]
            if value and "://" not in str(value):
                here = Path(str(value)).expanduser()
                if not here.is_file() and not (root and (Path(str(root)).expanduser() / str(value)).is_file()):
                    raise DataError(f"data.{key}={str(value)!r} does not exist (also looked under data.root)")


def check_labels(labels: np.ndarray, num_classes: int, where: str,
                 item: Callable[[int], str] = "at position {}".format) -> None:
    """Every label must lie in ``[0, num_classes)``; the error names the value, the item (``item(i)``,
    e.g. its position or its file) and ``where``."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"label {labels[bad[0]]} {item(int(bad[0]))} of {where} is out of range: "
            f"labels must lie in 0..{num_classes - 1} for {num_classes} classes"
        )


def make_dataset(
    name: str,
    class_names: list[str],
    train: ImageSource,
    test: ImageSource,
    val: ImageSource | None,
    image_kind: str,
) -> LTDataset:
    """Check labels and class counts, then build the :class:`LTDataset`."""
    num_classes = len(class_names)
    for split, source in (("train", train), ("test", test), ("val", val)):
        if source is not None:
            check_labels(source.labels, num_classes, f"the {split} split of {name}")
    counts = counts_from_labels(train.labels, num_classes)
    if (empty := np.flatnonzero(counts == 0)).size:
        c = int(empty[0])
        raise DataError(
            f"{name}: class {c} ('{class_names[c]}') has 0 training images"
            + (f" ({len(empty)} such classes)" if len(empty) > 1 else "")
        )
    return LTDataset(name, num_classes, list(class_names), train, test, val, counts, image_kind)


def long_tail_split(
    labels: np.ndarray, class_names: list[str], data_cfg, where: str, hold_out_val: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a full training source after the ``data.imbalance_*`` profile,
    with ``data.val_per_class`` held out when ``hold_out_val`` (the data set has no val split
    of its own; see :func:`~rayexperts.data.imbalance.split_long_tail`). ``data.lt_subset=shuffled``
    keeps the images LDAM-DRW's code keeps (a seeded shuffle per class) instead of the first ``n_i``."""
    num_classes = len(class_names)
    check_labels(labels, num_classes, where)
    source = counts_from_labels(labels, num_classes)
    if (empty := np.flatnonzero(source == 0)).size:
        c = int(empty[0])
        raise DataError(f"class {c} ('{class_names[c]}') has 0 training images in {where}")
    target = profile_counts(source, data_cfg.imbalance_type, data_cfg.imbalance_factor, data_cfg.step_fraction)
    if (empty := np.flatnonzero(target == 0)).size:
        c = int(empty[0])
        raise DataError(
            f"class {c} ('{class_names[c]}') is left with 0 training images by "
            f"data.imbalance_type={data_cfg.imbalance_type} data.imbalance_factor={data_cfg.imbalance_factor} "
            f"(n_max={source.min()}): lower data.imbalance_factor"
        )
    rank = None
    if str(getattr(data_cfg, "lt_subset", "first")) == "shuffled":
        rank = shuffled_rank_in_class(labels, int(data_cfg.lt_subset_seed))
    return split_long_tail(labels, target, data_cfg.val_per_class if hold_out_val else 0, rank)
