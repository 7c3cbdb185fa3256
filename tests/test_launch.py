"""What the job scripts do before and around training, without a Ray cluster: the config layers they
record, the checks that stop bad input at once (an incomplete package, a relative storage path inside a
Ray job, storage that cannot be written, a cluster address nobody answers), and the TensorBoard and
MLflow logs of a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayexperts.config import ConfigError, load_config
from rayexperts.launch.ray_job import RAY_JOB_ENV, check_storage
from rayexperts.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


def test_the_resolved_config_records_its_layers_in_order(tmp_path):
    cfg = load_config("digits_ncl", ["train.epochs=3", "seed=2"])
    assert list(cfg.layers) == ["defaults", "data set digits-lt defaults", "method ncl defaults", "preset digits_ncl",
                                "command line (train.epochs, seed)"]
    child = tmp_path / "child.yaml"
    child.write_text("base: digits_ncl\ntrain: {lr: 0.2}\n")
    cfg = load_config(str(child))
    assert list(cfg.layers)[-2:] == ["preset digits_ncl", f"file {child}"] and cfg.train.lr == 0.2
    assert cfg.ncl.moco.queue_size == 256  # the base preset's value


def test_every_expected_file_layer_loads_or_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no preset or YAML file named 'digits_nlc'; did you mean digits_ncl"):
        load_config("digits_nlc")
    child = tmp_path / "child.yaml"
    child.write_text("base: no_such_preset\n")
    with pytest.raises(ConfigError, match="no preset or YAML file named 'no_such_preset'"):
        load_config(str(child))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match="'layers' in command line.*written by the config loader"):
        load_config(None, ["layers=[x]"])


def test_inside_a_ray_job_storage_in_its_working_directory_is_refused(monkeypatch, tmp_path):
    import re

    from rayexperts.launch.train import preflight

    job_dir, shared = tmp_path / "job", tmp_path / "shared"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)  # a submitted job's driver runs in a temporary copy of the working directory
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    cfg = load_config(None, [])  # run.storage_path=./runs, made absolute by the config
    inside = re.escape(f"run.storage_path={job_dir / 'runs'} is inside this Ray job's working directory {job_dir} ")
    with pytest.raises(ConfigError, match=inside):
        preflight(cfg)  # refused before anything is written
    assert list(job_dir.iterdir()) == []
    with pytest.raises(ConfigError, match="inside this Ray job's working directory"):
        check_storage(load_config(None, ["run.storage_path=out"]))
    for fine in (str(shared), "s3://bucket/runs"):
        check_storage(load_config(None, [f"run.storage_path={fine}"]))
    monkeypatch.delenv(RAY_JOB_ENV)
    check_storage(cfg)  # outside a job the working directory is the user's
    assert cfg.run.storage_path == os.path.abspath("runs")


def _python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def test_an_incomplete_package_stops_before_anything_runs(tmp_path):
    shutil.copytree(REPO / "rayexperts", tmp_path / "rayexperts", ignore=shutil.ignore_patterns("presets"))
    done = _python(["-c", "import sys, rayexperts.cli; sys.argv[1:] = []; sys.exit(rayexperts.cli.run_job('methods'))"],
                   tmp_path, PYTHONPATH=str(tmp_path))  # what a jobs/ script does
    assert done.returncode == 2 and done.stdout == ""
    assert f"the rayexperts package imported from {tmp_path / 'rayexperts'} is incomplete: rayexperts/presets missing" \
        in done.stderr and '"/data/"' in done.stderr


def test_storage_that_cannot_be_written_stops_the_job_and_leaves_nothing(tmp_path, capsys):
    from rayexperts.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["train", f"run.storage_path={blocker}/runs", "run.name=r"]) == 2
    assert f"error: cannot write to run.storage_path={blocker}/runs" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
    with pytest.raises(OSError, match="run.storage_path"):
        RunDir(str(blocker / "runs")).check_writable()


def test_an_address_nobody_answers_is_an_error_that_names_it(tmp_path):
    started = time.time()
    done = _python([str(REPO / "jobs" / "train.py"), f"run.storage_path={tmp_path}", "train.epochs=1"], tmp_path,
                   RAY_ADDRESS="127.0.0.1:9", RAYEXPERTS_CONNECT_TIMEOUT_S="1")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:9" in done.stderr
    assert time.time() - started < 30
    done = _python([str(REPO / "jobs" / "train.py"), f"run.storage_path={tmp_path}"], tmp_path,
                   RAY_ADDRESS="http://127.0.0.1:8265")
    assert done.returncode == 2 and "is a dashboard (job submission) address" in done.stderr


def _fake_epochs(cfg, rundir: RunDir, epochs: range, start: int = 0) -> None:
    from rayexperts.engine.track import Trackers

    trackers = Trackers(cfg, rundir, start)
    for e in epochs:
        rows = [{"epoch": e, "view": v, "top1": 0.1 * e + (v == "ensemble"), "top1_few": float("nan"),
                 "val_top1": 0.05 * e, "num_samples": 300, "loss": 1.0} for v in ("expert0", "ensemble")]
        trackers.log(e, rows, {"loss": 2.0 - e, "loss_nil": 1.5, "lr": 0.1})
    trackers.close()


def test_tensorboard_and_mlflow_logs_of_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the local file store behind this switch
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file://{tmp_path / 'mlruns'}"
    cfg = load_config(None, ["method=ncl", f"run.mlflow_tracking_uri={store}", "run.name=tracked"])
    rundir = RunDir(str(tmp_path / "run"))
    _fake_epochs(cfg, rundir, range(3))
    _fake_epochs(cfg, rundir, range(1, 3), start=1)  # resumed after epoch 0: epochs 1 and 2 again

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"ensemble/top1", "expert0/val_top1", "train/loss_nil", "train/lr"} <= set(events.Tags()["scalars"])
    assert "expert0/top1_few" not in events.Tags()["scalars"]  # NaN (an empty shot group) is left out
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("ensemble/top1")] == [(0, 1.0), (1, 1.1), (2, 1.2)]

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("rayexperts").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["ncl.distill_weight"] == "0.6" and run.data.params["method"] == "ncl"
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == run.info.run_id  # the resumed run continued it
    assert [m.step for m in client.get_metric_history(run.info.run_id, "ensemble/top1")] == [0, 1, 2, 1, 2]


class RayStarted(Exception):
    """Raised by the stand-in for ``ray.init``: what a job asked for is recorded, nothing starts."""


@pytest.fixture
def ray_init_kwargs(monkeypatch) -> dict:
    """``ray.init`` replaced: the kwargs of the job's call (and the ``RAY_API_SERVER_ADDRESS`` it exported)
    land in the returned dict, then :class:`RayStarted` is raised."""
    import ray

    seen: dict = {}

    def init(**kwargs):
        seen.update(kwargs, api=os.environ.get("RAY_API_SERVER_ADDRESS"))
        raise RayStarted

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return seen


@pytest.mark.parametrize("workers, setting, expected", [(1, "auto", False), (2, "auto", True), (1, "on", True),
                                                        (2, "off", False)])
def test_the_local_instance_has_a_dashboard_only_where_ray_train_needs_it(ray_init_kwargs, tmp_path, workers,
                                                                          setting, expected):
    """``run.dashboard=auto``: a one-worker run (one actor) starts its local Ray instance without the
    dashboard (about 1.5 s less start-up), a multi-worker run (Ray Train, whose PlacementGroupCleaner uses
    the state API) with it, its address exported to the instance's processes; on / off force it."""
    from rayexperts.launch.train import run_training

    cfg = load_config(None, [f"scaling.num_workers={workers}", f"run.dashboard={setting}",
                             f"run.storage_path={tmp_path}", "run.name=local"])
    with pytest.raises(RayStarted):
        run_training(cfg)
    seen = ray_init_kwargs
    assert seen["address"] == "local" and seen["include_dashboard"] is expected
    assert (seen["api"] == f"http://127.0.0.1:{seen['dashboard_port']}") if expected else seen["api"] is None
    assert not (tmp_path / "local").exists()  # nothing written before Ray is up


@pytest.mark.parametrize("teacher_workers, expected", [(1, False), (2, True)])
def test_a_sweep_counts_its_teachers_when_it_decides_on_the_dashboard(ray_init_kwargs, tmp_path, teacher_workers,
                                                                     expected):
    """A sweep starts Ray before it trains its prerequisites (CBD's teachers): one-worker trials whose
    teachers are Ray Train runs still get the dashboard."""
    from rayexperts.launch.tune import run_sweep

    cfg = load_config("cbd_digits", [f"cbd.teacher_workers={teacher_workers}", f"run.storage_path={tmp_path}",
                                     "run.name=sweep"])
    with pytest.raises(RayStarted):
        run_sweep(cfg, {})
    assert cfg.scaling.num_workers == 1 and ray_init_kwargs["include_dashboard"] is expected
