"""``imagenet-lt``, ``places-lt``, ``inat2018``: published split files plus an image root.

Each split file holds lines ``relative/path label`` (paths relative to ``data.root``);
the training file fixes the per-class counts. A split-file key left empty
(``data.train_split`` / ``val_split`` / ``test_split``) means the published name under
``data.root``. iNaturalist 2018 has no test list: its val list is the test split, and it
has a val split only when ``data.val_split`` is given. Class names are the parent folder
of each class's first training image (a WordNet id for ImageNet-LT).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from rayexperts.data.errors import DataError
from rayexperts.data.lt_dataset import DataSetEntry, LTDataset, check_labels, make_dataset
from rayexperts.data.sources import FileSource
from rayexperts.registry import DATASETS

_LISTS = "github.com/zhmiao/OpenLongTailRecognition-OLTR or github.com/facebookresearch/classifier-balancing"
# name -> (published train / val / test list names, where to get the images)
PUBLISHED = {
    "imagenet-lt": (
        ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
        "ImageNet-2012 (image-net.org)",
    ),
    "places-lt": (
        ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
        "Places365-Standard (places2.csail.mit.edu)",
    ),
    "inat2018": (
        ("iNaturalist18_train.txt", None, "iNaturalist18_val.txt"),
        "iNaturalist 2018 (github.com/visipedia/inat_comp)",
    ),
}


def read_split_file(path: Path) -> tuple[list[str], np.ndarray]:
    """``(relative paths, int64 labels)`` of a ``path label`` list; a bad line names its number."""
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
            paths.append(parts[0].strip())
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"split file '{path}' lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def _locate(name: str, key: str, value: str | None, published: str | None, root: Path) -> Path | None:
    """The split file for ``data.<key>``: the given path (as is, or under ``root``), else the
    published name under ``root``; ``None`` when optional and absent."""
    if value:
        for candidate in (Path(value).expanduser(), root / value):
            if candidate.is_file():
                return candidate
        raise DataError(f"{name}: split file data.{key}='{value}' not found (also looked under data.root='{root}')")
    if published is None:
        return None
    path = root / published
    if path.is_file():
        return path
    if key == "val_split":
        return None
    raise DataError(
        f"{name}: split file '{path}' not found: put the published {published} (from {_LISTS}) under "
        f"data.root, or name it with data.{key}=..."
    )


def build_split_files(data_cfg, name: str) -> LTDataset:
    (train_name, val_name, test_name), images = PUBLISHED[name]
    if not data_cfg.root:
        raise DataError(f"{name}: data.root is not set: pass data.root=<folder of the {images} images>")
    root = Path(data_cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{name}: data.root='{root}' is not a directory; it must hold the {images} images")
    train_file = _locate(name, "train_split", data_cfg.train_split, train_name, root)
    test_file = _locate(name, "test_split", data_cfg.test_split, test_name, root)
    val_file = _locate(name, "val_split", data_cfg.val_split, val_name, root)
    train_paths, train_labels = read_split_file(train_file)
    if not (root / train_paths[0]).is_file():
        raise DataError(
            f"{name}: image '{root / train_paths[0]}' (first line of '{train_file}') does not exist: "
            f"data.root must be the folder the listed paths are relative to ({images})"
        )
    if train_labels.min() < 0:
        raise DataError(f"{name}: '{train_file}' lists a negative label {train_labels.min()}")
    num_classes = int(train_labels.max()) + 1
    first = {}
    for rel, label in zip(train_paths, train_labels.tolist()):
        first.setdefault(label, Path(rel).parent.name or str(label))
    class_names = [first.get(c, str(c)) for c in range(num_classes)]

    def source(path: Path) -> FileSource:
        paths, labels = read_split_file(path)
        check_labels(labels, num_classes, f"'{path}' ({name}; the classes of '{train_file}')",
                     lambda i: f"of '{paths[i]}'")
        return FileSource(root, paths, labels)

    train = FileSource(root, train_paths, train_labels)
    return make_dataset(name, class_names, train, source(test_file), source(val_file) if val_file else None, "imagenet")


# ImageNet-LT (published split files): ResNet-50, RandomResizedCrop 224 + flip, cosine.
IMAGENET_LT = {
    "data.image_size": 224, "data.imbalance_type": "none", "data.augment": "standard", "data.num_workers": 8,
    "data.test_batch_size": 256, "model.backbone": "resnet50", "model.shortcut": "B", "model.shared_stages": 2,
    "train.epochs": 90, "train.batch_size": 256, "train.lr": 0.1, "train.weight_decay": 5e-4,
    "train.schedule": "cosine", "train.warmup_epochs": 0,
}
# Places-LT: ImageNet-pretrained ResNet-152 (set model.weights to a local file).
PLACES_LT = {
    "data.image_size": 224, "data.imbalance_type": "none", "data.augment": "standard", "data.num_workers": 8,
    "data.test_batch_size": 256, "model.backbone": "resnet152", "model.shortcut": "B", "model.shared_stages": 2,
    "train.epochs": 30, "train.batch_size": 128, "train.lr": 0.01, "train.weight_decay": 5e-4,
    "train.schedule": "cosine", "train.warmup_epochs": 0,
}
# iNaturalist 2018: ResNet-50, cosine.
INAT2018 = {
    "data.image_size": 224, "data.imbalance_type": "none", "data.augment": "standard", "data.num_workers": 8,
    "data.test_batch_size": 256, "model.backbone": "resnet50", "model.shortcut": "B", "model.shared_stages": 2,
    "train.epochs": 200, "train.batch_size": 256, "train.lr": 0.1, "train.weight_decay": 1e-4,
    "train.schedule": "cosine", "train.warmup_epochs": 0,
}
for _name, _defaults, _classes in (("imagenet-lt", IMAGENET_LT, 1000), ("places-lt", PLACES_LT, 365),
                                   ("inat2018", INAT2018, 8142)):
    DATASETS.register(_name, DataSetEntry(partial(build_split_files, name=_name), _defaults, _classes))
