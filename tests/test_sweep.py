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


# ------------------------------------------------------------------------------- the trials of a sweep


MLLT_SPACE = {"model.num_experts": {"choice": [2, 3, 4]}, "mllt.teacher": {"choice": ["ensemble", "individual"]},
              "model.expert_width": {"choice": [0.5, 0.75, 1.0]}}  # tune_spaces/mllt.yaml: 18 points


def _resolved(plan, i: int) -> dict:
    """The config Tune resolves for the plan's i-th trial (its keys read the trial's point, as Tune calls them)."""
    from rayexperts.launch.tune import POINT_KEY

    return {k: d.func({POINT_KEY: i}) for k, d in plan.param_space.items() if k != POINT_KEY}


def test_an_all_discrete_space_draws_distinct_points():
    from rayexperts.launch.tune import POINT_KEY, plan_trials

    plan = plan_trials(MLLT_SPACE, 8, seed=0)
    assert plan.note == "all-discrete space of 18 points: 8 distinct points drawn (seed 0)"
    assert len(plan.points) == 8 and len({tuple(p.values()) for p in plan.points}) == 8
    assert all(p[k] in MLLT_SPACE[k]["choice"] for p in plan.points for k in MLLT_SPACE)
    assert all(list(p) == list(MLLT_SPACE) for p in plan.points)  # one value per searched key, in the space's order
    # Tune runs each point once: a grid over their indices, num_samples 1, every key resolved from its point.
    assert plan.num_samples == 1 and plan.param_space[POINT_KEY] == {"grid_search": list(range(8))}
    assert [_resolved(plan, i) for i in range(8)] == plan.points
    assert plan_trials(MLLT_SPACE, 8, seed=0).points == plan.points  # seeded by the config's seed
    assert plan_trials(MLLT_SPACE, 8, seed=1).points != plan.points


def test_an_all_discrete_space_is_gridded_when_num_samples_covers_it():
    from itertools import product

    from rayexperts.launch.tune import plan_trials

    every = [dict(zip(MLLT_SPACE, combo)) for combo in product(*(d["choice"] for d in MLLT_SPACE.values()))]
    exact = plan_trials(MLLT_SPACE, 18, seed=0)
    assert exact.points == every
    assert exact.note == "all-discrete space of 18 points: a grid of 18 trials (tune.num_samples=18)"
    more = plan_trials(MLLT_SPACE, 20, seed=0)
    assert more.points == every
    assert more.note == ("all-discrete space of 18 points: a grid of 18 trials, "
                         "tune.num_samples=20 is more than the space holds")
    # A value written twice is one point; list values (cbd.teacher_runs) are values like any other.
    lists = plan_trials({"cbd.teacher_runs": {"choice": [["teacher0"], ["teacher0", "teacher1"], ["teacher0"]]}}, 8, 0)
    assert lists.points == [{"cbd.teacher_runs": ["teacher0"]}, {"cbd.teacher_runs": ["teacher0", "teacher1"]}]


def test_grid_keys_are_enumerated_and_continuous_spaces_sampled_as_before():
    from rayexperts.launch.tune import plan_trials

    # choice + grid: every grid value, each with distinct choice points (no duplicate trial).
    mixed = plan_trials({"train.lr": {"grid": [0.05, 0.2]}, "model.num_experts": {"choice": [2, 3, 4]}}, 2, seed=0)
    assert sorted(p["train.lr"] for p in mixed.points) == [0.05, 0.05, 0.2, 0.2]
    assert len({tuple(p.values()) for p in mixed.points}) == 4
    assert mixed.note == ("all-discrete space of 6 points: 2 distinct points drawn for each of the 2 grid points "
                          "(seed 0): 4 trials")
    # grid only: Tune repeats each point tune.num_samples times (README: repeats measure the noise).
    grid = plan_trials({"train.lr": {"grid": [0.05, 0.2]}}, 2, seed=0)
    assert grid.points is None and grid.num_samples == 2
    assert grid.param_space == {"train.lr": {"grid_search": [0.05, 0.2]}}
    assert grid.note == "grid-only space of 2 points: each repeated tune.num_samples=2 times (4 trials)"
    # a continuous key: Tune's random sampling, num_samples trials, nothing to say.
    sampled = plan_trials({"train.lr": {"uniform": [0.05, 0.2]}, "model.num_experts": {"choice": [2, 3]}}, 8, seed=0)
    assert sampled.points is None and sampled.num_samples == 8 and sampled.note == "" and set(sampled.param_space) == {
        "train.lr", "model.num_experts"}


