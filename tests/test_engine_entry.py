"""The config is composed once per process (issue 37 item 3): the driver composes it, checks it once
(preflight) and hands the resolved object to the actor's code, a Ray Train worker and a Tune trial, which
build their run from it without composing it again (no schema built, no layer merged) and without
registering the plugins a second time in the driver's process."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from helpers import quick_overrides
from rayexperts import registry
from rayexperts.config import load_config
from rayexperts.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ONE_EPOCH = {"train.epochs": 1, "scaling.cpus_per_worker": 1, "run.tensorboard": False}


class Recomposed(BaseException):
    """Raised where a config is composed after the driver's composition (a BaseException: no ``except
    Exception`` on the way turns it into a run failure)."""


def forbid_composition(monkeypatch) -> list:
    """From now on, building a config schema (what every composition does first) raises :class:`Recomposed`;
    the calls of :func:`rayexperts.registry.load_plugins` are recorded in the list returned."""

    def structured(*args, **kwargs):
        raise Recomposed(f"a config was composed again: OmegaConf.structured{args}")

    monkeypatch.setattr(OmegaConf, "structured", staticmethod(structured))
    loads: list = []
    real = registry.load_plugins
    monkeypatch.setattr(registry, "load_plugins", lambda *a, **k: loads.append((a, k)) or real(*a, **k))
    return loads


@pytest.mark.slow
def test_an_in_process_run_is_composed_and_checked_once(tmp_path, monkeypatch):
    """``rayexperts train run.ray=false`` after the driver's composition: announce + run_training preflight
    once, and the actor's code (RunActor.train → engine.entry) trains the driver's object as it is."""
    from rayexperts.launch.train import announce, run_training

    cfg = load_config(None, quick_overrides(tmp_path, "once", **ONE_EPOCH, **{"run.ray": False}))
    checks = []
    real_check = RunDir.check_writable
    monkeypatch.setattr(RunDir, "check_writable", lambda self: checks.append(self.uri) or real_check(self))
    loads = forbid_composition(monkeypatch)
    announce(cfg, "run directory")
    out = run_training(cfg)
    assert len(checks) == 1  # the preflight's storage check: once, in announce
    assert loads == []  # the driver's plugins were registered while it composed the config
    metrics = pd.read_parquet(f"{out['path']}/metrics.parquet")
    assert list(metrics["epoch"].unique()) == [0]


@pytest.mark.slow
def test_a_ray_train_worker_builds_its_run_from_the_drivers_object(tmp_path, monkeypatch):
    """What ``TorchTrainer`` hands each worker (launch.torch_trainer.build_trainer's ``train_loop_config``):
    the resolved object, which :func:`rayexperts.engine.entry.start_worker` uses without composing."""
    import ray.train

    from rayexperts.engine.entry import start_worker

    cfg = load_config(None, quick_overrides(tmp_path, "worker", **ONE_EPOCH))
    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    loads = forbid_composition(monkeypatch)
    run = start_worker({"config": cfg, "threads": 1, "plugins": registry.ship()})
    assert run.cfg is cfg and (run.rank, run.world) == (0, 1)
    assert len(loads) == 1  # the worker's process registers the driver's plugins once


@pytest.mark.slow
def test_a_tune_trial_trains_the_sweeps_object_with_its_sampled_values(tmp_path, monkeypatch):
    """A one-worker trial (launch.tune.run_trial → engine.entry.tune_trial): the sweep driver's object with the
    trial's sampled values applied (``with_overrides``), never recomposed; it reports each epoch to Tune."""
    import ray.tune

    from rayexperts.launch.tune import run_trial

    cfg = load_config(None, quick_overrides(tmp_path, "sweep", **ONE_EPOCH, **{"tune.metric": "top1"}))
    reports = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "abc_00000"))
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.tune, "report", lambda result, checkpoint=None: reports.append(result))
    loads = forbid_composition(monkeypatch)
    run_trial({"train.lr": 0.0123}, base=cfg, sweep=str(tmp_path / "runs" / "sweep"), plugins=registry.ship())
    assert [r["epoch"] for r in reports] == [0]
    assert len(loads) == 1  # the trial's process registers the driver's plugins once
    trial = next((tmp_path / "runs" / "sweep").iterdir())
    monkeypatch.undo()
    assert RunDir(str(trial)).config().train.lr == 0.0123  # the sampled value, applied to the driver's object
    assert cfg.train.lr == 0.05  # the driver's object itself is left as it was
