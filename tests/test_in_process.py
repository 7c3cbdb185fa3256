"""``run.ray=false``: a one-worker run trained in the calling process by the code a run's Ray actor runs
(issue 35): the same run directory and numbers as the actor path, resume, no Ray imported, and the jobs that
need Ray refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import metrics_without_time, quick_overrides, without_ray
from rayexperts.cli import main
from rayexperts.config import load_config
from rayexperts.launch.train import run_training
from rayexperts.rundir import CHECKPOINT_FILE, RunDir, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# One thread each (the 2 cores are shared); 3 epochs, a checkpoint after each.
RUN = {"train.epochs": 3, "scaling.cpus_per_worker": 1, "run.tensorboard": False}


def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


@pytest.mark.ray
@pytest.mark.slow
def test_in_process_run_equals_the_actor_run(ray_cluster, tmp_path):
    """The same seed trains to the same metrics, classes and weights in this process as in a Ray actor,
    and both write the same files."""
    run_training(load_config(None, quick_overrides(tmp_path, "actor", **RUN)))
    assert "ray" in sys.modules
    out = run_training(load_config(None, quick_overrides(tmp_path, "here", **RUN, **{"run.ray": False})))
    actor, here = tmp_path / "runs" / "actor", tmp_path / "runs" / "here"
    assert out["path"] == str(here)
    assert _files(here) == _files(actor)
    assert {"config.yaml", "metrics.parquet", "classes.parquet", "checkpoint_000003/checkpoint.pt"} <= _files(here)
    mine, theirs = metrics_without_time(here), metrics_without_time(actor)
    assert list(mine["epoch"].unique()) == [0, 1, 2] and (mine["torch_threads"] == 1).all()
    pd.testing.assert_frame_equal(mine, theirs)
    pd.testing.assert_frame_equal(pd.read_parquet(here / "classes.parquet"), pd.read_parquet(actor / "classes.parquet"))
    a, b = (load_checkpoint(p / "checkpoint_000003") for p in (actor, here))
    assert a["epoch"] == b["epoch"] == 3 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert RunDir(str(here)).config().run.ray is False


def test_an_interrupted_in_process_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    """Ctrl-C after epoch 1's checkpoint (KeyboardInterrupt reaches the caller, as under pdb), then the same call:
    it resumes from ``checkpoint_000001`` and ends with the metrics and weights of a run left alone."""
    straight = run_training(load_config(None, quick_overrides(tmp_path, "straight", **RUN, **{"run.ray": False})))
    cfg = load_config(None, quick_overrides(tmp_path, "stopped", **RUN, **{"run.ray": False}))
    put = RunDir.put_checkpoint

    def put_then_interrupt(self, local_dir, epoch, keep):
        target = put(self, local_dir, epoch, keep)
        if epoch == 1:
            raise KeyboardInterrupt
        return target

    monkeypatch.setattr(RunDir, "put_checkpoint", put_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    stopped = tmp_path / "runs" / "stopped"
    assert sorted(p.name for p in stopped.glob("checkpoint_*")) == ["checkpoint_000001"]
    assert (stopped / "error.log").exists()  # the actor's code records any interruption
    monkeypatch.undo()
    capsys.readouterr()
    run_training(load_config(None, quick_overrides(tmp_path, "stopped", **RUN, **{"run.ray": False})))
    assert "resuming from" in capsys.readouterr().out
    assert not (stopped / "error.log").exists()
    pd.testing.assert_frame_equal(metrics_without_time(stopped), metrics_without_time(straight["path"]))
    a, b = (load_checkpoint(Path(p) / "checkpoint_000003") for p in (straight["path"], stopped))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # A finished run is not trained again.
    again = run_training(load_config(None, quick_overrides(tmp_path, "stopped", **RUN, **{"run.ray": False})))
    assert again.get("already_finished") is True


@pytest.mark.slow
def test_train_runs_where_ray_cannot_be_imported(tmp_path):
    """``python -m rayexperts.cli train ... run.ray=false`` with a ``sitecustomize`` that makes ``import ray``
    fail: it trains to the end, writes its run directory, and never even tries to import Ray; a job that needs
    Ray is refused there in one line (status 2)."""
    env, attempts = without_ray(tmp_path, str(REPO))
    check = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True, timeout=60)
    assert "blocked" in check.stderr and attempts.read_text() == "ray\n"  # the blocker works
    attempts.unlink()
    command = [sys.executable, "-m", "rayexperts.cli", "train",
               *quick_overrides(tmp_path, "noray", **RUN, **{"run.ray": False, "run.verbose": True})]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 3/3" in done.stdout and "test top-1 (%) at the last epoch" in done.stdout
    run = tmp_path / "runs" / "noray"
    assert {"config.yaml", "metrics.parquet", "classes.parquet", f"checkpoint_000003/{CHECKPOINT_FILE}"} <= _files(run)
    assert not attempts.exists(), attempts.read_text()
    refused = subprocess.run([*command[:4], "--config", "cbd_digits", f"run.storage_path={tmp_path / 'cbd'}",
                              "run.ray=false"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: run.ray=false: method=cbd")
    assert not (tmp_path / "cbd").exists() and not attempts.exists()


@pytest.mark.parametrize("job, args, key", [
    ("train", ["scaling.num_workers=2"], "run.ray=false with scaling.num_workers=2"),
    ("train", ["run.max_failures=1"], "run.ray=false with run.max_failures=1"),
    ("train", ["--config", "cbd_digits"], "run.ray=false: method=cbd"),
    ("cbd", [], "run.ray=false: method=cbd"),
    ("sweep", ["--space", str(REPO / "tune_spaces" / "mllt.yaml"), "method=mllt"], "run.ray=false: a sweep"),
    ("reproduce", ["--paper", "NCL", "--table", "Table 1", "--dataset", "cifar10-lt", "--epochs", "1",
                   "data.root=DATA"], "run.ray=false: rayexperts reproduce"),
])
def test_jobs_that_need_ray_are_refused_in_one_line(tmp_path, capsys, job, args, key):
    data = tmp_path / "cifar.parquet"
    data.write_bytes(b"")
    storage = tmp_path / "runs"
    args = [a.replace("DATA", str(data)) for a in args]
    assert main([job, *args, f"run.storage_path={storage}", "run.ray=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}") and len(err.splitlines()) == 1, err
    assert "run.ray=true" in err
    assert not storage.exists()  # nothing written
