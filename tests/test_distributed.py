"""Data parallelism, resume and fault tolerance (issue 5)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import metrics_without_time, quick_overrides
from rayexperts.config import load_config, with_overrides
from rayexperts.engine.run import Run
from rayexperts.engine.loop import evaluate_splits
from rayexperts.launch.train import run_training
from rayexperts.engine.fit import Reporter, run_epochs
from rayexperts.rundir import CheckpointMismatch, RunDir, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _epoch_batches(run: Run, epoch: int) -> list[list[int]]:
    run.sampler.set_epoch(epoch)
    return [list(b) for b in run.train_loader.batch_sampler]


@pytest.mark.parametrize("sampler", ["instance", "class_balanced", "sqrt"])
def test_two_workers_train_on_the_one_worker_sample_set(sampler):
    cfg1 = load_config(None, ["data.name=digits-lt", "train.batch_size=64", f"data.sampler={sampler}", "data.cache=off"])
    cfg2 = with_overrides(cfg1, {"scaling.num_workers": 2})
    one = Run(cfg1)
    two = [Run(cfg2, rank, 2) for rank in (0, 1)]
    for epoch in (0, 3):
        b1 = _epoch_batches(one, epoch)
        b2 = [_epoch_batches(r, epoch) for r in two]
        assert len(b2[0]) == len(b2[1]) == len(b1)  # same number of optimizer steps
        assert all(len(b) == 32 for b in b2[0] + b2[1])  # per-worker batch = global / 2
        assert Counter(i for b in b1 for i in b) == Counter(i for r in b2 for b in r for i in b)
        if sampler == "instance":  # disjoint shares
            assert not {i for b in b2[0] for i in b} & {i for b in b2[1] for i in b}


def _registered_epoch(run_dir) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (what a restart resumes from), or -1."""
    return int((RunDir(str(run_dir)).registered_checkpoint().get("metrics") or {}).get("epoch", -1))


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        mine = any(a.pid == os.getpid() for a in _parents(p))
        if mine and any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def _kill_workers_after(run_dir, epochs: list[int], killed: list[int], timeout: float = 300) -> None:
    """For each epoch in ``epochs``: once Ray has registered its checkpoint, SIGKILL one Ray Train worker."""
    deadline = time.time() + timeout
    for epoch in epochs:
        while time.time() < deadline:
            if _registered_epoch(run_dir) >= epoch and (workers := _train_workers()):
                victim = workers[len(killed) % len(workers)]
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                break
            time.sleep(0.05)
        while _train_workers() and any(p.pid in killed for p in _train_workers()):
            time.sleep(0.05)  # the killed worker is gone before the next kill is aimed


