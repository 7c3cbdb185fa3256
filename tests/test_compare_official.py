"""``jobs/compare_official.py`` (rayexperts.launch.compare) on a SYNTHETIC LDAM-DRW log: the lines below are
written with the format strings of kaidic/LDAM-DRW@2536330:cifar_train.py ``validate``/``main_worker`` (quoted, not
imported: no code of theirs is in this repository), with made-up accuracies; and the ``model.head_init`` fix found
by the one-step comparison (docs/compare.md)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from rayexperts.config import load_config
from rayexperts import cli
from rayexperts.launch.compare import compare, parse_ldam_drw, side_by_side, summary

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT IF 100: 8 many, 2 medium, 0 few


def write_ldam_log(folder, top1: list[float], class_acc: np.ndarray, start_epoch: int = 0):
    """``log/<store>/log_test.csv`` and ``args.txt`` as the authors' code writes them (synthetic values)."""
    folder.mkdir(parents=True)
    lines, best = [], 0.0
    for t1, acc in zip(top1, class_acc):
        lines.append("val Results: Prec@1 {:.3f} Prec@5 {:.3f} Loss {:.5f}".format(t1, 99.0, 1.23456))
        lines.append("val Class Accuracy: %s" % np.array2string(acc, separator=",",
                                                                  formatter={"float_kind": lambda x: "%.3f" % x}))
        best = max(best, t1)
        lines.append("Best Prec@1: %.3f\n" % best)
    (folder / "log_test.csv").write_text("\n".join(lines) + "\n")
    ns = argparse.Namespace(dataset="cifar10", start_epoch=start_epoch, store_name="synthetic", cls_num_list=COUNTS)
    (folder / "args.txt").write_text(str(ns))


def write_ours(run_dir, epochs: list[int], top1: list[float]):
    run_dir.mkdir(parents=True)
    rows = []
    for e, t in zip(epochs, top1):
        rows.append({"epoch": e, "view": "expert0", "transductive": False, "top1": t, "top1_many": t + 0.05,
                     "top1_medium": t - 0.2, "top1_few": np.nan})
        rows.append({"epoch": e, "view": "expert0_pc", "transductive": False, "top1": t + 0.07, "top1_many": t,
                     "top1_medium": t, "top1_few": np.nan})
    pd.DataFrame(rows).to_parquet(run_dir / "metrics.parquet")


@pytest.fixture
def synthetic(tmp_path):
    acc = np.tile(np.linspace(0.9, 0.3, 10), (12, 1))
    acc[-1] = [0.9, 0.9, 0.8, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.2]
    theirs = [30.0 + 3 * e for e in range(12)]
    theirs[7] = 70.0  # their best, epoch 8 (1-based)
    write_ldam_log(tmp_path / "run" / "log" / "synthetic", theirs, acc)
    write_ours(tmp_path / "ours", [4, 9, 11], [0.25, 0.5, 0.55])
    return tmp_path


def test_parse_ldam_log_and_args(synthetic):
    df, args = parse_ldam_drw(synthetic / "run")  # the working directory: finds log/*/log_test.csv
    assert df["epoch"].tolist() == list(range(12))
    assert df["top1"].iloc[0] == pytest.approx(0.30) and df["top1"].iloc[7] == pytest.approx(0.70)
    assert df["class_acc"].iloc[-1] == pytest.approx([0.9, 0.9, 0.8, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.2])
    assert args["cls_num_list"] == COUNTS and args["start_epoch"] == 0
    # a resumed run (--start-epoch 100) numbers its lines from there
    write_ldam_log(synthetic / "resumed", [50.0, 51.0], np.full((2, 10), 0.5), start_epoch=100)
    assert parse_ldam_drw(synthetic / "resumed" / "log_test.csv")[0]["epoch"].tolist() == [100, 101]


