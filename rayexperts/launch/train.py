"""One training run of any method (``jobs/train.py``): one worker in a Ray actor, several through Ray Train's
``TorchTrainer``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from rayexperts.config import ConfigError, load_config, to_dict
from rayexperts.eval.tables import shot_table
from rayexperts.launch.actor import start_run, uses_ray_train, worker_resources
from rayexperts.launch.cluster import ClusterUnreachable, dashboard_wanted, ensure_ray, ship_plugins
from rayexperts.rundir import CheckpointMismatch, RunDir, StorageError
from rayexperts.trace import mark


POLL_INTERVAL_S = 0.25  # Ray Train's controller polls its workers this often (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: :func:`rayexperts.engine.worker.train_loop_per_worker`, imported
    there, so that the driver never imports the engine (torchvision, the data pipeline)."""
    from rayexperts.engine.worker import train_loop_per_worker as loop

    loop(loop_config)


def build_trainer(cfg: DictConfig, callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` (run.name must be set)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Worker prints go straight to stdout (Ray forwards them once) instead of through Train's logger.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's Prometheus metrics callbacks: nothing scrapes them on a local instance.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # A worker's report waits until the controller has taken the previous one, and the controller polls
    # every 2 s by default: a short epoch would wait for the poll. Ray propagates this to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_INTERVAL_S))
    cpus, gpus, threads = worker_resources(cfg)
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "threads": threads, "plugins": ship_plugins()},
        scaling_config=ScalingConfig(
            num_workers=int(cfg.scaling.num_workers),
            use_gpu=bool(cfg.scaling.use_gpu),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=RunDir(cfg.run.storage_path).uri,
            failure_config=FailureConfig(max_failures=int(cfg.run.max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=int(cfg.run.num_to_keep)),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=str(cfg.run.ray_log_level)),
        ),
    )


def announce(cfg: DictConfig, what: str) -> RunDir:
    """Check that ``run.storage_path`` can be written (before anything is), then say which rayexperts runs
    and where the results go; returns the run (or job, or sweep) directory."""
    import rayexperts

    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    RunDir(cfg.run.storage_path).check_writable()
    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
    print(f"[rayexperts] {rayexperts.__version__} from {rayexperts.PACKAGE_DIR}; {what}: {rundir}", flush=True)
    return rundir


def run_training(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``cfg``: one worker in one Ray actor (:mod:`rayexperts.launch.actor`), several through Ray
    Train (also one, when Ray Train ``callbacks`` are given); returns the run directory."""
    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    if cfg.run.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"run.mlflow_tracking_uri={cfg.run.mlflow_tracking_uri!r} is set, but mlflow is not "
                          "installed: pip install 'rayexperts[mlflow]'")
    RunDir(cfg.run.storage_path).check_writable()
    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
    resuming = rundir.holds_run_of(cfg)  # another configuration's directory is refused before Ray starts
    one_actor = not uses_ray_train(cfg) and callbacks is None
    ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train=not one_actor))
    if resuming:
        print(f"[rayexperts] {rundir} exists: resuming from its latest checkpoint if there is one", flush=True)
    rundir.write_config(cfg)
    mark(f"fit start {cfg.run.name}")
    if one_actor:
        import ray

        _actor, done = start_run(cfg)
        ray.get(done)
    else:
        fit_trainer(cfg, callbacks)
    mark(f"fit end {cfg.run.name}")
    return {"path": rundir.uri}


def fit_trainer(cfg: DictConfig, callbacks: list | None = None) -> None:
    """Fit ``cfg``'s Ray Train run (its directory checked and its config written by the caller)."""
    result = build_trainer(cfg, callbacks).fit()
    if result.error is not None:
        raise result.error


def final_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Many / Medium / Few / All top-1 (%) of every view at the last evaluated epoch."""
    return shot_table(metrics[metrics["epoch"] == metrics["epoch"].max()], "view")


def parse_cli(argv: Sequence[str], prog: str, description: str) -> argparse.Namespace:
    """``[--config PRESET_OR_YAML] [key=value ...]``, shared by the jobs/ scripts."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="a shipped preset name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. train.epochs=15 model.num_experts=3")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_cli(sys.argv[1:] if argv is None else argv, "jobs/train.py", "One training run on Ray Train.")
    try:
        cfg = load_config(args.config, args.overrides)
        announce(cfg, "run directory")
        out = run_training(cfg)
    except (ConfigError, CheckpointMismatch, StorageError, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = RunDir(out["path"]).read_table("metrics.parquet")
    print(f"\nrun directory: {out['path']}")
    if metrics is not None:
        print(final_table(metrics).to_string())
    return 0
