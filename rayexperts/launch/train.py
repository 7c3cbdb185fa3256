"""One training run of any method (``jobs/train.py``): one worker in a Ray actor, several through Ray Train's
``TorchTrainer``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from rayexperts.config import ConfigError
from rayexperts.data.errors import DataError
from rayexperts.eval.tables import shot_table
from rayexperts.launch.actor import start_run
from rayexperts.launch.trainer import fit_trainer, uses_ray_train
from rayexperts.launch.cluster import dashboard_wanted, ensure_ray
from rayexperts.rundir import CheckpointMismatch, RunDir, StorageError
from rayexperts.trace import mark


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def announce(cfg: DictConfig, what: str) -> RunDir:
    """Check what can be checked before anything starts (:func:`preflight`: the data, the storage), then say
    which rayexperts runs and where the results go; returns the run (or job, or sweep) directory."""
    import rayexperts

    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    preflight(cfg)
    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
    print(f"[rayexperts] {rayexperts.__version__} from {rayexperts.PACKAGE_DIR}; {what}: {rundir}", flush=True)
    return rundir


class RunFailed(RuntimeError):
    """A run failed inside Ray; the message is one line naming the run, the error and its traceback's file."""


# The project's own errors: their one-line message is the whole story, whichever process raised them.
PROJECT_ERRORS = (ConfigError, DataError, CheckpointMismatch, StorageError)


def preflight(cfg: DictConfig) -> None:
    """Everything about ``cfg`` that can be checked in the driver, before Ray starts and before anything is
    written: the data set's ``data.root`` and split files, MLflow, the storage."""
    from rayexperts.registry import DATASETS

    DATASETS.get(str(cfg.data.name)).check(cfg.data, str(cfg.data.name))
    if cfg.run.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"run.mlflow_tracking_uri={cfg.run.mlflow_tracking_uri!r} is set, but mlflow is not "
                          "installed: pip install 'rayexperts[mlflow]'")
    RunDir(cfg.run.storage_path).check_writable()


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
    if isinstance(root, PROJECT_ERRORS):
        return root
    return RunFailed(f"run {cfg.run.name} failed: {type(root).__name__}: {line} (traceback: {rundir.uri}/error.log)")


def run_training(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``cfg``: one worker in one Ray actor (:mod:`rayexperts.launch.actor`), several through Ray
    Train (also one, when Ray Train ``callbacks`` are given); returns the run directory. A finished run is not
    trained again (nor Ray started); a checkpointed run resumes with the schedule it was trained with."""
    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    preflight(cfg)
    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
    resuming = rundir.holds_run_of(cfg)  # another configuration's directory is refused before Ray starts
    if resuming:
        rundir.check_schedule(cfg)
        if rundir.holds_finished_run(cfg):
            print(f"[rayexperts] {cfg.run.name}: already finished ({cfg.train.epochs}/{cfg.train.epochs} epochs) in "
                  f"{rundir}: nothing to train", flush=True)
            return {"path": rundir.uri, "already_finished": True}
    one_actor = not uses_ray_train(cfg) and callbacks is None
    ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train=not one_actor))
    if resuming:
        latest = rundir.latest_checkpoint()
        print(f"[rayexperts] {cfg.run.name}: resuming from {latest}" if latest is not None else
              f"[rayexperts] {cfg.run.name}: {rundir} holds no checkpoint yet: starting at epoch 1", flush=True)
    rundir.write_config(cfg)
    rundir.clear_failed()
    mark(f"fit start {cfg.run.name}")
    try:
        if one_actor:
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


def job_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """``[--config PRESET_OR_YAML] [--print-config] [key=value ...]``, shared by the jobs."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a shipped preset name (rayexperts presets lists them) or a YAML file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, each value with the layer that set it, and exit (no Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. train.epochs=15 model.num_experts=3")
    return parser


def parse_cli(argv: Sequence[str], prog: str, description: str, epilog: str = "") -> argparse.Namespace:
    return job_parser(prog, description, epilog).parse_args(list(argv))