# ------------------------------------------------------------------------------- what the user sees


def _fake_sweep(monkeypatch, rows: list[dict], failures: list[dict] | None = None):
    """``main`` over a sweep that did not run: ``run_sweep`` returns ``rows`` as its trials."""
    from rayexperts.analysis import best_trial
    from rayexperts.launch import tune

    def run_sweep(cfg, space):
        trials = pd.DataFrame(rows)
        best = best_trial(trials, str(cfg.tune.metric), str(cfg.tune.mode))
        return {"path": "/sweeps/s", "trials": trials, "best": best, "config": cfg,
                "ties": tune.best_ties(trials, best, str(cfg.tune.metric)), "failures": failures or []}

    monkeypatch.setattr(tune, "run_sweep", run_sweep)


def _row(trial_id, status, val, test, experts=2, epochs=2):
    return {"trial_id": trial_id, "status": status, "run": f"tune_{trial_id}", "epochs_done": epochs,
            "model.num_experts": experts, "val_top1": val, "top1": test}


def test_the_trials_table_shows_percent_and_ties_are_reported(monkeypatch, capsys):
    from rayexperts.launch.tune import main

    _fake_sweep(monkeypatch, [_row("a_00000", "completed", 0.712, 0.60), _row("a_00001", "stopped", 0.712, 0.50, 3, 1),
                              _row("a_00002", "completed", 0.712, 0.55, 4),
                              _row("a_00003", "completed", 0.40, 0.41, 3)])
    assert main(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("trial_id"))
    assert "val_top1 (%)" in header and "test top1 (%)" in header and "epochs_done" in header
    assert "71.20" in out and "0.712" not in out  # top-1 in %, the files keep fractions
    # the stopped trial ties too, but best_trial chooses among the completed ones
    assert "2 trials tie for the best val_top1 (71.20 %): a_00000, a_00002; the first is written to best.yaml" in out
    assert "best trial a_00000: val_top1 = 71.20 % (validation); test top1 = 60.00 %" in out

    _fake_sweep(monkeypatch, [_row("a_00000", "completed", 0.712, 0.60), _row("a_00001", "completed", 0.70, 0.5)])
    assert main(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    assert "tie" not in capsys.readouterr().out


def test_a_failed_trial_is_named_with_its_error_and_directory(monkeypatch, capsys):
    from rayexperts.launch.tune import main

    failure = {"trial_id": "a_00001", "error": "ValueError: boom", "path": "/sweeps/s/tune_a_00001"}
    _fake_sweep(monkeypatch, [_row("a_00000", "completed", 0.5, 0.4), _row("a_00001", "error", np.nan, np.nan, 3, 0)],
                [failure])
    assert main(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    out = capsys.readouterr().out
    assert ("trial a_00001 failed: ValueError: boom; trial directory /sweeps/s/tune_a_00001 "
            "(error.txt there holds the traceback)") in out
    assert "best trial a_00000" in out

    _fake_sweep(monkeypatch, [_row("a_00001", "error", np.nan, np.nan, 3, 0)], [failure])
    assert main(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 1
    captured = capsys.readouterr()
    assert "trial a_00001 failed: ValueError: boom" in captured.out
    assert "no trial reported the tuned metric val_top1: all 1 trials failed" in captured.out + captured.err


def test_error_line_is_the_innermost_error_in_one_line():
    from rayexperts.launch.tune import error_line

    class Wrapper(RuntimeError):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  File ...\nValueError: deep")
            self.cause = cause

    assert error_line(Wrapper(ValueError("deep"))) == "ValueError: deep"
    assert error_line(KeyError("x")) == "KeyError: 'x'"
    assert error_line(RuntimeError("first\nlast line")) == "RuntimeError: last line"


def test_trials_are_quiet_unless_run_verbose_is_chosen(tmp_path):
    from rayexperts.launch.tune import verbose_chosen

    assert not verbose_chosen(None, ["method=mllt", "train.epochs=2"])
    assert verbose_chosen(None, ["run.verbose=true"]) and verbose_chosen(None, ["run.verbose=false"])
    preset = tmp_path / "p.yaml"
    preset.write_text("method: mllt\nrun:\n  verbose: true\n")
    assert verbose_chosen(str(preset), [])
    preset.write_text("method: mllt\n")
    assert not verbose_chosen(str(preset), [])


def test_a_sweep_continues_with_another_run_verbose(tmp_path):
    cfg = load_config(None, ["method=ncl", "run.verbose=false"])
    space = load_space(SPACES / "ncl.yaml", cfg)
    sweep = RunDir.of(str(tmp_path), "s")
    check_same_sweep(sweep, cfg, space)
    check_same_sweep(sweep, load_config(None, ["method=ncl", "run.verbose=true"]), space)  # only the console differs


def test_the_quiet_console_is_put_back():
    import logging
    import os

    from rayexperts.launch.tune import tune_console

    names = ("RAY_AIR_NEW_OUTPUT", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S")
    before = {k: os.environ.get(k) for k in names}
    level = logging.getLogger("ray.tune.tune").level
    with tune_console(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"
        assert logging.getLogger("ray.tune.tune").level == logging.WARNING
    assert {k: os.environ.get(k) for k in before} == before and logging.getLogger("ray.tune.tune").level == level
    with tune_console(verbose=True):
        assert os.environ.get("RAY_AIR_NEW_OUTPUT") == before["RAY_AIR_NEW_OUTPUT"]


@pytest.mark.ray
def test_a_sweep_is_quiet_by_default_and_names_failed_trials(ray_cluster, tmp_path, capfd):
    """The same 2-trial sweep (an all-discrete space: a grid of 2) printed quietly by default and with
    run.verbose=true; then a sweep whose trials fail at run time (a tune.view the run does not have)."""
    import time

    from rayexperts.launch.tune import main

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {choice: [0.05, 0.2]}\n")
    common = ["--space", str(space), "method=ncl", f"run.storage_path={tmp_path}", "train.epochs=2",
              "tune.scheduler=fifo", "scaling.cpus_per_worker=1"]

    def run(*extra: str) -> tuple[int, str]:
        capfd.readouterr()
        status = main([*common, *extra])
        time.sleep(2)  # the trials' own lines reach the driver through Ray's log monitor
        out = capfd.readouterr()
        return status, out.out + out.err

    status, quiet = run("run.name=quiet")
    assert status == 0
    assert "all-discrete space of 2 points: a grid of 2 trials, tune.num_samples=8 is more than the space holds" \
        in quiet
    assert quiet.count("[sweep] trial ") == 2 and "completed after epoch 2/2: val_top1 " in quiet
    assert "Checkpoint successfully created" not in quiet and "| epoch 1/2 |" not in quiet
    status, verbose = run("run.name=verbose", "run.verbose=true")
    assert status == 0
    assert "Checkpoint successfully created" in verbose and "| epoch 1/2 |" in verbose
    assert 5 * len(quiet.splitlines()) < len(verbose.splitlines()), (len(quiet.splitlines()), len(verbose.splitlines()))

    status, failed = run("run.name=failing", "tune.view=expert9")
    assert status == 1
    trials = pd.read_parquet(tmp_path / "failing" / "trials.parquet")
    assert list(trials["status"]) == ["error", "error"]
    for run_dir in trials["run"]:
        line = (f"failed: ValueError: tune.view='expert9' is not a view of this run; views: ensemble, expert0, "
                f"expert1, expert2; trial directory {tmp_path / 'failing' / run_dir} "
                "(error.txt there holds the traceback)")
        assert line in failed
        assert (tmp_path / "failing" / run_dir / "error.txt").is_file()
    assert "no trial reported the tuned metric val_top1: all 2 trials failed" in failed
    assert "Trial task failed for trial" not in failed  # Tune's traceback stays in error.txt


def test_a_sweep_needs_a_trial():
    with pytest.raises(ConfigError, match="tune.num_samples=0: a sweep needs at least 1 trial"):
        sweep_config(load_config(None, ["method=ce", "tune.num_samples=0"]))
