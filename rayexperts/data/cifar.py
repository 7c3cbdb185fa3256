"""``cifar10-lt`` / ``cifar100-lt`` from the official python pickles or a Parquet file.

Both give the same thing: uint8 images ``[N, 3, 32, 32]`` in memory, class ``i`` of the
training split keeping its first ``n_i`` images (docs/methods.md, long-tailed CIFAR), the
test split balanced, and an optional balanced val split of ``data.val_per_class``
images per class taken from the training images the LT subset leaves unused.
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rayexperts.data.errors import DataError
from rayexperts.data.lt_dataset import DataSetEntry, LTDataset, check_labels, long_tail_split, make_dataset
from rayexperts.data.parquet import class_names_from, read_columns
from rayexperts.data.sources import ArraySource, decode_image
from rayexperts.registry import DATASETS


class _Layout(NamedTuple):
    """Where the official python-pickle archive keeps things."""

    num_classes: int
    folder: str
    train_files: list[str]
    test_file: str
    label_key: str
    meta_file: str
    names_key: str


_LAYOUT = {
    "cifar10-lt": _Layout(
        10,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100-lt": _Layout(100, "cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names"),
}
_GET = "https://www.cs.toronto.edu/~kriz/cifar.html"
# CIFAR-LT (Cao et al. 2019 protocol): ResNet-32, pad-4 crop + flip, 200 epochs, lr 0.1,
# x0.1 at 160 and 180, 5 warm-up epochs (the schedule MLLT, LDAM and RIDE share).
DEFAULTS = {
    "data.image_size": 32, "data.imbalance_factor": 100, "data.augment": "standard",
    "model.backbone": "resnet32",
    "train.epochs": 200, "train.batch_size": 128, "train.lr": 0.1, "train.weight_decay": 5e-4,
    "train.schedule": "multistep", "train.milestones": [160, 180], "train.warmup_epochs": 5,
}


def build_cifar(data_cfg, name: str) -> LTDataset:
    """``data.root``: a Parquet file, the pickle folder, or its parent (``data.download=true``
    fetches the pickles there, by default into ``~/.cache/rayexperts/<name>``)."""
    layout = _LAYOUT[name]
    folder = layout.folder
    if not data_cfg.root and not data_cfg.download:
        raise DataError(
            f"{name}: data.root is not set: pass data.root=<dir>/{folder} (from {_GET}), a Parquet file "
            "with columns split, label and image (JPEG or PNG bytes), or data.download=true"
        )
    root = Path(data_cfg.root or Path.home() / ".cache" / "rayexperts" / name).expanduser()
    if root.is_file() or root.suffix == ".parquet":
        return _from_parquet(root, name, layout.num_classes, data_cfg)
    pickle_dir = next((d for d in (root, root / folder) if (d / layout.test_file).is_file()), None)
    if pickle_dir is None:
        if not data_cfg.download:
            raise DataError(
                f"{name}: data.root='{root}' is neither the {folder} folder, its parent, nor a Parquet "
                f"file: download it from {_GET} (or set data.download=true)"
            )
        _download(root, name)
        pickle_dir = root / folder
    return _from_pickles(pickle_dir, name, data_cfg)


def _download(root: Path, name: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    try:
        (CIFAR10 if name == "cifar10-lt" else CIFAR100)(str(root), train=True, download=True)
    except Exception as e:  # network or disk: report, don't trace
        raise DataError(f"{name}: download to '{root}' failed ({e}); fetch the python version from {_GET}") from e


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError as e:
        raise DataError(f"CIFAR file '{path}' is missing: re-extract the archive from {_GET}") from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"CIFAR file '{path}' is corrupt ({e}): re-extract the archive from {_GET}") from e


def _from_pickles(folder: Path, name: str, data_cfg) -> LTDataset:
    layout = _LAYOUT[name]

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_unpickle(folder / f) for f in files]
        images = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
        return images, np.concatenate([np.asarray(p[layout.label_key], dtype=np.int64) for p in parts])

    class_names = [str(n) for n in _unpickle(folder / layout.meta_file)[layout.names_key]][: layout.num_classes]
    train_x, train_y = read(layout.train_files)
    test_x, test_y = read([layout.test_file])
    train, val = long_tail_split(train_y, class_names, data_cfg, f"the training files of '{folder}'")
    origin = str(folder)
    return make_dataset(
        name,
        class_names,
        ArraySource(train_x[train], train_y[train], origin),
        ArraySource(test_x, test_y, origin),
        ArraySource(train_x[val], train_y[val], origin) if len(val) else None,
        "cifar",
    )


def _from_parquet(path: Path, name: str, num_classes: int, data_cfg) -> LTDataset:
    """Rows with ``split`` train/test; ``index_in_class`` (if present) fixes the source order
    within a class, ``class_name`` (if present) names the classes. Only the rows kept are decoded."""
    cols = read_columns(path, data_cfg, optional=("index_in_class", "class_name"))
    labels, split = cols["label"], cols["split"]
    where = f"column '{data_cfg.label_column}' of '{path}' (position = row)"
    check_labels(labels, num_classes, where)
    train_rows, test_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if not len(train_rows) or not len(test_rows):
        raise DataError(
            f"'{path}': column '{data_cfg.split_column}' needs 'train' and 'test' rows, found {sorted(set(split))}"
        )
    if "index_in_class" in cols:
        train_rows = train_rows[np.argsort(cols["index_in_class"][train_rows], kind="stable")]
    class_names = class_names_from(labels, cols.get("class_name"), num_classes)
    train, val = long_tail_split(labels[train_rows], class_names, data_cfg, where)
    train, val = np.sort(train_rows[train]), np.sort(train_rows[val])
    images = decode_rows(path, data_cfg.image_column, np.concatenate([train, val, test_rows]))
    parts = np.split(images, [len(train), len(train) + len(val)])
    origin = str(path)
    return make_dataset(
        name,
        class_names,
        ArraySource(parts[0], labels[train], origin),
        ArraySource(parts[2], labels[test_rows], origin),
        ArraySource(parts[1], labels[val], origin) if len(val) else None,
        "cifar",
    )


def decode_rows(path: Path, column: str, rows: np.ndarray) -> np.ndarray:
    """Decode the 32x32 images of ``rows`` to uint8 ``[N, 3, 32, 32]``: one batched
    libjpeg call (``torchvision.io.decode_jpeg``, ~3x faster than PIL here); if that fails
    (a PNG, a corrupt file) each row is decoded with PIL and the bad one is named."""
    import pyarrow.parquet as pq
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = pq.read_table(path, columns=[column]).column(column).take(rows).to_pylist()
    try:
        decoded = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data], mode=ImageReadMode.RGB)
    except (RuntimeError, TypeError, ValueError):
        decoded = [
            torch.from_numpy(np.array(decode_image(b, f"row {r} (column '{column}') of '{path}'"))).permute(2, 0, 1)
            if b is not None
            else None
            for b, r in zip(data, rows)
        ]
    for img, r in zip(decoded, rows):
        if img is None or tuple(img.shape) != (3, 32, 32):
            found = "no image (null)" if img is None else f"size {tuple(img.shape[1:])}"
            raise DataError(f"row {r} (column '{column}') of '{path}': CIFAR images are 32x32, found {found}")
    return torch.stack(decoded).numpy()


for _name in _LAYOUT:
    DATASETS.register(_name, DataSetEntry(partial(build_cifar, name=_name), DEFAULTS, _LAYOUT[_name].num_classes))
