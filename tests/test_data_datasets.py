"""Every data-set format, built from fixtures generated in tmp_path (and the real CIFAR-10
Parquet file when it is present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from data_fixtures import (
    CIFAR10_NAMES,
    data_cfg,
    make_cifar10_pickles,
    make_cifar_parquet,
    make_generic_parquet,
    make_image_tree,
    make_split_file_set,
)
from PIL import Image
from torch.utils.data import DataLoader

from rayexperts.data import (
    FileSource,
    ParquetSource,
    TransformedDataset,
    build_dataset,
    build_transform,
    exponential_counts,
)

TINY_IF10 = exponential_counts(20, 10, 10)  # 20 images per class in the tiny CIFAR fixtures


def test_digits_lt():
    ds = build_dataset(data_cfg(name="digits-lt", imbalance_factor=10))
    assert (ds.name, ds.num_classes, ds.image_kind, ds.in_channels) == ("digits-lt", 10, "digits", 1)
    assert np.bincount(ds.test.labels).tolist() == [30] * 10
    assert ds.train_counts.tolist() == exponential_counts(144, 10, 10).tolist()  # 144 = smallest remaining class
    assert ds.train_counts.tolist() == np.bincount(ds.train.labels).tolist()
    x, y = ds.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.uint8 and x.max() <= 255 and isinstance(y, int)
    assert ds.val is None
    assert ds.shot_groups().tolist()[:2] == ["many", "many"] and ds.shot_groups()[-1] == "few"
    again = build_dataset(data_cfg(name="digits-lt", imbalance_factor=10))
    assert np.array_equal(again.test.images, ds.test.images)
    other_seed = build_dataset(data_cfg(name="digits-lt", seed=1))
    assert not np.array_equal(other_seed.test.images, ds.test.images)


def test_digits_val_split_is_disjoint_and_balanced():
    ds = build_dataset(data_cfg(name="digits-lt", val_per_class=5))
    assert np.bincount(ds.val.labels).tolist() == [5] * 10
    images = {split: {img.tobytes() for img in getattr(ds, split).images} for split in ("train", "val", "test")}
    assert not images["val"] & images["train"] and not images["val"] & images["test"]


def _assert_tiny_cifar(ds, val_per_class: int = 0):
    assert ds.class_names == CIFAR10_NAMES and ds.image_kind == "cifar"
    expected = np.minimum(TINY_IF10, 20 - val_per_class)
    assert ds.train_counts.tolist() == expected.tolist()
    assert len(ds.test) == 30 and np.bincount(ds.test.labels).tolist() == [3] * 10
    x, y = ds.train[len(ds.train) - 1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_cifar10_pickle_folder_keeps_the_first_n_images_of_each_class(tmp_path):
    make_cifar10_pickles(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        ds = build_dataset(data_cfg(name="cifar10-lt", root=str(root), imbalance_factor=10))
        _assert_tiny_cifar(ds)
    # pixel (0, 0): red = index within the class, green = label
    tags = ds.train.images[:, :2, 0, 0]
    assert np.array_equal(tags[:, 1], ds.train.labels)
    for c, n in enumerate(TINY_IF10):
        assert sorted(tags[tags[:, 1] == c, 0].tolist()) == list(range(n))


def test_cifar10_pickle_val_split(tmp_path):
    make_cifar10_pickles(tmp_path)
    ds = build_dataset(data_cfg(name="cifar10-lt", root=str(tmp_path), imbalance_factor=10, val_per_class=4))
    _assert_tiny_cifar(ds, val_per_class=4)
    tags = ds.val.images[:, :2, 0, 0]
    assert np.bincount(tags[:, 1]).tolist() == [4] * 10
    assert set(tags[:, 0].tolist()) == {16, 17, 18, 19}  # the last images of each class: unused by the LT subset


def test_cifar10_parquet(tmp_path):
    path = make_cifar_parquet(tmp_path / "cifar.parquet")
    ds = build_dataset(data_cfg(name="cifar10-lt", root=str(path), imbalance_factor=10, val_per_class=2))
    _assert_tiny_cifar(ds, val_per_class=2)
    assert np.bincount(ds.val.labels).tolist() == [2] * 10
    png = make_cifar_parquet(tmp_path / "png.parquet", fmt="PNG")  # not JPEG: the PIL path
    ds = build_dataset(data_cfg(name="cifar10-lt", root=str(png), imbalance_factor=10))
    _assert_tiny_cifar(ds)
    tags = ds.train.images[:, :2, 0, 0]
    assert np.array_equal(tags[:, 1], ds.train.labels) and tags[:, 0].max() == 19


def test_split_files_published_names_and_explicit_keys(tmp_path):
    root = make_split_file_set(tmp_path / "inet")
    ds = build_dataset(data_cfg(name="imagenet-lt", root=str(root)))
    assert ds.train_counts.tolist() == [6, 3, 1] and ds.class_names == ["n001", "n002", "n003"]
    assert (len(ds.val), len(ds.test), ds.image_kind) == (6, 6, "imagenet")
    assert isinstance(ds.train, FileSource)
    img, y = ds.train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and y == 0
    (root / "train.lst").write_text("train/n002/000.png 0\ntrain/n001/000.png\t1\n\ntrain/n003/000.png 2\n")
    test_file = str(root / "ImageNet_LT_test.txt")
    ds = build_dataset(data_cfg(name="places-lt", root=str(root), train_split="train.lst", test_split=test_file))
    assert ds.train_counts.tolist() == [1, 1, 1] and ds.class_names == ["n002", "n001", "n003"]
    assert ds.val is None and len(ds.test) == 6  # no Places_LT_val.txt: no val split


def test_inat_uses_val_as_test(tmp_path):
    root = make_split_file_set(tmp_path / "inat", prefix="iNaturalist18")
    (root / "iNaturalist18_val.txt").write_text((root / "iNaturalist18_test.txt").read_text())
    ds = build_dataset(data_cfg(name="inat2018", root=str(root)))
    assert ds.train_counts.tolist() == [6, 3, 1] and len(ds.test) == 6 and ds.val is None


def test_imagefolder(tmp_path):
    make_image_tree(tmp_path, "train", {"cat": 8, "dog": 6, "eel": 4}, size=32)
    make_image_tree(tmp_path, "test", {"cat": 2, "dog": 2, "eel": 2}, size=32)
    ds = build_dataset(data_cfg(name="imagefolder", root=str(tmp_path), imbalance_type="none", val_per_class=1))
    assert ds.class_names == ["cat", "dog", "eel"] and ds.image_kind == "cifar"
    assert ds.train_counts.tolist() == [7, 5, 3] and len(ds.val) == 3 and len(ds.test) == 6
    ds = build_dataset(data_cfg(name="imagefolder", root=str(tmp_path), imbalance_factor=4))
    assert ds.train_counts.tolist() == [4, 2, 1]
    assert [Path(p).name for p in ds.train.paths[:4]] == ["000.png", "001.png", "002.png", "003.png"]
    make_image_tree(tmp_path, "val", {"cat": 1, "eel": 1}, size=32)
    ds = build_dataset(data_cfg(name="imagefolder", root=str(tmp_path), imbalance_type="none", val_per_class=1))
    assert ds.train_counts.tolist() == [8, 6, 4] and np.bincount(ds.val.labels).tolist() == [1, 0, 1]


def test_generic_parquet_with_renamed_columns(tmp_path):
    path = make_generic_parquet(tmp_path / "d.parquet", image="img", label="y", split="part")
    cfg = data_cfg(name="parquet", root=str(path), image_column="img", label_column="y", split_column="part")
    cfg.imbalance_type = "none"
    ds = build_dataset(cfg)
    assert ds.train_counts.tolist() == [12, 8, 5] and (len(ds.val), len(ds.test)) == (6, 6)
    assert ds.image_kind == "imagenet" and isinstance(ds.test, ParquetSource)
    img, y = ds.test[5]
    assert img.size == (8, 8) and y == 2
    cfg.imbalance_type, cfg.imbalance_factor = "step", 5.0
    assert build_dataset(cfg).train_counts.tolist() == [5, 5, 1]  # int(3 * 0.5) = 1 minority class


def test_transformed_dataset_batches(tmp_path):
    ds = build_dataset(data_cfg(name="digits-lt"))
    train = TransformedDataset(ds.train, build_transform("digits", "standard", train=True))
    x, y = next(iter(DataLoader(train, batch_size=16)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (16,)
    assert np.array_equal(train.labels, ds.train.labels) and len(train) == len(ds.train)


def test_real_cifar10_parquet_if100(cifar10_parquet):
    ds = build_dataset(data_cfg(name="cifar10-lt", root=str(cifar10_parquet), imbalance_factor=100))
    assert ds.train_counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert (len(ds.train), len(ds.test)) == (12406, 10000)
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    # Test images normalised with the CIFAR constants of the LDAM/RIDE/NCL code: mean ≈ 0 per channel; their
    # "std" (0.2023, 0.1994, 0.2010) is the mean per-image std, so the pixel std comes out at the data set's
    # (0.2470, 0.2435, 0.2616) divided by it.
    loader = DataLoader(TransformedDataset(ds.test, build_transform("cifar", "standard", False)), batch_size=2000,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    x, y = next(iter(loader))
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.float32 and y.max() < 10
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    expected_std = torch.tensor([0.2470 / 0.2023, 0.2435 / 0.1994, 0.2616 / 0.2010])
    assert mean.abs().max() < 0.05 and (std - expected_std).abs().max() < 0.03, (mean, std)
    x, _ = next(iter(DataLoader(TransformedDataset(ds.train, build_transform("cifar", "standard", True)), batch_size=64)))
    assert x.shape == (64, 3, 32, 32) and torch.isfinite(x).all()
