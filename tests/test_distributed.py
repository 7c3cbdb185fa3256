"""Data parallelism, resume and fault tolerance (issue 5)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter

import pandas as pd
import psutil
import pytest

from helpers import quick_overrides
from rayexperts.config import load_config, with_overrides
from rayexperts.engine.worker import Run
from rayexperts.launch.train import run_training
from rayexperts.rundir import CheckpointMismatch, RunDir


def _epoch_batches(run: Run, epoch: int) -> list[list[int]]:
    run.sampler.set_epoch(epoch)
    return [list(b) for b in run.train_loader.batch_sampler]


@pytest.mark.parametrize("sampler", ["instance", "class_balanced", "sqrt"])
def test_two_workers_train_on_the_one_worker_sample_set(sampler):
    cfg1 = load_config(None, ["data.name=digits-lt", "train.batch_size=64", f"data.sampler={sampler}"])
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
    """The epoch of the latest checkpoint Ray Train has registered (what a re-run resumes from), or -1."""
    return int((RunDir(str(run_dir)).registered_checkpoint().get("metrics") or {}).get("epoch", -1))


def _kill_a_worker_after(run_dir, epoch: int, timeout: float = 120) -> int:
    """Wait until Ray has registered the checkpoint of ``epoch``, then SIGKILL one Ray Train worker."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _registered_epoch(run_dir) >= epoch:
            for p in psutil.process_iter(["cmdline"]):
                mine = any(a.pid == os.getpid() for a in _parents(p))  # this session's cluster only
                if mine and any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])):
                    os.kill(p.pid, signal.SIGKILL)
                    return p.pid
        time.sleep(0.05)
    raise TimeoutError("no Ray Train worker to kill")


def _parents(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.parents()
    except psutil.Error:
        return []


def _assert_complete(run_dir, epochs: int) -> None:
    m = pd.read_parquet(run_dir / "metrics.parquet")
    assert sorted(m["epoch"].unique()) == list(range(epochs))
    assert m.groupby(["epoch", "view"]).size().eq(1).all()


@pytest.mark.ray
def test_two_worker_metrics_equal_one_worker_evaluation_of_checkpoint(ray_cluster, tmp_path):
    over = quick_overrides(tmp_path, "ddp", **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 1, "method": "mllt"})
    cfg = load_config(None, over)
    run_training(cfg)
    run_dir = tmp_path / "runs" / "ddp"
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    last = metrics[metrics["epoch"] == metrics["epoch"].max()].set_index("view")
    assert (last["num_samples"] == 300).all()  # every test image counted once, not twice
    evaluator = Run(with_overrides(cfg, {"scaling.num_workers": 1}))
    evaluator.model.load_state_dict(RunDir(str(run_dir)).load_checkpoint(evaluator.ident)["model"])
    acc = evaluator.evaluate()[""]
    for view in evaluator.views:
        s = acc.summary(view, evaluator.groups)
        assert s["top1"] == pytest.approx(last.loc[view, "top1"], abs=1 / 300 + 1e-9), view
        assert s["ece"] == pytest.approx(last.loc[view, "ece"], abs=0.01), view


@pytest.mark.ray
def test_killed_worker_restarts_from_checkpoint(ray_cluster, tmp_path):
    over = quick_overrides(tmp_path, "ft", **{"train.epochs": 8, "run.max_failures": 1, "run.verbose": True})
    cfg = load_config(None, over)
    run_dir = tmp_path / "runs" / "ft"
    killer = threading.Thread(target=_kill_a_worker_after, args=(run_dir, 1), daemon=True)
    killer.start()
    run_training(cfg)
    killer.join(timeout=1)
    _assert_complete(run_dir, 8)


@pytest.mark.ray
def test_rerun_resumes_and_replaces_rows(ray_cluster, tmp_path, capfd):
    over = quick_overrides(tmp_path, "resume", **{"train.epochs": 8, "run.verbose": True})
    cfg = load_config(None, over)
    run_dir = tmp_path / "runs" / "resume"
    killer = threading.Thread(target=_kill_a_worker_after, args=(run_dir, 1), daemon=True)
    killer.start()
    with pytest.raises(Exception):
        run_training(cfg)  # max_failures=0: the run fails when its worker dies
    killer.join(timeout=1)
    ckpt_epoch = _registered_epoch(run_dir) + 1  # a checkpoint holds the next epoch to train
    assert 1 < ckpt_epoch < 8
    capfd.readouterr()
    run_training(load_config(None, over))  # the same command again
    out = capfd.readouterr()
    assert re.search(rf"resuming resume from checkpoint .* at epoch {ckpt_epoch}\b", out.out + out.err), out.out[-3000:]
    _assert_complete(run_dir, 8)


@pytest.mark.ray
def test_checkpoint_of_another_config_is_refused(ray_cluster, tmp_path):
    cfg = load_config(None, quick_overrides(tmp_path, "same", **{"train.epochs": 1}))
    run_training(cfg)
    other = load_config(None, quick_overrides(tmp_path, "same", **{"train.epochs": 1, "method": "mllt"}))
    with pytest.raises(CheckpointMismatch, match="method"):
        run_training(other)
