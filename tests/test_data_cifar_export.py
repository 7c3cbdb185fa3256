"""``python -m rayexperts.data export-cifar10``: a CIFAR-10 Parquet file as the official python pickles
(docs/compare.md), read back by torchvision, by this package, and subset as LDAM-DRW's code subsets it."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import CIFAR10_NAMES, data_cfg, make_cifar_parquet
from test_recipes import ldam_drw_subset

from rayexperts.data import build_dataset, exponential_counts
from rayexperts.cli import main as cli_main


def main(argv: list[str]) -> int:
    """``python -m rayexperts.data ARGS`` (it hands over to ``rayexperts data``, where errors become exit codes)."""
    return cli_main(["data", *argv])
from rayexperts.data.cifar_export import export_cifar10

PER_CLASS = 20


def _tags(images_hwc: np.ndarray) -> list[tuple[int, int]]:
    """(index in class, label) of each image, from the fixture's tag pixel (0, 0)."""
    return [(int(i[0, 0, 0]), int(i[0, 0, 1])) for i in images_hwc]


def _unpickle(path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.fixture
def permuted_parquet(tmp_path):
    """The fixture Parquet (PNG, lossless) with its rows in a random order: the export must put each class
    back in ``index_in_class`` order while keeping the slots the file gives each class."""
    path = make_cifar_parquet(tmp_path / "sorted.parquet", train_per_class=PER_CLASS, test_per_class=3, fmt="PNG")
    table = pq.read_table(path)
    perm = np.random.default_rng(0).permutation(table.num_rows)
    pq.write_table(table.take(pa.array(perm)), tmp_path / "c10.parquet")
    return tmp_path / "c10.parquet"


@pytest.mark.slow
def test_export_is_the_official_layout_read_by_torchvision(permuted_parquet, tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    import torchvision.datasets.cifar as tv_cifar

    assert main(["export-cifar10", str(tmp_path / "out"), f"data.root={permuted_parquet}"]) == 0
    folder = tmp_path / "out" / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
    )
    batch = _unpickle(folder / "data_batch_1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (40, 3072)  # 200 training rows / 5
    # torchvision checks the original archive's md5 sums, which an export of other bytes cannot match:
    # existence only here (the check the reference run's shim makes, docs/compare.md).
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: (tmp_path / fpath).exists())
    train = torchvision.datasets.CIFAR10(str(tmp_path / "out"), train=True)
    test = torchvision.datasets.CIFAR10(str(tmp_path / "out"), train=False)
    assert train.classes == CIFAR10_NAMES and len(train) == 10 * PER_CLASS and len(test) == 30
    # Row-major R, G, B planes: torchvision's HWC image has the fixture's tag and class colour in place.
    assert all(t[1] == y for t, y in zip(_tags(train.data), train.targets))
    assert (train.data[:, 5, 5, 2] == np.asarray(train.targets) * 20).all()
    # Slots of each class as in the file, within a class in index_in_class order.
    table = pq.read_table(permuted_parquet).to_pandas()
    file_labels = table.loc[table["split"] == "train", "label"].to_numpy()
    assert train.targets == file_labels.tolist()
    for c in range(10):
        in_class = [t[0] for t in _tags(train.data) if t[1] == c]
        assert in_class == list(range(PER_CLASS))


@pytest.mark.parametrize("factor", [10, 3])
def test_same_long_tailed_subset_from_the_export_for_both_codes(permuted_parquet, tmp_path, factor):
    """Our loader on the export = our loader on the Parquet = LDAM-DRW's ``gen_imbalanced_data`` on the
    export's labels (``data.lt_subset=shuffled``), image by image."""
    export_cifar10(data_cfg(root=str(permuted_parquet)), tmp_path / "out")
    keys = dict(name="cifar10-lt", imbalance_factor=factor, lt_subset="shuffled", lt_subset_seed=0)
    from_parquet = build_dataset(data_cfg(root=str(permuted_parquet), **keys))
    from_pickles = build_dataset(data_cfg(root=str(tmp_path / "out"), **keys))
    ours = sorted(_tags(from_parquet.train.images.transpose(0, 2, 3, 1)))
    assert sorted(_tags(from_pickles.train.images.transpose(0, 2, 3, 1))) == ours
    assert np.array_equal(np.sort(from_parquet.test.images, axis=0), np.sort(from_pickles.test.images, axis=0))
    parts = [_unpickle(tmp_path / "out" / "cifar-10-batches-py" / f"data_batch_{i}") for i in range(1, 6)]
    data = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    targets = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
    counts = exponential_counts(PER_CLASS, 10, factor)
    theirs = sorted(_tags(data[ldam_drw_subset(targets, counts.tolist())]))
    assert theirs == ours and len(ours) == counts.sum()
    assert ours != sorted((i, c) for c in range(10) for i in range(counts[c]))  # not the first n_i


def test_export_refuses_bad_input_and_leaves_nothing(tmp_path, capsys):
    parquet = make_cifar_parquet(tmp_path / "c.parquet", train_per_class=2, test_per_class=1, fmt="PNG")
    assert main(["export-cifar10", str(tmp_path / "o"), f"data.root={tmp_path / 'missing.parquet'}"]) == 2
    assert "missing.parquet" in capsys.readouterr().err and not (tmp_path / "o" / "cifar-10-batches-py").exists()
    assert main(["export-cifar10", str(tmp_path / "o"), f"data.root={tmp_path}"]) == 2
    assert "export-cifar10 reads a Parquet file" in capsys.readouterr().err
    assert main(["export-cifar10", str(tmp_path / "o"), f"data.root={parquet}", "data.label_column=nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert list((tmp_path / "o").glob("*")) == []  # no half-written folder
    assert main(["export-cifar10", str(tmp_path / "o"), f"data.root={parquet}"]) == 0
    assert main(["export-cifar10", str(tmp_path / "o"), f"data.root={parquet}"]) == 2
    assert "already exists" in capsys.readouterr().err
