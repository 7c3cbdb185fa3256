"""``imagefolder``: ``root/train/<class>/*`` plus ``root/test/<class>/*`` and/or ``root/val/<class>/*``.

Classes are the sorted folder names under ``train``; images within a class are in file
name order (the source order for the LT profile ``data.imbalance_*``). ``test`` is the test
split (``val`` when there is no ``test``); ``val`` is the val split when both exist, else
``data.val_per_class`` images per class are held out of ``train``. ``image_kind`` is
``cifar`` when the first training image is 32x32, else ``imagenet``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayexperts.data.errors import DataError
from rayexperts.data.lt_dataset import DataSetEntry, LTDataset, long_tail_split, make_dataset
from rayexperts.data.sources import FileSource
from rayexperts.registry import DATASETS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _scan(root: Path, split: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise DataError(f"imagefolder: class folder '{class_dir}' has no counterpart in '{root / 'train'}'")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p.relative_to(root)) for p in files]
        labels += [index[class_dir.name]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def build_imagefolder(data_cfg) -> LTDataset:
    if not data_cfg.root:
        raise DataError("imagefolder: data.root is not set: pass data.root=<folder with train/ and test/ or val/>")
    root = Path(data_cfg.root).expanduser()
    if not (root / "train").is_dir():
        raise DataError(f"imagefolder: '{root / 'train'}' does not exist: data.root must hold train/<class>/*")
    held_out = [s for s in ("test", "val") if (root / s).is_dir()]
    if not held_out:
        raise DataError(f"imagefolder: neither '{root / 'test'}' nor '{root / 'val'}' exists")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagefolder: '{root / 'train'}' holds no class folders")
    paths, labels = _scan(root, "train", classes)
    train, val = long_tail_split(labels, classes, data_cfg, f"'{root / 'train'}'", hold_out_val=len(held_out) == 1)
    train_src = FileSource(root, [paths[i] for i in train], labels[train])
    test_src = FileSource(root, *_scan(root, held_out[0], classes))
    if len(held_out) == 2:
        val_src = FileSource(root, *_scan(root, "val", classes))
    else:
        val_src = FileSource(root, [paths[i] for i in val], labels[val]) if len(val) else None
    kind = "cifar" if train_src[0][0].size == (32, 32) else "imagenet"
    return make_dataset("imagefolder", classes, train_src, test_src, val_src, kind)


# A generic image folder: ImageNet-sized defaults (ResNet-50, 224 crops, cosine).
DEFAULTS = {
    "data.image_size": 224, "data.imbalance_type": "none", "data.augment": "standard", "data.num_workers": 4,
    "model.backbone": "resnet50", "model.shortcut": "B", "model.shared_stages": 2,
    "train.epochs": 90, "train.batch_size": 256, "train.lr": 0.1, "train.weight_decay": 5e-4, "train.schedule": "cosine",
}
DATASETS.register("imagefolder", DataSetEntry(build_imagefolder, DEFAULTS))
