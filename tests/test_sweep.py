"""Search spaces, the sweep's checks, and a 4-trial ASHA sweep on digits-lt through Ray Tune + Train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rayexperts.config import ConfigError, load_config
from rayexperts.launch.tune import check_same_sweep, load_space, run_sweep, sweep_config
from rayexperts.registry import METHODS
from rayexperts.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "tune_spaces"


def sweep_command(argv: list[str]) -> int:
    """``rayexperts sweep ARGV`` as the command line runs it (its exit status)."""
    from rayexperts import cli

    return cli.main(["sweep", *argv])


@pytest.mark.parametrize("method", sorted(p.stem for p in SPACES.glob("*.yaml")))
def test_shipped_spaces_are_valid(method):
    """Every shipped space (tune_spaces/<method>.yaml, named after a built-in method) is valid for its method."""
    assert method in METHODS.builtin_names()
    extra = ["balpoe.tau_spread=1.0"] if method == "balpoe" else []  # the space's usage line sets it
    cfg = load_config("cbd_digits" if method == "cbd" else None, [f"method={method}", *extra])
    space = load_space(SPACES / f"{method}.yaml", cfg)
    assert space and all(len(dist) == 1 for dist in space.values())


@pytest.mark.parametrize("method", sorted(p.stem for p in (SPACES / "pbt").glob("*.yaml")))
def test_shipped_pbt_spaces_are_continuous(method):
    """tune_spaces/pbt/<method>.yaml: every key continuous, as tune.scheduler=pbt needs."""
    from rayexperts.launch.sweep_search import check_search

    cfg = load_config(None, [f"method={method}", "tune.scheduler=pbt", "train.epochs=4"])
    check_search(cfg, load_space(SPACES / "pbt" / f"{method}.yaml", cfg))


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
    from rayexperts.engine.results import reported_metrics
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
    _fake_sweep(monkeypatch, [_row("a_00000", "completed", 0.712, 0.60), _row("a_00001", "stopped", 0.712, 0.50, 3, 1),
                              _row("a_00002", "completed", 0.712, 0.55, 4),
                              _row("a_00003", "completed", 0.40, 0.41, 3)])
    assert sweep_command(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("trial_id"))
    assert "val_top1 (%)" in header and "test top1 (%)" in header and "epochs_done" in header
    assert "71.20" in out and "0.712" not in out  # top-1 in %, the files keep fractions
    # the stopped trial ties too, but best_trial chooses among the completed ones
    assert "2 trials tie for the best val_top1 (71.20 %): a_00000, a_00002; the first is written to best.yaml" in out
    assert "best trial a_00000: val_top1 = 71.20 % (validation); test top1 = 60.00 %" in out

    _fake_sweep(monkeypatch, [_row("a_00000", "completed", 0.712, 0.60), _row("a_00001", "completed", 0.70, 0.5)])
    assert sweep_command(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    assert "tie" not in capsys.readouterr().out


def test_a_sweep_tuned_on_ece_shows_it_in_percent(monkeypatch, capsys):
    """ECE is a fraction in the files, as top-1 is: people read both in % (the trials table, the best line)."""
    from rayexperts.analysis import in_percent

    assert in_percent("val_ece") and in_percent("val_top1_few") and in_percent("top1")
    assert not in_percent("val_loss") and not in_percent("experts_per_sample")
    rows = [{**_row("a_00000", "completed", 0.70, 0.60), "val_ece": 0.0412},
            {**_row("a_00001", "completed", 0.71, 0.61), "val_ece": 0.0935}]
    _fake_sweep(monkeypatch, rows)
    assert sweep_command(["--space", str(SPACES / "mllt.yaml"), "method=mllt", "tune.metric=val_ece",
                          "tune.mode=min"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("trial_id"))
    assert "val_ece (%)" in header and "4.12" in out and "9.35" in out and "0.0412" not in out
    assert "best trial a_00000: val_ece = 4.12 % (validation); test top1 = 60.00 %" in out


def test_a_failed_trial_is_named_with_its_error_and_directory(monkeypatch, capsys):
    failure = {"trial_id": "a_00001", "error": "ValueError: boom", "path": "/sweeps/s/tune_a_00001"}
    _fake_sweep(monkeypatch, [_row("a_00000", "completed", 0.5, 0.4), _row("a_00001", "error", np.nan, np.nan, 3, 0)],
                [failure])
    assert sweep_command(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    out = capsys.readouterr().out
    assert ("trial a_00001 failed: ValueError: boom; trial directory /sweeps/s/tune_a_00001 "
            "(error.txt there holds the traceback)") in out
    assert "best trial a_00000" in out

    _fake_sweep(monkeypatch, [_row("a_00001", "error", np.nan, np.nan, 3, 0)], [failure])
    assert sweep_command(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 1
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

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {choice: [0.05, 0.2]}\n")
    common = ["--space", str(space), "method=ncl", f"run.storage_path={tmp_path}", "train.epochs=2",
              "tune.scheduler=fifo", "scaling.cpus_per_worker=1"]

    def run(*extra: str) -> tuple[int, str]:
        capfd.readouterr()
        status = sweep_command([*common, *extra])
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


# ------------------------------------------------------------------------------- searchers, schedulers, seeds (issue 40)


LR_SPACE = "train.lr: {loguniform: [0.02, 0.2]}\n"


def _space(tmp_path, text: str = LR_SPACE) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "space, overrides, message",
    [
        (LR_SPACE, ["tune.search=bayes"], "invalid value for 'tune.search': Invalid value 'bayes', expected one of "
                                          "['random', 'grid', 'optuna']"),
        ("model.num_experts: {choice: [2, 3]}\n", ["tune.scheduler=pbt"],
         "tune.scheduler=pbt perturbs every key of the search space; key 'model.num_experts' is choice, not continuous"),
        ("train.epochs: {randint: [2, 4]}\n", ["tune.scheduler=pbt"], "key 'train.epochs' is randint, not continuous"),
        (LR_SPACE, ["tune.seeds_per_config=0"], "tune.seeds_per_config=0: each configuration needs at least 1 seed"),
        ("train.lrr: {uniform: [0.1, 0.2]}\n", [], "key 'train.lrr': unknown config key for method=ce; did you mean"),
        (LR_SPACE, ["tune.search=grid"], "tune.search=grid needs discrete keys (choice or grid); key 'train.lr' is "
                                         "loguniform"),
        ("train.lr: {grid: [0.1, 0.2]}\n", ["tune.search=optuna"], "key 'train.lr' is a grid: write it as choice"),
        (LR_SPACE, ["tune.search=optuna", "tune.scheduler=pbt"], "tune.scheduler=pbt with tune.search=optuna"),
        (LR_SPACE, ["tune.scheduler=pbt", "tune.perturbation_interval=2"],
         "tune.perturbation_interval=2: PBT needs 1 <= interval < train.epochs=2"),
        (LR_SPACE, ["tune.scheduler=pbt", "train.epochs=4", "run.checkpoint_every=2", "tune.perturbation_interval=1"],
         "run.checkpoint_every=2 does not divide tune.perturbation_interval=1"),
        (LR_SPACE, ["tune.scheduler=pbt", "train.epochs=4", "scaling.num_workers=2"],
         "tune.scheduler=pbt with scaling.num_workers=2"),
        (LR_SPACE, ["tune.seeds_per_config=2", "scaling.num_workers=2"],
         "tune.seeds_per_config=2 with scaling.num_workers=2"),
    ],
)
def test_bad_sweep_input_is_one_line_before_ray(tmp_path, monkeypatch, capsys, space, overrides, message):
    from rayexperts.launch import tune

    def no_ray(**kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(tune, "ensure_ray", no_ray)
    status = sweep_command(["--space", _space(tmp_path, space), "method=ce", "train.epochs=2",
                        f"run.storage_path={tmp_path}", "run.name=s", *overrides])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()  # nothing written


def test_a_missing_optuna_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert sweep_command(["--space", _space(tmp_path), "method=ce", "tune.search=optuna"]) == 2
    assert capsys.readouterr().err.strip() == ("error: tune.search=optuna needs Optuna, which is not installed: "
                                               "pip install 'rayexperts[optuna]' (or pip install 'optuna>=3.4')")


def test_each_searcher_and_scheduler_is_what_tune_runs():
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from rayexperts.launch.sweep_pbt import LastEpochKept
    from rayexperts.launch.sweep_search import inside_bounds, scheduler, searcher

    space = {"train.lr": {"loguniform": [0.02, 0.2]}, "ncl.hard_ratio": {"uniform": [0.2, 1.0]}}
    cfg = load_config(None, ["method=ncl", "seed=3", "tune.num_samples=5", "train.epochs=4"])
    plan, alg = searcher(cfg, space, limit=2)
    assert isinstance(alg, BasicVariantGenerator) and plan.num_samples == 5 and plan.points is None
    optuna_cfg = load_config(None, ["method=ncl", "seed=3", "tune.num_samples=5", "tune.search=optuna"])
    plan, alg = searcher(optuna_cfg, space, limit=2)
    assert isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == 2 and isinstance(alg.searcher, OptunaSearch)
    assert alg.searcher._seed == 3  # Ray's OptunaSearch seeds its TPESampler with it
    assert plan.num_samples == 5 and plan.note == "Optuna TPE search (seed 3): 5 trials, at most 2 at once"
    grid_cfg = load_config(None, ["method=ncl", "tune.search=grid", "tune.num_samples=1"])
    plan, _ = searcher(grid_cfg, MLLT_SPACE, limit=1)
    assert len(plan.points) == 18 and len({tuple(p.values()) for p in plan.points}) == 18
    assert plan.note == "tune.search=grid: each of the 18 points of the space once (tune.num_samples=1 not used)"

    assert isinstance(scheduler(cfg, space), AsyncHyperBandScheduler)
    assert isinstance(scheduler(load_config(None, ["tune.scheduler=fifo"]), space), FIFOScheduler)
    pbt = scheduler(load_config(None, ["method=ncl", "tune.scheduler=pbt", "train.epochs=4",
                                       "tune.perturbation_interval=2"]), space)
    assert isinstance(pbt, LastEpochKept) and pbt._synch and pbt._perturbation_interval == 2 and pbt.last_epoch == 4
    assert set(pbt._hyperparam_mutations) == set(space) and pbt._time_attr == "epochs_done"
    # PBT multiplies by 0.8 / 1.2: the result is put back inside the space's bounds
    bounds = {"train.lr": (0.02, 0.2), "ncl.hard_ratio": (0.2, 1.0)}
    assert inside_bounds(bounds, {"train.lr": 0.24, "ncl.hard_ratio": 0.5, "seed": 1}) == {
        "train.lr": 0.2, "ncl.hard_ratio": 0.5, "seed": 1}
    assert inside_bounds(bounds, {"train.lr": 0.016, "ncl.hard_ratio": 1.2})["ncl.hard_ratio"] == 1.0


def test_trial_resources_pack_gpus_with_every_searcher(tmp_path):
    """Fractional GPUs, CPUs per trial and multi-worker trials pass the checks of every searcher (GPUs themselves
    cannot be tested here); a trial of 2 seeds counts 2 caches per process on its GPU share."""
    from rayexperts.data.device import processes_per_device
    from rayexperts.launch.sweep_search import check_search
    from rayexperts.launch.tune import DRIVER_RESOURCES, trial_resources

    space = {"train.lr": {"loguniform": [0.02, 0.2]}}
    for extra in (["tune.search=random"], ["tune.search=optuna"], ["tune.scheduler=pbt", "train.epochs=3"],
                  ["tune.seeds_per_config=2"]):
        cfg = load_config(None, ["method=ce", "scaling.use_gpu=true", "scaling.gpus_per_worker=0.25",
                                 "scaling.cpus_per_worker=2", *extra])
        check_search(cfg, space)
        assert trial_resources(cfg) == {"cpu": 2.0, "gpu": 0.25}
    for search in ("random", "optuna"):
        cfg = load_config(None, ["method=ce", "scaling.num_workers=2", f"tune.search={search}"])
        check_search(cfg, space)
        assert trial_resources(cfg) == DRIVER_RESOURCES  # its Train run asks for the workers
    assert processes_per_device(0.25, True, runs_per_process=2) == 8
    assert processes_per_device(1.0, True, runs_per_process=2) == 2
    assert processes_per_device(0.25, False, runs_per_process=2) == 1 and processes_per_device(0.5) == 2


def test_seeds_are_averaged_by_hand():
    from rayexperts.launch.sweep_seeds import aggregate_trials, mean_metrics, seed_configs

    reports = [{"epoch": 3, "view": "ensemble", "val_top1": 0.40, "top1": 0.30, "ensemble/val_top1": 0.40},
               {"epoch": 3, "view": "ensemble", "val_top1": 0.60, "top1": 0.36, "ensemble/val_top1": 0.60}]
    mean = mean_metrics(reports)
    assert mean["epoch"] == 3 and isinstance(mean["epoch"], int) and mean["view"] == "ensemble"
    assert mean["val_top1"] == pytest.approx(0.50) and mean["top1"] == pytest.approx(0.33)
    assert mean["ensemble/val_top1"] == pytest.approx(0.50) and mean["n_seeds"] == 2

    seeds = pd.DataFrame([
        {"trial_id": "a", "kind": "seed", "status": "completed", "run": "tune_a/seed_0", "seed": 0, "train.lr": 0.1,
         "epochs_done": 2, "error": "", "val_top1": 0.5, "top1": 0.40, "lr": 0.01},
        {"trial_id": "a", "kind": "seed", "status": "completed", "run": "tune_a/seed_1", "seed": 1, "train.lr": 0.1,
         "epochs_done": 2, "error": "", "val_top1": 0.6, "top1": 0.46, "lr": 0.01},
        {"trial_id": "a", "kind": "seed", "status": "completed", "run": "tune_a/seed_2", "seed": 2, "train.lr": 0.1,
         "epochs_done": 2, "error": "", "val_top1": 0.7, "top1": 0.43, "lr": 0.01},
        {"trial_id": "b", "kind": "seed", "status": "stopped", "run": "tune_b/seed_0", "seed": 0, "train.lr": 0.2,
         "epochs_done": 1, "error": "", "val_top1": 0.2, "top1": 0.1, "lr": 0.02},
        {"trial_id": "b", "kind": "seed", "status": "stopped", "run": "tune_b/seed_1", "seed": 1, "train.lr": 0.2,
         "epochs_done": 1, "error": "", "val_top1": np.nan, "top1": np.nan, "lr": 0.02},
    ])
    configs = aggregate_trials(seeds, ["train.lr"], "val_top1").set_index("trial_id")
    a, b = configs.loc["a"], configs.loc["b"]
    # mean 0.6; sample sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1; test: mean 0.43, sd sqrt((0.0009 + 0.0009 + 0) / 2) = 0.03
    assert a["val_top1"] == pytest.approx(0.6) and a["val_top1_sd"] == pytest.approx(0.1)
    assert a["top1"] == pytest.approx(0.43) and a["top1_sd"] == pytest.approx(0.03)
    assert a["n_seeds"] == 3 and a["kind"] == "config" and a["run"] == "tune_a" and a["train.lr"] == 0.1
    assert a["lr"] == pytest.approx(0.01) and "lr_sd" not in configs and "seed" not in configs
    # one seed reported: its value, no spread, n 1
    assert b["val_top1"] == pytest.approx(0.2) and np.isnan(b["val_top1_sd"]) and b["n_seeds"] == 1
    assert b["status"] == "stopped" and b["epochs_done"] == 1

    cfgs = seed_configs(load_config(None, ["method=ce", "seed=5", "tune.seeds_per_config=2"]), "/sweeps/s/tune_a")
    assert [(c.seed, c.run.storage_path, c.run.name) for c in cfgs] == [(5, "/sweeps/s/tune_a", "seed_0"),
                                                                      (6, "/sweeps/s/tune_a", "seed_1")]


def test_the_best_configuration_is_its_seeds_mean(monkeypatch, capsys):
    def seed_row(trial_id, seed, val, test):
        return {**_row(trial_id, "completed", val, test), "kind": "seed", "seed": seed, "n_seeds": 1,
                "run": f"tune_{trial_id}/seed_{seed}"}

    def config_row(trial_id, val, val_sd, test, test_sd):
        return {**_row(trial_id, "completed", val, test), "kind": "config", "n_seeds": 2, "val_top1_sd": val_sd,
                "top1_sd": test_sd}

    # a's best seed (0.70) beats every seed of b, but b's mean is higher: b is chosen
    _fake_sweep(monkeypatch, [config_row("a", 0.61, 0.1272792, 0.5, 0.01), seed_row("a", 0, 0.70, 0.5),
                              seed_row("a", 1, 0.52, 0.5), config_row("b", 0.65, 0.0141421, 0.6, 0.02),
                              seed_row("b", 0, 0.66, 0.6), seed_row("b", 1, 0.64, 0.6)])
    assert sweep_command(["--space", str(SPACES / "mllt.yaml"), "method=mllt"]) == 0
    out = capsys.readouterr().out
    assert "val_top1 (%, mean ± sd)" in out and "61.00 ± 12.73" in out and "65.00 ± 1.41" in out
    assert "0.6100" not in out and "0.61 " not in out  # people see %
    assert "best configuration b: val_top1 = 65.00 ± 1.41 % (validation, mean ± sd of 2 seeds)" in out
    assert "test top1 = 60.00 ± 2.00 % (selected on validation, mean of 2 seeds)" in out


# ------------------------------------------------------------------------------- killed sweeps resume (issue 40)


def _finished_trials(sweep: Path) -> list[str]:
    """The trial ids Tune's last experiment snapshot in ``sweep`` marks TERMINATED (finished)."""
    import json

    done = []
    for state in sweep.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            return []  # being written
        done += [t["trial_id"] for t in (json.loads(data) for data, _ in trials) if t["status"] == "TERMINATED"]
    return sorted(done)


