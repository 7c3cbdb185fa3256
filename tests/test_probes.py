"""Representation probes (rayexperts.eval.probes) on synthetic features with known answers,
and end to end on a tiny digits-lt run directory built without Ray."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from rayexperts.eval import probes as P

GROUPS4 = np.array(["many", "many", "few", "few"])


def clusters(counts: list[int], dim: int = 8, spread: float = 0.3, sep: float = 3.0, seed: int = 0):
    """Gaussian clusters around ``sep`` × the first unit vectors: class j has counts[j] samples."""
    g = torch.Generator().manual_seed(seed)
    means = sep * torch.eye(len(counts), dim)
    x = torch.cat([means[j] + spread * torch.randn(n, dim, generator=g) for j, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(counts)])
    return x, y


# -- scoring and sampling -------------------------------------------------------------------
def test_top1_by_group_counts_samples_and_leaves_empty_groups_nan():
    scores = torch.eye(4)[[0, 1, 1, 3]]  # predictions 0, 1, 1, 3
    labels = torch.tensor([0, 1, 2, 3])
    acc = P.top1_by_group(scores, labels, GROUPS4)
    assert acc["top1"] == 0.75 and acc["top1_many"] == 1.0 and acc["top1_few"] == 0.5
    assert math.isnan(acc["top1_medium"])


def test_class_balanced_batches_draw_classes_uniformly():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.cat(P._batches(labels, 128, True, gen)) for _ in range(10)])
    share = torch.bincount(labels[idx], minlength=3).double() / len(idx)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)
    assert sorted(torch.cat(P._batches(labels, 128, False, gen)).tolist()) == list(range(1000))


def test_schedules_follow_mllt_and_cosine():
    fa = P.ProbeOptions().feature_accuracy
    assert (fa.epochs, fa.lr, fa.milestones) == (200, 0.1, (160, 180))
    assert [fa.lr_at(e) for e in (0, 159, 160, 180)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert P.SGDSchedule(10, 0.2).lr_at(5) == pytest.approx(0.1)


# -- probes on synthetic features --------------------------------------------------------------
def test_feature_accuracy_separable_clusters_is_one():
    x, y = clusters([50, 20, 8, 3])
    scores = P.feature_accuracy(x, y, 4)
    assert P.top1_by_group(scores, y, GROUPS4)["top1"] == 1.0


def test_ncm_well_separated_means_is_one_and_uses_directions():
    x, y = clusters([50, 20, 8, 3])
    test_x, test_y = clusters([10, 10, 10, 10], seed=1)
    scores = P.ncm(x, y, 5.0 * test_x, 4)  # scale-free: cosine to the class means
    assert P.top1_by_group(scores, test_y, GROUPS4)["top1"] == 1.0
    assert scores.max() <= 1 + 1e-6


def test_tau_norm_zero_is_the_plain_classifier_and_one_normalises_rows():
    g = torch.Generator().manual_seed(0)
    w, b, v = torch.randn(5, 7, generator=g), torch.randn(5, generator=g), torch.randn(11, 7, generator=g)
    assert torch.allclose(P.tau_norm(w, b, v, 0.0), v @ w.T + b)
    assert torch.allclose(P.tau_norm(w, None, v, 1.0), v @ F.normalize(w, dim=1).T)


def test_lws_scales_each_class_logit_by_one_learned_factor():
    """z̃_j = f_j · z_j: every test logit of class j is multiplied by the same learned f_j, and on a head
    whose head-class logits are doubled the tail classes' factors come out larger."""
    x, y = clusters([400, 400, 10, 10], spread=1.5, sep=2.0)
    test_x, _ = clusters([50] * 4, spread=1.5, sep=2.0, seed=1)
    head_bias = torch.tensor([2.0, 2.0, 1.0, 1.0])
    logits = lambda v: 16 * F.normalize(v, dim=1) @ torch.eye(4, 8).T * head_bias  # noqa: E731
    plain = logits(test_x)
    ratio = P.lws(logits(x), y, plain, P.SGDSchedule(2, 0.1)) / plain
    f = ratio.median(0).values
    torch.testing.assert_close(ratio, f.expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert f[2:].min() > f[:2].max()


def test_lws_undoes_a_head_favouring_logit_scale():
    x, y = clusters([400, 400, 10, 10], spread=1.5, sep=2.0)
    test_x, test_y = clusters([200] * 4, spread=1.5, sep=2.0, seed=1)
    # a cosine classifier (γ = 16) on the true class directions whose head-class logits are doubled
    head_bias = torch.tensor([2.0, 2.0, 1.0, 1.0])

    def logits(v: torch.Tensor) -> torch.Tensor:
        return 16 * F.normalize(v, dim=1) @ torch.eye(4, 8).T * head_bias

    plain = logits(test_x)
    scaled = P.lws(logits(x), y, plain)
    before, after = (P.top1_by_group(s, test_y, GROUPS4)["top1_few"] for s in (plain, scaled))
    assert after > before + 0.1


def test_crt_improves_few_shot_over_the_instance_trained_classifier():
    x, y = clusters([400, 400, 10, 10], spread=1.5, sep=2.0)
    test_x, test_y = clusters([200] * 4, spread=1.5, sep=2.0, seed=1)
    schedule = P.SGDSchedule(30, 0.1)
    layer = P.train_linear(x, y, 4, schedule)
    with torch.no_grad():
        instance = layer(test_x)
    balanced = P.crt(x, y, test_x, 4, schedule)
    acc_i, acc_b = (P.top1_by_group(s, test_y, GROUPS4) for s in (instance, balanced))
    assert acc_b["top1_few"] > acc_i["top1_few"] + 0.1
    assert acc_b["top1"] > acc_i["top1"]


def test_feature_distance_is_ecl_eq12_mean_of_per_sample_distances():
    a = torch.zeros(4, 2)
    b = torch.tensor([[3.0, 0.0], [0.0, 5.0], [0.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    d = P.feature_distance(a, b, labels, 3)
    assert d[:2].tolist() == pytest.approx([4.0, math.sqrt(2) / 2])  # (3+5)/2, (0+√2)/2
    assert math.isnan(d[2])  # no test image of class 2
    summary = P.distance_by_group(d, np.array(["many", "few", "few"]))
    assert summary["distance"] == pytest.approx((4 + math.sqrt(2) / 2) / 2)
    assert summary["distance_few"] == pytest.approx(math.sqrt(2) / 2) and math.isnan(summary["distance_medium"])


# -- end to end: a tiny run directory, no Ray -------------------------------------------------
FAST = P.ProbeOptions(
    feature_accuracy=P.SGDSchedule(20, 0.1, 128, (16, 18)), crt=P.SGDSchedule(2, 0.1), lws=P.SGDSchedule(2, 0.1)
)


def make_run_dir(root: Path, method: str, experts: int) -> Path:
    from rayexperts.config import load_config, to_yaml
    from rayexperts.engine.run import Run
    from rayexperts.engine.loop import train_epoch
    from rayexperts.rundir import save_checkpoint

    name = f"{method}{experts}"
    overrides = [f"method={method}", "data.name=digits-lt", "train.epochs=1", f"model.num_experts={experts}"]
    cfg = load_config(None, overrides + [f"run.storage_path={root}", f"run.name={name}"])
    run = Run(cfg)
    train_epoch(run, 0)
    run_dir = root / name
    (run_dir / "checkpoint_000").mkdir(parents=True)
    save_checkpoint(run_dir / "checkpoint_000", model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs"), "ce", 2)


def test_run_probes_writes_one_row_per_probe_and_expert(ce_run):
    df = P.run_probes(ce_run, options=FAST)
    assert list(df.columns) == P.COLUMNS
    assert pd.read_parquet(ce_run / "probes.parquet").equals(df)
    experts = {p: df.loc[df.probe == p, "expert"].tolist() for p in P.PROBES}
    for p in ("feature_accuracy", "ncm", "crt"):
        assert experts[p] == ["expert0", "expert1", "concat"]
    assert experts["tau_norm"] == experts["lws"] == ["expert0", "expert1", "ensemble"]
    assert experts["feature_distance"] == ["expert0-expert1", "mean"]
    acc = df[df.probe != "feature_distance"]
    assert acc["top1"].between(0, 1).all() and acc["top1_few"].notna().all()
    # digits is easy: a linear layer on the test features nearly fits them, above chance (10 %) on NCM
    assert acc.loc[acc.probe == "feature_accuracy", "top1"].min() > 0.8
    assert acc.loc[acc.probe == "ncm", "top1"].min() > 0.3
    assert (df.loc[df.probe == "feature_distance", "distance"] > 0).all()


def test_tau_norm_of_a_cosine_classifier_is_nan_with_a_note(tmp_path):
    run_dir = make_run_dir(tmp_path, "mllt", 2)
    df = P.run_probes(run_dir, probes=["tau_norm"])
    assert df["top1"].isna().all() and df["note"].str.contains("cosine").all()


def test_missing_config_or_checkpoint_names_the_directory(tmp_path, ce_run):
    with pytest.raises(P.ProbeError, match=str(tmp_path)):
        P.run_probes(tmp_path)
    (tmp_path / "config.yaml").write_text((ce_run / "config.yaml").read_text())
    with pytest.raises(P.ProbeError, match=f"{tmp_path}.*nothing to probe"):
        P.run_probes(tmp_path)
    with pytest.raises(P.ProbeError, match="unknown probe"):
        P.run_probes(ce_run, probes=["knn"])


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rayexperts.eval", *args], capture_output=True, text=True, env=env)


def test_cli_prints_the_table_and_fails_cleanly(ce_run, tmp_path):
    ok = cli("probes", str(ce_run), "--probes", "ncm,lws,feature_distance", "--lws-epochs", "1")
    assert ok.returncode == 0, ok.stderr
    assert "ncm" in ok.stdout and "lws" in ok.stdout and "expert0-expert1" in ok.stdout
    missing = tmp_path / "no_such_run"
    bad = cli("probes", str(missing))
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and str(missing) in bad.stderr and "Traceback" not in bad.stderr