def _parents(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.parents()
    except psutil.Error:
        return []


EXACT_RUN = {"scaling.num_workers": 2, "scaling.cpus_per_worker": 1, "method": "mllt", "train.epochs": 5}


@pytest.fixture(scope="module")
def clean_run(ray_cluster, tmp_path_factory) -> Path:
    """The 2-worker MLLT run every fault test must reproduce, left alone: its storage root."""
    root = tmp_path_factory.mktemp("exact")
    run_training(load_config(None, quick_overrides(root, "clean", **EXACT_RUN)))
    return root


@pytest.mark.ray
def test_resume_is_exact_under_worker_faults(clean_run, tmp_path):
    """A 2-worker run whose workers are killed twice, at epochs drawn at random, restarts from the latest
    registered checkpoint each time and ends with the metrics of the same run left alone, bit for bit;
    its 2-worker evaluation equals a 1-worker evaluation of its checkpoint."""
    faulty_cfg = load_config(None, quick_overrides(tmp_path, "faulty", **EXACT_RUN, **{"run.max_failures": 3}))
    kill_at = sorted(random.Random(1234).sample(range(0, 4), 2))  # after epoch k's checkpoint is registered
    killed: list[int] = []
    killer = threading.Thread(target=_kill_workers_after, args=(tmp_path / "runs" / "faulty", kill_at, killed),
                              daemon=True)
    killer.start()
    run_training(faulty_cfg)
    killer.join(timeout=5)
    assert len(killed) == 2, f"killed {killed} at epochs {kill_at}"
    clean, faulty = metrics_without_time(clean_run / "runs" / "clean"), metrics_without_time(tmp_path / "runs" / "faulty")
    assert faulty.groupby(["epoch", "view"]).size().eq(1).all() and faulty["epoch"].nunique() == 5
    pd.testing.assert_frame_equal(faulty, clean)

    run_dir = clean_run / "runs" / "clean"
    clean_cfg = load_config(None, quick_overrides(clean_run, "clean", **EXACT_RUN))
    last = clean[clean["epoch"] == 4].set_index("view")
    assert (last["num_samples"] == 300).all()  # every test image counted once, not twice
    evaluator = Run(with_overrides(clean_cfg, {"scaling.num_workers": 1}))
    evaluator.model.load_state_dict(RunDir(str(run_dir)).load_checkpoint(evaluator.ident)["model"])
    acc = evaluate_splits(evaluator)[""]
    for view in evaluator.views:
        s = acc.summary(view, evaluator.groups)
        assert s["top1"] == pytest.approx(last.loc[view, "top1"], abs=1 / 300 + 1e-9), view
        assert s["ece"] == pytest.approx(last.loc[view, "ece"], abs=0.01), view


@pytest.mark.ray
def test_resume_is_exact_after_the_driver_is_killed(clean_run, ray_cluster, tmp_path):
    """``jobs/train.py`` killed (its whole process group, SIGKILL) once a checkpoint drawn at random is
    registered, then the same command re-run: it resumes and ends with the uninterrupted run's metrics."""
    command = [sys.executable, str(REPO / "jobs" / "train.py"), *quick_overrides(tmp_path, "driver", **EXACT_RUN)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    kill_after = random.Random(4321).randrange(0, 4)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 300
    while _registered_epoch(tmp_path / "runs" / "driver") < kill_after:
        assert first.poll() is None and time.time() < deadline, f"ended before the kill: {first.stderr.read()[-3000:]}"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    while _train_workers() and time.time() < deadline:  # Ray ends the dead driver's workers
        time.sleep(0.2)
    assert len(metrics_without_time(tmp_path / "runs" / "driver")["epoch"].unique()) < 5
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = re.findall(r"driver: resuming from \S+/runs/driver/checkpoint_\S+: (\d) of 5 epochs done",
                         second.stdout + second.stderr)
    assert resumed and kill_after < int(resumed[0]) < 5, second.stdout[-2000:]
    pd.testing.assert_frame_equal(metrics_without_time(tmp_path / "runs" / "driver"),
                                  metrics_without_time(clean_run / "runs" / "clean"))


def _run_actors() -> list[psutil.Process]:
    """This session's one-worker run actors (``ray::RunActor``)."""
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RunActor" in c for c in (p.info["cmdline"] or [])) and any(a.pid == os.getpid() for a in _parents(p))]


@pytest.mark.ray
def test_a_killed_one_worker_actor_restarts_and_resumes_exactly(ray_cluster, tmp_path):
    """A one-worker run trains in a Ray actor: killed once after a checkpoint drawn at random, Ray restarts
    it (``run.max_failures``), it resumes from the newest checkpoint in the run directory and ends with
    the metrics of the same run left alone."""
    one = {**EXACT_RUN, "scaling.num_workers": 1, "train.epochs": 4}
    run_training(load_config(None, quick_overrides(tmp_path, "alone", **one)))
    kill_after = random.Random(99).randrange(1, 3)  # checkpoint_<epoch> holds epochs < epoch
    rundir = RunDir.of(str(tmp_path / "runs"), "killed")
    killed: list[int] = []

    def kill() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            latest = rundir.latest_checkpoint() if rundir.exists() else None
            if latest is not None and int(Path(latest.path).name.split("_")[-1]) >= kill_after and (actors := _run_actors()):
                os.kill(actors[0].pid, signal.SIGKILL)
                killed.append(actors[0].pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    run_training(load_config(None, quick_overrides(tmp_path, "killed", **one, **{"run.max_failures": 1})))
    killer.join(timeout=5)
    assert len(killed) == 1
    pd.testing.assert_frame_equal(metrics_without_time(tmp_path / "runs" / "killed"),
                                  metrics_without_time(tmp_path / "runs" / "alone"))


def test_a_run_directory_of_another_config_is_refused_before_anything_starts(tmp_path):
    cfg = load_config(None, quick_overrides(tmp_path, "same", **{"train.epochs": 1}))
    rundir = RunDir.for_config(cfg)
    rundir.write_config(cfg)
    (tmp_path / "x.parquet").write_bytes(b"")  # data.root exists: the check that stops the run is the directory's
    for key, value in (("method", "mllt"), ("model.backbone", "resnet8"), ("data.name", "cifar10-lt")):
        other = load_config(None, quick_overrides(tmp_path, "same", **{"train.epochs": 1, key: value,
                                                                        "data.root": str(tmp_path / "x.parquet")}))
        with pytest.raises(CheckpointMismatch, match=key.replace(".", r"\.")):
            run_training(other)
    assert sorted(p.name for p in Path(rundir.path).iterdir()) == ["config.yaml"]


def test_a_checkpoint_of_another_class_count_or_backbone_is_refused(tmp_path):
    """A checkpoint records the run's identity (method, backbone, experts, classifier, data set and the
    class count); loading it into a run that differs in any of them stops with a message naming it."""
    cfg = load_config(None, quick_overrides(tmp_path, "ident", **{"train.epochs": 1}))
    run = Run(cfg)
    save_checkpoint(tmp_path, model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
    assert load_checkpoint(tmp_path, run.ident)["epoch"] == 1
    for key, value in (("num_classes", 100), ("model.backbone", "resnet8"), ("model.num_experts", 3)):
        with pytest.raises(CheckpointMismatch, match=rf"{re.escape(key)}: checkpoint .* vs this run {value!r}"):
            load_checkpoint(tmp_path, {**run.ident, key: value})


def test_only_rank_0_writes_files(tmp_path):
    """Rank 1 of a 2-worker run trains, evaluates and reports its metrics but writes nothing and hands
    no checkpoint on; rank 0 writes the tables and the checkpoint (here without torch.distributed:
    each rank's Run is built as Ray Train builds it)."""
    cfg = load_config(None, quick_overrides(tmp_path, "ranks", **{"train.epochs": 1, "scaling.num_workers": 2}))
    run_dir = tmp_path / "runs" / "ranks"
    reports: dict[int, list] = {0: [], 1: []}
    run_epochs(Run(cfg, 1, 2), Reporter(lambda m, c: reports[1].append((m, c))))
    assert not run_dir.exists() and [c for _, c in reports[1]] == [None]
    run_epochs(Run(cfg, 0, 2), Reporter(lambda m, c: reports[0].append((m, c))))
    (metrics, checkpoint), = reports[0]
    assert checkpoint is not None and (Path(checkpoint) / "checkpoint.pt").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["classes.parquet", "metrics.parquet", "reliability.parquet", "tensorboard"]
    assert reports[1][0][0]["epoch"] == metrics["epoch"] == 0
