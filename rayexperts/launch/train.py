"""One training run of any method (``jobs/train.py``): one worker in a Ray actor, several through Ray Train's
``TorchTrainer``; with ``run.ray=false`` one worker in this process, without Ray."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from rayexperts.config import ConfigError, result_settings, settings
from rayexperts.errors import InputError, RunError
from rayexperts.eval.tables import shot_table
from rayexperts.launch.actor import start_run, train_in_process
from rayexperts.launch.torch_trainer import fit_trainer, uses_ray_train
from rayexperts.launch.cluster import dashboard_wanted, ensure_ray
from rayexperts.rundir import RunDir
from rayexperts.trace import mark


def default_run_name(cfg: DictConfig) -> str:
    """``<method>-<data>-<hash>``: the hash (8 hex digits) covers every key that can change the result
    (:func:`rayexperts.config.result_settings`), so the same command names the same run (and resumes it), a
    changed setting another, and paths, resources and ``tune.*`` change nothing."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(result_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.method}-{cfg.data.name}-{digest}"


def timestamped_run_name(cfg: DictConfig, prefix: str = "") -> str:
    """``<prefix><method>-<data>-<date>-<time>``: a fresh name each time (a sweep's default: re-running a sweep
    continues it only with the same ``run.name``)."""
    return f"{prefix}{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def announce(cfg: DictConfig, what: str) -> RunDir:
    """Check what can be checked before anything starts (:func:`preflight`: the data, the storage), then say
    which rayexperts runs and where the results go; returns the run (or job, or sweep) directory."""
    import rayexperts

    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    preflight(cfg)
    rundir = RunDir.for_config(cfg)
    print(f"[rayexperts] {rayexperts.__version__} from {rayexperts.PACKAGE_DIR}; {what}: {rundir}", flush=True)
    return rundir


class RunFailed(RunError):
    """A run failed inside Ray; the message is one line naming the run, the error and its traceback's file."""


_PREFLIGHT_PASSED: set[str] = set()  # the settings preflight() has passed in this process


def preflight(cfg: DictConfig) -> None:
    """Everything about ``cfg`` that can be checked in the driver, before Ray starts and before anything is
    written: the data set's ``data.root`` and split files, ``model.weights``, MLflow, the storage. Once per
    config and process: the same settings checked again (a job's :func:`announce`, then :func:`run_training`)
    pass at once."""
    import json

    from rayexperts.config.validation import check_weights_source
    from rayexperts.launch.ray_job import check_storage
    from rayexperts.registry import DATASETS

    check_storage(cfg)  # first: in a Ray job, storage in its temporary working directory is refused
    key = json.dumps(settings(cfg), sort_keys=True, default=str)
    if key in _PREFLIGHT_PASSED:
        return
    check_weights_source(cfg.model)
    DATASETS.get(str(cfg.data.name)).check(cfg.data, str(cfg.data.name))
    if cfg.model.weights or cfg.model.finetune != "full" or str(cfg.model.backbone).startswith("timm/"):
        from rayexperts.models.backbones import check_backbone  # docs/pretrained.md: imports torch, hence only here

        check_backbone(cfg.model, int(DATASETS.get(str(cfg.data.name)).in_channels))
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("run.tensorboard=true, but tensorboardX is not installed: pip install tensorboardX, or set "
                          "run.tensorboard=false")
    if cfg.run.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"run.mlflow_tracking_uri={cfg.run.mlflow_tracking_uri!r} is set, but mlflow is not "
                          "installed: pip install 'rayexperts[mlflow]'")
    RunDir(cfg.run.storage_path).check_writable()
    _PREFLIGHT_PASSED.add(key)


def needs_ray(cfg: DictConfig, what: str) -> None:
    """Refuse ``what`` (a job that needs Ray) for a config with ``run.ray=false``, in one line naming the key."""
    if not cfg.run.ray:
        raise ConfigError(f"run.ray=false: {what} needs Ray; set run.ray=true (without Ray: one run of one worker, "
                          "rayexperts train)")


def root_error(error: BaseException) -> BaseException:
    """The exception a Ray task, actor or Train worker raised, inside Ray's wrappers."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None) or {}
        inner = getattr(error, "cause", None) or (next(iter(failures.values())) if failures else None) \
            or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def run_failure(error: BaseException, rundir: RunDir, cfg: DictConfig) -> BaseException:
    """The one-line error a failed run becomes in the driver: the project's own error as it was raised, anything
    else as :class:`RunFailed` naming the run and its traceback's file. A run that failed before its first
    evaluation is marked failed (``FAILED``: ``load_runs`` skips it)."""
    import traceback

    root = root_error(error)
    if not rundir.is_file("error.log"):
        rundir.write_text("error.log", "".join(traceback.format_exception(error)))
    message = str(root).strip().splitlines()
    line = message[-1].strip() if message else type(root).__name__
    rundir.mark_failed(line)
    if cfg.run.verbose:
        print(rundir.read_text("error.log"), file=sys.stderr)
    if isinstance(root, (InputError, RunError)):  # the project's own: the one-line message is the whole story
        return root
    return RunFailed(f"run {cfg.run.name} failed: {type(root).__name__}: {line} (traceback: {rundir.uri}/error.log)")


def run_training(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``cfg``: one worker in one Ray actor (:mod:`rayexperts.launch.actor`), several through Ray
    Train (also one, when Ray Train ``callbacks`` are given), or with ``run.ray=false`` one worker in this
    process by the actor's own code (:func:`~rayexperts.launch.actor.train_in_process`, no Ray imported);
    returns the run directory. A finished run is not trained again (nor Ray started); a checkpointed run
    resumes with the schedule it was trained with."""
    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    preflight(cfg)
    rundir = RunDir.for_config(cfg)
    resuming = rundir.holds_run_of(cfg)  # another configuration's directory is refused before Ray starts
    if resuming:
        rundir.check_schedule(cfg)
        if rundir.holds_finished_run(cfg):
            print(f"[rayexperts] {cfg.run.name}: already finished ({cfg.train.epochs}/{cfg.train.epochs} epochs) in "
                  f"{rundir}: nothing to train", flush=True)
            return {"path": rundir.uri, "already_finished": True}
    if callbacks is not None:
        needs_ray(cfg, "a run with Ray Train callbacks")
    one_actor = not uses_ray_train(cfg) and callbacks is None
    if cfg.run.ray:
        ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train=not one_actor))
    if resuming:
        latest = rundir.latest_checkpoint()
        print(f"[rayexperts] {cfg.run.name}: resuming from {latest}" if latest is not None else
              f"[rayexperts] {cfg.run.name}: {rundir} holds no checkpoint yet: starting at epoch 1", flush=True)
    rundir.write_config(cfg)
    rundir.clear_failed()
    mark(f"fit start {cfg.run.name}")
    try:
        if not cfg.run.ray:
            train_in_process(cfg)
        elif one_actor:
            import ray

            _actor, done = start_run(cfg)
            ray.get(done)
        else:
            fit_trainer(cfg, callbacks)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (the traceback goes to error.log)
        raise run_failure(e, rundir, cfg) from None
    mark(f"fit end {cfg.run.name}")
    return {"path": rundir.uri}


def final_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Many / Medium / Few / All top-1 (%) of every view at the last evaluated epoch."""
    return shot_table(metrics[metrics["epoch"] == metrics["epoch"].max()], "view")
