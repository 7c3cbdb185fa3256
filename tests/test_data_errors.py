"""Every data error is a DataError whose message names the path, column or value at fault."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    data_cfg,
    make_cifar10_pickles,
    make_cifar_parquet,
    make_generic_parquet,
    make_image_tree,
    make_split_file_set,
)

from rayexperts.config import ConfigError
from rayexperts.data import DataError, build_dataset


def _fails(match: str, **keys) -> str:
    with pytest.raises(DataError, match=match) as err:
        build_dataset(data_cfg(**keys))
    return str(err.value)


def _rewrite_parquet(path, column: str, row: int, value) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    pq.write_table(
        table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.column(column).type)),
        path,
    )


def test_unknown_data_set_name():
    with pytest.raises(ConfigError, match=r"data.name='cifar10_lt'; did you mean cifar10-lt"):
        build_dataset(data_cfg(name="cifar10_lt"))


def test_missing_roots_name_the_path_and_how_to_get_the_data(tmp_path):
    msg = _fails("data.root is not set", name="cifar10-lt")
    assert "data.download=true" in msg and "cs.toronto.edu" in msg
    msg = _fails(str(tmp_path / "nope"), name="cifar100-lt", root=str(tmp_path / "nope"))
    assert "cifar-100-python" in msg and "cs.toronto.edu" in msg
    _fails(
        f"Parquet file '{tmp_path / 'x.parquet'}' .*does not exist", name="cifar10-lt", root=str(tmp_path / "x.parquet")
    )
    _fails(f"'{tmp_path / 'train'}' does not exist", name="imagefolder", root=str(tmp_path))
    _fails("not a directory", name="imagenet-lt", root=str(tmp_path / "nope"))
    _fails("data.root is not set", name="parquet")


def test_missing_split_files(tmp_path):
    msg = _fails(f"'{tmp_path / 'Places_LT_train.txt'}' not found", name="places-lt", root=str(tmp_path))
    assert "OpenLongTailRecognition" in msg and "data.train_split" in msg
    root = make_split_file_set(tmp_path / "inet")
    _fails("data.test_split='missing.txt' not found", name="imagenet-lt", root=str(root), test_split="missing.txt")
    (root / "ImageNet_LT_train.txt").write_text("elsewhere/a.png 0\n")
    _fails(f"image '{root / 'elsewhere/a.png'}' .*does not exist", name="imagenet-lt", root=str(root))


def test_bad_split_file_lines_and_labels(tmp_path):
    root = make_split_file_set(tmp_path)
    (root / "ImageNet_LT_val.txt").write_text("val/n001/000.png 0\nval/n001/001.png zero\n")
    _fails(r"ImageNet_LT_val.txt:2: expected 'relative/path label'", name="imagenet-lt", root=str(root))
    (root / "ImageNet_LT_val.txt").write_text("val/n001/000.png 7\n")
    _fails(
        r"label 7 of 'val/n001/000.png' of .*ImageNet_LT_val.txt' \(imagenet-lt.*is out of range", name="imagenet-lt", root=str(root)
    )
    (root / "ImageNet_LT_val.txt").write_text("val/n001/000.png 0\n")
    (root / "ImageNet_LT_train.txt").write_text("train/n001/000.png 0\ntrain/n003/000.png 2\n")
    _fails(r"class 1 \('1'\) has 0 training images", name="imagenet-lt", root=str(root))


def test_missing_parquet_columns_name_the_columns_present(tmp_path):
    path = make_generic_parquet(tmp_path / "d.parquet", label="target")
    msg = _fails("has no column\\(s\\) 'label'", name="parquet", root=str(path))
    assert "'image', 'target', 'split'" in msg and "data.label_column" in msg
    _fails("'img'", name="cifar10-lt", root=str(path), image_column="img", label_column="target")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    _fails("not a readable Parquet file", name="parquet", root=str(tmp_path / "junk.parquet"))


def test_labels_out_of_range(tmp_path):
    path = make_cifar_parquet(tmp_path / "c.parquet")
    _rewrite_parquet(path, "label", 7, 10)
    _fails(r"label 10 at position 7 of column 'label' .*out of range.*0\.\.9", name="cifar10-lt", root=str(path))
    path = make_generic_parquet(tmp_path / "g.parquet")
    _rewrite_parquet(path, "label", 30, 3)  # a val row with a class the train rows lack
    _fails(r"label 3 at position 30 .*0\.\.2", name="parquet", root=str(path))
    folder = make_cifar10_pickles(tmp_path / "pk")
    import pickle

    batch = pickle.loads((folder / "test_batch").read_bytes())
    batch["labels"][4] = -1
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    _fails(r"label -1 at position 4 of the test split", name="cifar10-lt", root=str(folder))


def test_class_with_zero_training_images(tmp_path):
    msg = _fails(r"class 8 \('8'\) is left with 0 training images", name="digits-lt", imbalance_factor=500.0)
    assert "data.imbalance_factor=500" in msg
    make_image_tree(tmp_path, "train", {"ant": 3, "bee": 2})
    make_image_tree(tmp_path, "test", {"ant": 1, "bee": 1})
    (tmp_path / "train" / "cow").mkdir()
    _fails(r"class 2 \('cow'\) has 0 training images", name="imagefolder", root=str(tmp_path))


def test_imbalance_factor_below_one():
    _fails("data.imbalance_factor.*0.5", name="digits-lt", imbalance_factor=0.5)


def test_corrupt_images_name_the_file_or_row(tmp_path):
    root = make_split_file_set(tmp_path / "s")
    (root / "test/n002/001.png").write_bytes(b"\x89PNG broken")
    ds = build_dataset(data_cfg(name="imagenet-lt", root=str(root)))
    bad = ds.test.paths.index("test/n002/001.png")
    with pytest.raises(DataError, match=f"cannot decode image '{root / 'test/n002/001.png'}'"):
        ds.test[bad]
    (root / "test/n002/001.png").unlink()
    with pytest.raises(DataError, match="001.png' does not exist"):
        ds.test[bad]

    path = make_generic_parquet(tmp_path / "g.parquet")
    _rewrite_parquet(path, "image", 33, b"garbage")
    ds = build_dataset(data_cfg(name="parquet", root=str(path), imbalance_type="none"))
    with pytest.raises(DataError, match=f"row 33 \\(column 'image'\\) of '{path}'"):
        ds.test[ds.test.rows.tolist().index(33)]

    path = make_cifar_parquet(tmp_path / "c.parquet")
    _rewrite_parquet(path, "image", 205, b"\xff\xd8 truncated jpeg")
    _fails(f"cannot decode image row 205 \\(column 'image'\\) of '{path}'", name="cifar10-lt", root=str(path))
    _rewrite_parquet(path, "image", 205, None)
    _fails("row 205 .*no image", name="cifar10-lt", root=str(path))

    folder = make_cifar10_pickles(tmp_path / "pk")
    (folder / "data_batch_3").write_bytes(b"\x80\x02 truncated")
    _fails(f"CIFAR file '{folder / 'data_batch_3'}' is corrupt", name="cifar10-lt", root=str(folder))
    (folder / "data_batch_3").unlink()
    _fails("data_batch_3' is missing", name="cifar10-lt", root=str(folder))


def test_cifar_images_must_be_32x32(tmp_path):
    path = make_generic_parquet(tmp_path / "g.parquet", per_class=(1,) * 10)
    _fails(
        r"row 0 \(column 'image'\).*CIFAR images are 32x32, found size \(8, 8\)",
        name="cifar10-lt",
        root=str(path),
        imbalance_type="none",
    )


def test_download_fetches_the_pickles_or_reports_the_failure(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    _fails(
        f"download to '{tmp_path}' failed \\(network unreachable\\)",
        name="cifar10-lt",
        root=str(tmp_path),
        download=True,
    )

    def fake(root, train, download):
        make_cifar10_pickles(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake)
    ds = build_dataset(data_cfg(name="cifar10-lt", root=str(tmp_path), download=True, imbalance_type="none"))
    assert len(ds.train) == 200
