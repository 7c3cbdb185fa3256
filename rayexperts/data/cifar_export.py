"""A CIFAR-10 Parquet file (``split``, ``label``, ``image``; optional ``index_in_class`` and
``class_name``) written back as the official python pickles, ``cifar-10-batches-py``
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``), so that code which reads
CIFAR-10 with ``torchvision.datasets.CIFAR10`` (e.g. an author's reference implementation) trains on
exactly the pixels this package trains on (docs/compare.md).

The images are decoded as :func:`rayexperts.data.cifar.decode_rows` decodes them for training. The row
order is the Parquet file's; within a class the images follow ``index_in_class`` where the file has it
(the order :mod:`rayexperts.data.cifar` reads), so a per-class selection by position (the first ``n_i``, or
LDAM-DRW's seeded shuffle, ``data.lt_subset=shuffled``) picks the same images from both.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from rayexperts.data.cifar import decode_rows
from rayexperts.data.errors import DataError
from rayexperts.data.parquet import class_names_from, read_columns

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
NUM_CLASSES = 10


def split_rows(labels: np.ndarray, split: np.ndarray, name: str, index_in_class: np.ndarray | None) -> np.ndarray:
    """Row numbers of split ``name`` in file order, except that within each class the rows are put in
    ``index_in_class`` order (each class keeps the positions its rows hold in the file)."""
    rows = np.flatnonzero(split == name)
    if index_in_class is None:
        return rows
    out = rows.copy()
    for c in np.unique(labels[rows]):
        slots = np.flatnonzero(labels[rows] == c)
        out[slots] = rows[slots][np.argsort(index_in_class[rows[slots]], kind="stable")]
    return out


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # as the official files: readable with encoding="latin1"


def export_cifar10(data_cfg, out_parent: Path) -> Path:
    """Write ``out_parent/cifar-10-batches-py`` from the Parquet file ``data_cfg.root`` (its column names
    from ``data_cfg``); returns the folder. All rows are written (the long-tail profile is the reader's
    job). The folder appears only once complete; an existing one is an error."""
    path = Path(str(data_cfg.root)).expanduser()
    out_parent = Path(out_parent).expanduser()
    folder = out_parent / FOLDER
    if folder.exists():
        raise DataError(f"'{folder}' already exists: remove it or choose another output folder")
    cols = read_columns(path, data_cfg, optional=("index_in_class", "class_name"))
    labels, split = cols["label"], cols["split"]
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"column '{data_cfg.label_column}' of '{path}': CIFAR-10 labels are 0-9, found {labels[bad[0]]} "
            f"in row {bad[0]}"
        )
    iic = cols.get("index_in_class")
    train = split_rows(labels, split, "train", iic)
    test = split_rows(labels, split, "test", iic)
    if not len(train) or not len(test):
        raise DataError(f"'{path}': column '{data_cfg.split_column}' needs 'train' and 'test' rows")
    names = class_names_from(labels, cols.get("class_name"), NUM_CLASSES)
    out_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=out_parent))
    tmp.chmod(0o755)
    try:
        parts = zip(TRAIN_FILES, np.array_split(train, 5))
        batches = [(f, r, f"training batch {i} of 5") for i, (f, r) in enumerate(parts, 1)]
        for file, rows, what in [*batches, ("test_batch", test, "testing batch 1 of 1")]:
            images = decode_rows(path, data_cfg.image_column, rows).reshape(len(rows), -1)  # R, G, B planes
            rank = iic[rows] if iic is not None else rows
            _dump(
                tmp / file,
                {
                    "batch_label": what,
                    "labels": labels[rows].tolist(),
                    "data": np.ascontiguousarray(images, dtype=np.uint8),
                    "filenames": [f"{names[y]}_{int(k):05d}.png" for y, k in zip(labels[rows], rank)],
                },
            )
        meta = {"label_names": names, "num_cases_per_batch": len(np.array_split(train, 5)[0]), "num_vis": 3072}
        _dump(tmp / "batches.meta", meta)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