def test_a_resumed_run_is_read_from_its_segments(tmp_path):
    """Segments in order: the second (resumed at epoch 3, 0-based) replaces the first's epoch 3 and goes on."""
    from rayexperts.launch.compare import read_segments

    acc = np.tile(np.linspace(0.9, 0.3, 10), (4, 1))
    write_ldam_log(tmp_path / "part1", [10.0, 20.0, 30.0, 35.0], acc)
    write_ldam_log(tmp_path / "part2", [40.0, 50.0], acc[:2], start_epoch=3)
    df, args = read_segments("ldam-drw", [tmp_path / "part1", tmp_path / "part2"])
    assert df["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert df["top1"].round(6).tolist() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert args["segments"] == [0, 3] and args["cls_num_list"] == COUNTS


def test_side_by_side_last_best_and_groups(synthetic):
    theirs, _ = parse_ldam_drw(synthetic / "run")
    ours = pd.read_parquet(synthetic / "ours" / "metrics.parquet").query("view == 'expert0'")
    table = side_by_side(ours, theirs)
    assert len(table) == 12 and table["ours"].notna().sum() == 3
    assert table.loc[table["epoch"] == 9, "diff"].iloc[0] == pytest.approx(0.50 - 0.57)
    s = summary(table).set_index(["code", "over"])
    assert s.loc[("theirs", "own evaluations"), ["last_epoch", "best_epoch"]].tolist() == [11, 7]
    assert s.loc[("theirs", "own evaluations"), "best_top1"] == pytest.approx(0.70)
    assert s.loc[("theirs", "common epochs"), ["evaluations", "best_epoch"]].tolist() == [3, 11]  # epochs 4, 9, 11
    assert s.loc[("ours", "own evaluations"), "last_top1"] == pytest.approx(0.55)

    md = compare(synthetic, synthetic / "ours", synthetic / "run", synthetic / "out")
    text = md.read_text()
    assert "| theirs | own evaluations | 12 | 12 | 63.00 | 8 | 70.00 |" in text  # 1-based epochs, %
    assert "| ours | own evaluations | 3 | 12 | 55.00 | 12 | 55.00 |" in text
    # shot groups at epoch 12: many = classes 0-7 (> 100 images; mean of 0.9, 0.9, 0.8, 0.7, 0.6, 0.6, 0.5, 0.5 =
    # 0.6875), medium = classes 8, 9 (mean of 0.4, 0.2 = 0.3); ours from metrics.parquet (0.55 + 0.05, 0.55 - 0.2)
    assert "| many | 8 | 60.00 | 68.75 |" in text and "| medium | 2 | 35.00 | 30.00 |" in text
    assert "| 10 | 50.00 | 57.00 | -7.00 |" in text
    assert (synthetic / "out" / "compare.png").stat().st_size > 1000
    assert len(pd.read_parquet(synthetic / "out" / "compare.parquet")) == 12


def test_bad_input_is_one_line_and_exit_2(synthetic, capsys):
    base = ["--code", str(synthetic), "--ours", str(synthetic / "ours"), "--out", str(synthetic / "o")]
    assert cli.main(["compare-official", *base, "--log", str(synthetic / "nowhere")]) == 2
    assert "expected LDAM-DRW's log_test.csv" in capsys.readouterr().err
    (synthetic / "empty.csv").write_text("Epoch: [0][0/97]\n")
    assert cli.main(["compare-official", *base, "--log", str(synthetic / "empty.csv")]) == 2
    assert "no 'val Results" in capsys.readouterr().err
    assert cli.main(["compare-official", *base, "--log", str(synthetic / "run"), "--view", "ensemble"]) == 2
    assert "no view 'ensemble'; its views: expert0, expert0_pc" in capsys.readouterr().err
    assert not (synthetic / "o").exists()


@pytest.mark.slow
def test_job_script_runs(synthetic):
    done = subprocess.run([sys.executable, "jobs/compare_official.py", "--code", str(synthetic), "--ours",
                           str(synthetic / "ours"), "--log", str(synthetic / "run"), "--out", str(synthetic / "j")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (synthetic / "j" / "compare.md").is_file() and "Last and best" in done.stdout


# -- the difference the one-step comparison found: the linear classifier's initialisation --------------------------


def _head(keys: list[str]) -> torch.Tensor:
    from rayexperts.methods import METHODS

    cfg = load_config("cifar10_lt_if100_ce", keys)
    torch.manual_seed(0)
    model = METHODS.get(cfg.method)(cfg, torch.tensor(COUNTS, dtype=torch.float32), 3).build_model()
    return model.heads[0].weight.detach()


def test_official_ce_head_is_kaiming_normal_as_ldam_drw(one_torch_thread):
    """LDAM-DRW's ``_weights_init`` draws the 64 -> 10 linear layer's weights N(0, 2/64) (std 0.177); PyTorch's
    default is U(-1/8, 1/8) (std 0.072). compat=official must give the former, compat=paper keeps the latter."""
    official, paper = _head(["compat=official"]), _head([])
    assert paper.abs().max() <= 1 / 8  # the uniform bound 1/sqrt(64)
    assert official.abs().max() > 1 / 8  # 640 normal draws with std 0.177 all inside 1/8: probability ~ 1e-180
    assert 0.15 < official.std().item() < 0.21 and 0.06 < paper.std().item() < 0.085
    assert load_config("cifar10_lt_if100_ce", ["compat=official"]).model.head_init == "kaiming_normal"


def test_head_init_refuses_cosine_classifier():
    from rayexperts.config import ConfigError
    from rayexperts.models.experts import MultiExpertNet

    with pytest.raises(ConfigError, match="model.head_init=kaiming_normal applies to the linear classifier, not "
                                          "model.classifier=cosine"):
        load_config(None, ["model.head_init=kaiming_normal", "model.classifier=cosine"])

    with pytest.raises(ValueError, match="applies to the linear classifier, not 'cosine'"):
        MultiExpertNet(backbone="resnet8", num_classes=10, classifier="cosine", head_init="kaiming_normal")
    with pytest.raises(ValueError, match="unknown head_init 'xavier'"):
        MultiExpertNet(backbone="resnet8", num_classes=10, head_init="xavier")


# -- the one-step check, against a stand-in for the authors' checkout ------------------------------------------------

# An independent CIFAR ResNet-32 (He et al. 2016, option-A shortcuts) under LDAM-DRW's module names, and an lr
# schedule with LDAM-DRW's shape, written here for the test: a stand-in for the authors' checkout, not their code.
STAND_IN_MODEL = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride, eps):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None
        self.stride = stride

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class Net(nn.Module):
    def __init__(self, num_classes, eps):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, eps=eps)
        cin, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            layers.append(nn.Sequential(*[Block(cin if b == 0 else width, width, stride if b == 0 else 1, eps)
                                          for b in range(5)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet32(num_classes=10, use_norm=False):
    return Net(num_classes, EPS)
'''
STAND_IN_SCHEDULE = '''
import this_module_does_not_exist  # only adjust_learning_rate is taken from this file


def adjust_learning_rate(optimizer, epoch, args):
    epoch = epoch + 1
    lr = args.lr * epoch / 5 if epoch <= 5 else args.lr * (0.0001 if epoch > 180 else 0.01 if epoch > 160 else 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
'''
ARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "epochs": 200, "cls_num_list": COUNTS}


@pytest.mark.slow
@pytest.mark.parametrize("eps, agrees", [(1e-5, True), (1e-3, False)])
def test_one_step_agrees_with_an_identical_stand_in_and_catches_a_bn_eps(tmp_path, one_torch_thread, eps, agrees):
    from rayexperts.launch.compare import one_step, one_step_report

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet_cifar.py").write_text(STAND_IN_MODEL + f"\nEPS = {eps}\n")
    (tmp_path / "cifar_train.py").write_text(STAND_IN_SCHEDULE)
    cfg = load_config("cifar10_lt_if100_ce", ["compat=official"])
    res = one_step(tmp_path, cfg, ARGS, steps=1, batch_size=16, init_draws=1)
    first = res["steps"].iloc[0]
    assert res["lr_max_diff"] < 1e-12  # the official schedule: warm-up, x0.01 after 160 and after 180
    assert res["init"]["linear weights"][1] == pytest.approx(res["init"]["linear weights"][3], rel=0.25)
    if agrees:
        assert first["loss_diff"] < 1e-5 and first["grad_diff"] < 1e-4 * first["grad_max"] and first["weight_diff"] < 1e-5
    else:
        assert first["loss_diff"] > 1e-4 or first["grad_diff"] > 1e-3 * first["grad_max"]
    assert "| 1 |" in one_step_report(res)
    # compat=paper trains another schedule (x0.1 at 160/180, wd 5e-4): the check sees it
    paper = one_step(tmp_path, load_config("cifar10_lt_if100_ce", []), ARGS, steps=1, batch_size=16, init_draws=1)
    assert paper["lr_max_diff"] > 1e-4
