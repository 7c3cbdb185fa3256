"""Search spaces, the sweep's checks, and a 4-trial ASHA sweep on digits-lt through Ray Tune + Train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rayexperts.config import ConfigError, load_config
from rayexperts.launch.tune import check_same_sweep, load_space, run_sweep, sweep_config
from rayexperts.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "tune_spaces"


@pytest.mark.parametrize("method", ["ncl", "ecl", "mllt", "cbd", "ride", "sade", "balpoe"])
def test_shipped_spaces_are_valid(method):
    extra = ["balpoe.tau_spread=1.0"] if method == "balpoe" else []  # the space's usage line sets it
    cfg = load_config("cbd_digits" if method == "cbd" else None, [f"method={method}", *extra])
    assert sorted(p.stem for p in SPACES.glob("*.yaml")) == ["balpoe", "cbd", "ecl", "mllt", "ncl", "ride", "sade"]
    space = load_space(SPACES / f"{method}.yaml", cfg)
    assert space and all(len(dist) == 1 for dist in space.values())


@pytest.mark.parametrize(
    "text, message",
    [
        ("ncl.distil_weight: {uniform: [0.2, 1.0]}",
         "key 'ncl.distil_weight': unknown config key for method=ncl; did you mean ncl.distill_weight"),
        ("ncl.hard_ratio: {normal: [0, 1]}", "key 'ncl.hard_ratio': unknown distribution 'normal'"),
        ("ncl.hard_ratio: 0.3", "key 'ncl.hard_ratio': 0.3 is not a distribution"),
        ("train.lr: {uniform: [0.1, 0.01]}", "key 'train.lr': 'uniform' needs \\[low, high\\]"),
        ("train.lr: {loguniform: [0, 0.1]}", "key 'train.lr': 'loguniform' needs low > 0"),
        ("model.num_experts: {uniform: [2, 4]}", "key 'model.num_experts': .*Integer"),
        ("model.classifier: {choice: [linear, mlp]}", "key 'model.classifier': .*invalid value .*'mlp'"),
        ("ncl.hard_ratio: {choice: [0.3, 1.5]}", "key 'ncl.hard_ratio': 'ncl.hard_ratio' must lie in"),
        ("cbd.teacher_runs: {choice: [[teacher0]]}", "key 'cbd.teacher_runs': unknown config key for method=ncl"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"search space '{path}', {message}"):
        load_space(path, load_config(None, ["method=ncl"]))


def test_cbd_teacher_names_are_checked(tmp_path):
    path = tmp_path / "cbd.yaml"
    path.write_text("cbd.teacher_runs: {choice: [[teacher0, teacher4]]}\n")
    with pytest.raises(ConfigError, match="teacher0, teacher1, teacher2, teacher3"):
        load_space(path, load_config("cbd_digits"))


def test_sweep_never_tunes_on_the_test_split(monkeypatch):
    with pytest.raises(ConfigError, match="not a validation metric"):
        sweep_config(load_config(None, ["tune.metric=top1"]))
    cfg = sweep_config(load_config(None, ["method=ce", "run.name=s"]))  # digits-lt: val carved from unused images
    assert cfg.data.val_per_class == cfg.tune.val_per_class > 0

    class NoVal:
        val = None

    monkeypatch.setattr("rayexperts.launch.tune.build_dataset", lambda data_cfg: NoVal())
    with pytest.raises(ConfigError, match="gives no validation split"):
        sweep_config(load_config(None, ["method=ce"]))


def test_a_sweep_dir_of_another_sweep_is_refused(tmp_path):
    cfg = load_config(None, ["method=ncl"])
    space = load_space(SPACES / "ncl.yaml", cfg)
    sweep = RunDir.of(str(tmp_path), "s")
    check_same_sweep(sweep, cfg, space)
    check_same_sweep(sweep, cfg, space)  # the same sweep continues
    with pytest.raises(ConfigError, match="another config or search space"):
        check_same_sweep(sweep, load_config(None, ["method=ncl", "train.lr=0.3"]), space)


def test_tuned_view_metrics_come_from_the_report(tmp_path):
    from rayexperts.engine.worker import reported_metrics
    from rayexperts.launch.tune import _last_row, view_metrics

    rows = [{"epoch": 1, "view": v, "top1": t, "val_top1": t / 2} for v, t in (("ensemble", 0.4), ("expert0", 1.1))]
    reported = reported_metrics(1, {"loss": 2.0}, rows, "ensemble")
    assert reported["top1"] == pytest.approx(0.4) and reported["expert0/top1"] == pytest.approx(1.1)
    chosen = view_metrics(reported, "expert0")
    assert chosen["top1"] == pytest.approx(1.1) and chosen["val_top1"] == pytest.approx(0.55)
    assert chosen["view"] == "expert0" and chosen["loss"] == 2.0
    assert view_metrics(reported, "") == reported and view_metrics({"epoch": 0, "loss": 1.0}, "expert0")["loss"] == 1.0
    with pytest.raises(ValueError, match="views: ensemble, expert0"):
        view_metrics(reported, "expert9")
    table = pd.DataFrame([{"epoch": e, "view": v, "val_top1": 0.2 * e} for e in range(3) for v in ("expert0", "ensemble")])
    last = _last_row(table, "ensemble")
    assert last["epoch"] == 2 and last["val_top1"] == pytest.approx(0.4) and "view" not in last
    assert _last_row(None, "ensemble") == {}


@pytest.mark.ray
def test_asha_sweep_on_digits(ray_cluster, tmp_path):
    overrides = [
        "method=mllt", f"run.storage_path={tmp_path}", "run.name=sweep", "run.verbose=false",
        "train.epochs=2", "tune.num_samples=3", "tune.scheduler=asha", "scaling.cpus_per_worker=1",
    ]
    cfg = load_config(None, overrides)
    space = load_space(SPACES / "mllt.yaml", cfg)
    out = run_sweep(cfg, space)
    root = tmp_path / "sweep"
    trials = pd.read_parquet(root / "trials.parquet")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert {"trial_id", "status", "run", *space, "top1", "top1_many", "val_top1", "val_top1_few"} <= set(trials.columns)
    assert set(trials["status"]) <= {"completed", "stopped"} and (trials["status"] == "completed").any()
    assert (trials.loc[trials["status"] == "stopped", "epochs_done"] < 2).all()
    assert list(root.glob("experiment_state-*.json")) and (root / "tuner.pkl").exists()

    # The tuned metric comes from the validation split: 20 unused training images per class,
    # disjoint from the 300 test images, and the test split is reported beside it.
    assert (trials["val_num_samples"] == 10 * cfg.tune.val_per_class).all() and (trials["num_samples"] == 300).all()
    assert list(trials["run"]) == [f"tune_{t}" for t in trials["trial_id"]]
    trial_cfg = load_config(root / trials["run"][0] / "config.yaml")
    assert trial_cfg.data.val_per_class == cfg.tune.val_per_class
    from rayexperts.data import build_dataset

    data = build_dataset(trial_cfg.data)
    val, test = data.val.images.reshape(len(data.val.labels), -1), data.test.images.reshape(len(data.test.labels), -1)
    assert not (val[:, None, :] == test[None, :, :]).all(-1).any()

    best = load_config(root / "best.yaml")
    assert best.run.name == "sweep-best" and str(out["best"]["trial_id"]) in (root / "best.yaml").read_text()
    assert best.data.val_per_class == cfg.tune.val_per_class

    # Re-running the same sweep continues it (Tune restore): the same trials, nothing retrained.
    again = run_sweep(load_config(None, overrides), space)
    assert sorted(again["trials"]["trial_id"]) == sorted(trials["trial_id"])
    assert np.allclose(again["trials"]["val_top1"], trials["val_top1"])

    from rayexperts.analysis import load_sweep
    from rayexperts.report import write_report

    assert load_sweep(root).keys == list(space)
    assert (write_report(root).parent / "sweep_model.num_experts.png").exists()


@pytest.mark.ray
def test_grid_values_repeat_num_samples_times_and_max_concurrent_trials_run_at_once(ray_cluster, tmp_path):
    """A ``grid`` of 2 values with ``tune.num_samples=2`` gives 4 trials, each value twice, each trial
    in its own run directory; with ``tune.max_concurrent=1`` no two trials' training overlaps in time."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.lr: {grid: [0.05, 0.2]}\n")
    cfg = load_config(None, ["method=ce", f"run.storage_path={tmp_path}", "run.name=grid", "run.verbose=false",
                             "train.epochs=1", "tune.num_samples=2", "tune.max_concurrent=1",
                             "tune.scheduler=fifo", "scaling.cpus_per_worker=1"])
    out = run_sweep(cfg, load_space(space_file, cfg))
    trials = out["trials"]
    assert sorted(trials["train.lr"]) == [0.05, 0.05, 0.2, 0.2] and trials["run"].is_unique
    spans = []
    for run in trials["run"]:
        metrics = pd.read_parquet(tmp_path / "grid" / run / "metrics.parquet")
        assert load_config(tmp_path / "grid" / run / "config.yaml").train.lr in (0.05, 0.2)
        spans.append((float((metrics["timestamp"] - metrics["train_seconds"]).min()), float(metrics["timestamp"].max())))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
