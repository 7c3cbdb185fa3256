"""``python -m rayexperts.data describe``."""

from __future__ import annotations

import subprocess
import sys

from data_fixtures import CIFAR10_NAMES, data_cfg, make_cifar10_pickles

from rayexperts.data import build_dataset, exponential_counts
from rayexperts import cli

KEYS = ["data.imbalance_type=exp", "data.imbalance_factor=10", "data.val_per_class=0"]


def test_describe_in_a_subprocess(tmp_path):
    make_cifar10_pickles(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "rayexperts.data", "describe", "cifar10-lt", f"data.root={tmp_path}", *KEYS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    counts = exponential_counts(20, 10, 10)  # the tiny folder has 20 training images per class
    rows = [line.split() for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [r[1] for r in rows] == CIFAR10_NAMES
    assert [int(r[2]) for r in rows] == counts.tolist()
    assert [r[3] for r in rows] == ["medium"] + ["few"] * 9  # 20 images: medium; 15 and fewer: few
    assert f"train {counts.sum()}  val 0  test 30" in done.stdout


def test_bad_key_exits_2_naming_the_key():
    done = subprocess.run(
        [sys.executable, "-m", "rayexperts.data", "describe", "digits-lt", "data.imbalance_factr=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "error: unknown config key 'data.imbalance_factr'" in done.stderr and "data.imbalance_factor" in done.stderr
    assert "Traceback" not in done.stderr


def test_describe_in_process_and_data_errors(tmp_path, capsys):
    assert cli.main(["data", "describe", "digits-lt", *KEYS, "data.val_per_class=2"]) == 0
    out = capsys.readouterr().out
    counts = build_dataset(data_cfg(name="digits-lt", imbalance_factor=10, val_per_class=2)).train_counts
    assert f"train {counts.sum()}  val 20  test 300" in out and "shot groups" in out
    assert cli.main(["data", "describe", "cifar10-lt", f"data.root={tmp_path / 'nope'}"]) == 2
    assert f"'{tmp_path / 'nope'}'" in capsys.readouterr().err
    assert cli.main(["data", "describe", "digits-lt", "data.imbalance_factor=0.5"]) == 2
    assert "data.imbalance_factor" in capsys.readouterr().err
    assert cli.main(["data", "summarise", "digits-lt"]) == 2
    assert "usage:" in capsys.readouterr().err