def _metrics_files(sweep: Path, trial_id: str) -> dict[str, bytes]:
    return {str(p.relative_to(sweep)): p.read_bytes() for p in sorted((sweep / f"tune_{trial_id}").rglob("metrics.parquet"))}


def _first_epochs_reported(sweep: Path, trials: int) -> bool:
    """Whether ``trials`` trials of ``sweep`` have each reported a result (their first epoch)."""
    return sum(1 for f in sweep.glob("tune_*/result.json") if f.read_text().strip()) >= trials


def _kill_after_a_finished_trial(ray_cluster, tmp_path: Path, args: list[str], name: str,
                                 reported: int = 0) -> dict[str, dict]:
    """Run ``jobs/sweep.py ARGS`` as its own driver on the test cluster; SIGKILL it once Tune has recorded a
    finished trial (or, with ``reported``, once that many trials reported their first epoch: PBT's synchronous
    trials finish together, too close to a finished trial for the kill to land mid-sweep); return each finished
    trial's metrics files as they were then."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # Tune snapshots its experiment state at most every 10 s by default ("auto"): a sweep whose last trials take
    # less than that ends before any snapshot marks the first one finished. Snapshot at every step here.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = (tmp_path / f"{name}.log").open("w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sweep, deadline = tmp_path / name, time.monotonic() + 300
    try:
        while not (done := _finished_trials(sweep)) and not (reported and _first_epochs_reported(sweep, reported)):
            assert proc.poll() is None, f"the driver ended before it was killed:\n{(tmp_path / f'{name}.log').read_text()}"
            assert time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
            time.sleep(0.5)
        kept = {t: _metrics_files(sweep, t) for t in done}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL and not (sweep / "trials.parquet").exists()  # killed mid-sweep
    return kept


def _resume_and_check(tmp_path: Path, args: list[str], name: str, kept: dict[str, dict], trials: int) -> dict:
    """Re-run the killed sweep in this process: every trial finished before the kill kept (its files unchanged,
    nothing retrained), every trial done; the report written with a figure per searched key."""
    from rayexperts.report import write_report

    space_file, overrides = args[1], args[2:]
    cfg = load_config(None, overrides)
    out = run_sweep(cfg, load_space(space_file, cfg))
    configs = out["trials"][out["trials"]["kind"] == "config"]
    assert len(configs) == trials and set(configs["status"]) == {"completed"}, out["trials"]
    for trial_id, files in kept.items():
        assert trial_id in set(configs["trial_id"])
        assert _metrics_files(tmp_path / name, trial_id) == files  # kept as they were: not trained again
    md = write_report(tmp_path / name)
    assert (md.parent / "sweep_train.lr.png").is_file()
    return {"out": out, "report": md.read_text()}


def _sweep_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["--space", _space(tmp_path), "method=ce", f"run.storage_path={tmp_path}", f"run.name={name}",
            "run.verbose=false", "train.epochs=1", "scaling.cpus_per_worker=1", "tune.scheduler=fifo",
            "train.batch_size=128", *extra]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_optuna_sweep_of_two_seeds_per_configuration_resumes(ray_cluster, tmp_path):
    """Optuna, 2 configurations of 2 seeds, one at a time: the driver killed once the first finished, re-run; each
    configuration's row is the mean and sample sd of its seeds' own metrics files, and Optuna's state is kept."""
    args = _sweep_args(tmp_path, "optuna", "tune.search=optuna", "tune.num_samples=2", "tune.max_concurrent=1",
                       "tune.seeds_per_config=2")
    kept = _kill_after_a_finished_trial(ray_cluster, tmp_path, args, "optuna")
    done = _resume_and_check(tmp_path, args, "optuna", kept, trials=2)
    assert list((tmp_path / "optuna").glob("searcher-state-*.pkl"))  # Optuna's study, restored with the sweep
    trials = pd.read_parquet(tmp_path / "optuna" / "trials.parquet")
    assert sorted(trials["kind"]) == ["config"] * 2 + ["seed"] * 4
    for _, config in trials[trials["kind"] == "config"].iterrows():
        vals = [pd.read_parquet(tmp_path / "optuna" / config["run"] / f"seed_{k}" / "metrics.parquet")
                .query("view == 'expert0_pc'")["val_top1"].iloc[-1] for k in (0, 1)]
        assert config["val_top1"] == pytest.approx((vals[0] + vals[1]) / 2)
        assert config["val_top1_sd"] == pytest.approx(abs(vals[0] - vals[1]) / np.sqrt(2))  # n - 1 = 1
        assert config["n_seeds"] == 2
        import json  # what Optuna and the scheduler saw: the trial's last result, the mean of its seeds

        seen = json.loads((tmp_path / "optuna" / config["run"] / "result.json").read_text().splitlines()[-1])
        assert seen["val_top1"] == pytest.approx(config["val_top1"]) and seen["n_seeds"] == 2
        seeds = trials[(trials["kind"] == "seed") & (trials["trial_id"] == config["trial_id"])]
        assert list(seeds["seed"]) == [0, 1] and list(seeds["run"]) == [f"{config['run']}/seed_{k}" for k in (0, 1)]
    assert "selected on validation, mean of 2 seeds" in done["report"] and " ± " in done["report"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_pbt_sweep_resumes_and_exploits(ray_cluster, tmp_path):
    """PBT over 2 trials of 2 epochs, perturbing after epoch 1: the lower trial continues from the upper one's
    checkpoint with a perturbed train.lr (its config.yaml differs from the value of its first result)."""
    import json

    args = _sweep_args(tmp_path, "pbt", "tune.scheduler=pbt", "train.epochs=2", "tune.perturbation_interval=1",
                       "tune.num_samples=2", "tune.max_concurrent=2")
    kept = _kill_after_a_finished_trial(ray_cluster, tmp_path, args, "pbt", reported=2)
    done = _resume_and_check(tmp_path, args, "pbt", kept, trials=2)
    changed = []
    for run in done["out"]["trials"]["run"]:
        results = (tmp_path / "pbt" / run / "result.json").read_text().splitlines()
        first = json.loads(results[0])["config"]["train.lr"]  # what Tune first gave it (params.json is rewritten)
        now = load_config(tmp_path / "pbt" / run / "config.yaml").train.lr
        if now != first:
            changed.append(now)
    assert len(changed) == 1 and 0.02 <= changed[0] <= 0.2, changed


def test_the_sweep_report_shows_spread_ties_and_failures(tmp_path):
    """A sweep of 2 seeds per configuration (no Ray: its files written here): the best configurations in % with
    their sd, the two that tie named, the failed one with its error, a figure per searched key."""
    import yaml

    from rayexperts.report import write_report

    root = tmp_path / "sweep"
    root.mkdir()
    (root / "sweep.yaml").write_text(yaml.safe_dump({"config": {"tune": {"metric": "val_top1", "mode": "max"}},
                                                     "space": {"train.lr": {"loguniform": [0.02, 0.2]}}}))

    def rows(trial_id, lr, vals, tests, status="completed", error=""):
        config = {"trial_id": trial_id, "kind": "config", "status": status, "run": f"tune_{trial_id}", "error": error,
                  "train.lr": lr, "epochs_done": 2, "n_seeds": len([v for v in vals if v == v]),
                  "val_top1": np.nanmean(vals) if vals else np.nan, "val_top1_sd": np.nanstd(vals, ddof=1) if vals else np.nan,
                  "top1": np.nanmean(tests) if tests else np.nan, "top1_sd": np.nanstd(tests, ddof=1) if tests else np.nan}
        seeds = [{"trial_id": trial_id, "kind": "seed", "status": status, "run": f"tune_{trial_id}/seed_{k}",
                  "seed": k, "train.lr": lr, "epochs_done": 2, "n_seeds": 1, "val_top1": v, "top1": t, "error": error}
                 for k, (v, t) in enumerate(zip(vals, tests))]
        return [config, *seeds]

    pd.DataFrame([*rows("a", 0.05, [0.60, 0.62], [0.50, 0.54]), *rows("b", 0.1, [0.63, 0.59], [0.40, 0.42]),
                  *rows("c", 0.15, [0.30, 0.34], [0.30, 0.30]),
                  *rows("d", 0.2, [], [], "error", "ValueError: boom")]).to_parquet(root / "trials.parquet")
    md = write_report(root)
    text = md.read_text()
    # a: mean 61.00, sd |0.60 - 0.62| / sqrt(2) = 1.41; test 52.00 ± 2.83. b ties with a (mean 61.00, sd 2.83).
    assert "| a | completed | 0.05 | 2 | 61.00 ± 1.41 | 52.00 ± 2.83 | 2 |" in text
    assert "| b | completed | 0.1 | 2 | 61.00 ± 2.83 | 41.00 ± 1.41 | 2 |" in text
    assert "test top1 = 52.00 ± 2.83 % (selected on validation, mean of 2 seeds)" in text
    assert "2 configurations tie for the best val_top1: `a`, `b`" in text
    assert "- `d`: ValueError: boom (its directory `tune_d`, error.txt there)" in text
    assert "0.61" not in text  # people see %
    assert (md.parent / "sweep_train.lr.png").read_bytes()[:4] == b"\x89PNG"
