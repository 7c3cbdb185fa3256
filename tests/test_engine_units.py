"""Engine pieces without Ray: LR schedules, evaluation statistics, result files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rayexperts.config import load_config
from rayexperts.engine.results import ResultWriter
from rayexperts.engine.schedule import lr_schedule
from rayexperts.eval.metrics import EvalAccumulator, expected_calibration_error, pairwise_kl
from rayexperts.rundir import RunDir


def test_multistep_with_warmup():
    cfg = load_config(None, ["train.lr=0.1", "train.schedule=multistep", "train.milestones=[160,180]",
                             "train.warmup_epochs=5", "train.epochs=200"])
    lr = lr_schedule(cfg.train)
    assert lr(1.0) == pytest.approx(0.02) and lr(5.0) == pytest.approx(0.1)
    assert lr(100) == pytest.approx(0.1) and lr(170) == pytest.approx(0.01) and lr(190) == pytest.approx(0.001)


def test_cosine_to_zero():
    cfg = load_config(None, ["train.lr=0.2", "train.schedule=cosine", "train.epochs=10", "train.warmup_epochs=0"])
    lr = lr_schedule(cfg.train)
    assert lr(0.0) == pytest.approx(0.2) and lr(5.0) == pytest.approx(0.1) and lr(10.0) == pytest.approx(0.0, abs=1e-12)


def test_ece_constructed_case():
    # 4 samples, 2 classes. Confidences 0.9, 0.9 (bin 13), 0.6, 0.6 (bin 9).
    # Bin 13: both correct → |1.0 − 0.9| = 0.1; bin 9: one correct → |0.5 − 0.6| = 0.1. ECE = 0.5·0.1 + 0.5·0.1.
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    targets = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, targets, 15) == pytest.approx(0.1)


def test_shot_group_accuracy_and_nan_for_empty_group():
    acc = EvalAccumulator(["v"], num_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    targets = torch.tensor([0, 1, 1, 2])
    acc.update("v", logits, targets)
    groups = np.array(["many", "few", "few"])
    s = acc.summary("v", groups)
    assert s["top1"] == pytest.approx(3 / 4)
    assert s["top1_many"] == pytest.approx(1.0) and s["top1_few"] == pytest.approx(2 / 3)
    assert math.isnan(s["top1_medium"])
    np.testing.assert_allclose(acc.per_class_accuracy("v"), [1.0, 0.5, 1.0])


def test_pairwise_kl_hand_value():
    a = torch.log(torch.tensor([[0.5, 0.5]]))
    b = torch.log(torch.tensor([[0.9, 0.1]]))
    kl_ab = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_ba = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert pairwise_kl([a, b]).item() == pytest.approx((kl_ab + kl_ba) / 2, rel=1e-5)


def test_result_writer_replaces_rows_after_resume(tmp_path):
    rundir = RunDir.of(str(tmp_path), "run")
    w = ResultWriter(rundir)
    classes = pd.DataFrame({"class_id": [0], "view": ["v"], "accuracy": [1.0]})
    reliability = pd.DataFrame({"bin": [0], "view": ["v"], "count": [1.0]})
    for epoch in range(3):
        w.add([{"epoch": epoch, "view": "v", "top1": 0.1 * epoch}], classes, reliability)
    resumed = ResultWriter(RunDir.of(str(tmp_path), "run"), start_epoch=2)  # checkpoint after epoch 1
    resumed.add([{"epoch": 2, "view": "v", "top1": 0.9}], classes, reliability)
    df = rundir.read_table("metrics.parquet")
    assert df["epoch"].tolist() == [0, 1, 2] and df["top1"].tolist()[-1] == pytest.approx(0.9)
    assert not list(tmp_path.glob("run/.*tmp"))
