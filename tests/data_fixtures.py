"""Tiny data sets in every on-disk format, generated at test time (importable as ``data_fixtures``).

Every image encodes where it came from: pixel (0, 0) holds its index within its class
(red channel) and its label (green channel), so a test can check which images were kept.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from rayexperts.config import DataSection

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def data_cfg(**keys) -> DictConfig:
    """``cfg.data`` with the typed defaults and ``keys`` (no preset layers)."""
    return OmegaConf.structured(DataSection(**keys))


def interleaved_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """A shuffled label order with ``per_class`` images per class (like CIFAR's files)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def tagged_images(labels: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 ``[N, size, size, 3]``: flat colour per class, pixel (0, 0) = (index in class, label, 0)."""
    images = np.zeros((len(labels), size, size, 3), dtype=np.uint8)
    images[..., 2] = (labels * 20 % 256)[:, None, None]
    seen = np.zeros(labels.max() + 1, dtype=np.int64)
    for i, y in enumerate(labels):
        images[i, 0, 0] = (seen[y], y, 0)
        seen[y] += 1
    return images


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def make_cifar10_pickles(parent: Path, train_per_class: int = 20, test_per_class: int = 3) -> Path:
    """``parent/cifar-10-batches-py`` in the official format (5 train batches, test, meta)."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = interleaved_labels(10, train_per_class)
    chw = tagged_images(labels).transpose(0, 3, 1, 2).reshape(len(labels), -1)
    for b, idx in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
        _dump(folder / f"data_batch_{b}", {"data": chw[idx], "labels": labels[idx].tolist()})
    test_labels = interleaved_labels(10, test_per_class, seed=1)
    test = tagged_images(test_labels).transpose(0, 3, 1, 2).reshape(len(test_labels), -1)
    _dump(folder / "test_batch", {"data": test, "labels": test_labels.tolist()})
    _dump(folder / "batches.meta", {"label_names": CIFAR10_NAMES})
    return folder


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar_parquet(path: Path, train_per_class: int = 20, test_per_class: int = 3, fmt: str = "JPEG") -> Path:
    """A Parquet file in the layout of ``../shared/data/cifar10-jpeg.parquet`` (rows by split,
    label, index_in_class)."""
    rows = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        for img, y in zip(tagged_images(labels), labels):
            rows.append((split, int(y), CIFAR10_NAMES[y], int(img[0, 0, 0]), encode(img, fmt)))
    table = pa.table(
        {
            "split": pa.array([r[0] for r in rows]).dictionary_encode(),
            "label": pa.array([r[1] for r in rows], pa.int16()),
            "class_name": pa.array([r[2] for r in rows]).dictionary_encode(),
            "index_in_class": pa.array([r[3] for r in rows], pa.int32()),
            "image": pa.array([r[4] for r in rows], pa.binary()),
        }
    )
    pq.write_table(table, path)
    return path


def make_generic_parquet(path: Path, per_class: tuple[int, ...] = (12, 8, 5), size: int = 8, **names) -> Path:
    """``image``/``label``/``split`` (renamable via ``names``) Parquet: train per ``per_class``,
    2 val and 2 test images per class, PNG bytes."""
    cols = {"image": [], "label": [], "split": []}
    for split, counts in (("train", per_class), ("val", [2] * len(per_class)), ("test", [2] * len(per_class))):
        labels = np.repeat(np.arange(len(counts)), counts)
        cols["image"] += [encode(img) for img in tagged_images(labels, size)]
        cols["label"] += labels.tolist()
        cols["split"] += [split] * len(labels)
    pq.write_table(pa.table({names.get(k, k): v for k, v in cols.items()}), path)
    return path


def make_image_tree(root: Path, split: str, per_class: dict[str, int], size: int = 8) -> list[str]:
    """``root/split/<class>/<i>.png``; returns the relative paths in class then file order."""
    rel = []
    for y, (name, n) in enumerate(per_class.items()):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for img in tagged_images(np.full(n, y), size):
            path = Path(split) / name / f"{int(img[0, 0, 0]):03d}.png"
            Image.fromarray(img).save(root / path)
            rel.append(str(path))
    return rel


def make_split_file_set(root: Path, prefix: str = "ImageNet_LT") -> Path:
    """PNG images plus ``<prefix>_{train,val,test}.txt`` (counts 6, 3, 1 over 3 classes)."""
    counts = {"train": {"n001": 6, "n002": 3, "n003": 1}, "val": {"n001": 2, "n002": 2, "n003": 2}}
    counts["test"] = counts["val"]
    for split, per_class in counts.items():
        paths = make_image_tree(root, split, per_class)
        lines = [f"{p} {list(per_class).index(Path(p).parent.name)}" for p in paths]
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root
