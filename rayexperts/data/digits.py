"""``digits-lt``: scikit-learn's bundled 8x8 digits, long-tailed; no files needed."""

from __future__ import annotations

import numpy as np

from rayexperts.data.errors import DataError
from rayexperts.data.lt_dataset import DataSetEntry, LTDataset, long_tail_split, make_dataset
from rayexperts.data.sources import ArraySource
from rayexperts.registry import DATASETS

TEST_PER_CLASS = 30
# A laptop-sized default that runs offline (585 training images at IF 10).
DEFAULTS = {
    "data.image_size": 8, "data.imbalance_factor": 10, "data.augment": "standard", "data.val_per_class": 0,
    "model.backbone": "digitsnet",
    "train.epochs": 30, "train.batch_size": 64, "train.lr": 0.05, "train.weight_decay": 5e-4,
    "train.schedule": "cosine", "train.warmup_epochs": 0,
}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (``sklearn.datasets.load_digits``): pixels 0..16 ``[1797, 8, 8]`` and
    labels, read from the file scikit-learn ships without importing scikit-learn (seconds of start-up)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DataError(f"digits-lt: scikit-learn's digits file {path} is missing: pip install scikit-learn")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def build_digits(data_cfg) -> LTDataset:
    """Balanced test split of 30 images per class chosen with ``data.seed``; the LT train
    split (``data.imbalance_*``, ``n_max`` = the smallest remaining class) from the rest,
    in scikit-learn's order. Pixels 0..16 are scaled to uint8 0..255, shape ``[N, 1, 8, 8]``."""
    pixels, labels = load_digits()
    images = np.round(pixels * (255 / 16)).astype(np.uint8)[:, None]
    rng = np.random.default_rng(data_cfg.seed)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:TEST_PER_CLASS] for c in range(10)]))
    rest = np.setdiff1d(np.arange(len(labels)), test)
    class_names = [str(c) for c in range(10)]
    train, val = long_tail_split(labels[rest], class_names, data_cfg, "digits-lt")
    train, val = rest[train], rest[val]

    def source(idx: np.ndarray) -> ArraySource:
        return ArraySource(images[idx], labels[idx], "scikit-learn digits")

    return make_dataset(
        "digits-lt", class_names, source(train), source(test), source(val) if len(val) else None, "digits"
    )


DATASETS.register("digits-lt", DataSetEntry(build_digits, DEFAULTS, num_classes=10, in_channels=1, needs_root=False))
