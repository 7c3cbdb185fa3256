"""``parquet``: an image-bytes column + an integer label column + a split column
(``train`` / ``val`` / ``test``; ``validation`` is read as ``val``), names set by
``data.image_column`` / ``data.label_column`` / ``data.split_column``.

Images stay encoded in memory and are decoded lazily. ``image_kind`` is ``cifar`` when
the first training image is 32x32, else ``imagenet``. Without ``test`` rows the ``val``
rows are the test split (as iNaturalist); ``data.val_per_class`` applies only when the
file has no ``val`` rows. The LT profile (``data.imbalance_*``) applies to ``train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayexperts.data.errors import DataError
from rayexperts.data.lt_dataset import DataSetEntry, LTDataset, check_labels, long_tail_split, make_dataset
from rayexperts.data.sources import ParquetSource
from rayexperts.registry import DATASETS


def read_columns(path: Path, data_cfg, optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """``{"label": int64, "split": str, <optional present columns>}`` of a Parquet file whose
    image, label and split columns are checked to exist."""
    try:
        names = pq.read_schema(path).names
    except FileNotFoundError as e:
        raise DataError(f"Parquet file '{path}' (data.root) does not exist") from e
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"'{path}' (data.root) is not a readable Parquet file: {e}") from e
    required = [data_cfg.image_column, data_cfg.label_column, data_cfg.split_column]
    if missing := [c for c in required if c not in names]:
        raise DataError(
            f"Parquet file '{path}' has no column(s) {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, names))} (set data.image_column / data.label_column / data.split_column)"
        )
    present = [c for c in optional if c in names]
    table = pq.read_table(path, columns=[data_cfg.label_column, data_cfg.split_column, *present])
    label = table.column(data_cfg.label_column)
    if not pa.types.is_integer(label.type) or label.null_count:
        raise DataError(
            f"column '{data_cfg.label_column}' of '{path}' must hold integer class ids without nulls, "
            f"found type {label.type} with {label.null_count} nulls"
        )
    split = table.column(data_cfg.split_column).to_pandas().astype(str).to_numpy()
    out = {"label": label.to_numpy().astype(np.int64), "split": np.where(split == "validation", "val", split)}
    out.update({c: table.column(c).to_pandas().to_numpy() for c in present})
    return out


def class_names_from(labels: np.ndarray, names: np.ndarray | None, num_classes: int) -> list[str]:
    """Class ``c``'s name: the first name given in a row labelled ``c``, else ``str(c)``."""
    if names is None:
        return [str(c) for c in range(num_classes)]
    first = {}
    for label, name in zip(labels.tolist(), names.tolist()):
        first.setdefault(label, name)
    return [str(first.get(c, c)) for c in range(num_classes)]


def image_column(path: Path, column: str) -> pa.Array:
    """The encoded images as one binary array (a ``{bytes, path}`` struct column gives its bytes)."""
    images = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    if pa.types.is_struct(images.type) and images.type.get_field_index("bytes") >= 0:
        images = images.field("bytes")
    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
        raise DataError(f"column '{column}' of '{path}' must hold encoded image bytes, found type {images.type}")
    return images


def build_parquet(data_cfg) -> LTDataset:
    if not data_cfg.root:
        raise DataError("parquet: data.root is not set: pass data.root=<file>.parquet")
    path = Path(data_cfg.root).expanduser()
    cols = read_columns(path, data_cfg, optional=("class_name",))
    labels, split = cols["label"], cols["split"]
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if not len(rows["train"]) or not (len(rows["val"]) or len(rows["test"])):
        raise DataError(
            f"'{path}': column '{data_cfg.split_column}' needs 'train' rows and 'test' or 'val' rows, "
            f"found {', '.join(sorted(set(split.tolist())))}"
        )
    num_classes = int(labels[rows["train"]].max()) + 1  # the train rows define the classes
    check_labels(labels, num_classes, f"column '{data_cfg.label_column}' of '{path}' (position = row)")
    class_names = class_names_from(labels, cols.get("class_name"), num_classes)
    where = f"the train rows of '{path}'"
    train, val = long_tail_split(labels[rows["train"]], class_names, data_cfg, where, hold_out_val=not len(rows["val"]))
    rows["train"], carved = rows["train"][train], rows["train"][val]
    if not len(rows["test"]):
        rows["test"], rows["val"] = rows["val"], carved
    elif not len(rows["val"]):
        rows["val"] = carved
    images = image_column(path, data_cfg.image_column)

    def source(r: np.ndarray) -> ParquetSource:
        return ParquetSource(path, images.take(pa.array(r)), r, labels[r], data_cfg.image_column)

    train_src = source(rows["train"])
    kind = "cifar" if train_src[0][0].size == (32, 32) else "imagenet"
    val_src = source(rows["val"]) if len(rows["val"]) else None
    return make_dataset("parquet", class_names, train_src, source(rows["test"]), val_src, kind)


# A generic Parquet image set; the defaults suit small (32x32) images, as CIFAR exports.
DEFAULTS = {
    "data.image_size": 32, "data.imbalance_type": "none", "data.augment": "standard",
    "model.backbone": "resnet32",
    "train.epochs": 200, "train.batch_size": 128, "train.lr": 0.1, "train.weight_decay": 5e-4,
    "train.schedule": "multistep", "train.milestones": [160, 180], "train.warmup_epochs": 5,
}
DATASETS.register("parquet", DataSetEntry(build_parquet, DEFAULTS))
