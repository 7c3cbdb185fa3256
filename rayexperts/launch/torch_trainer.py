"""A run's workers: their resources and torch threads, and a multi-worker run through Ray Train V2's
``TorchTrainer`` (one per-worker function, plain PyTorch: :func:`rayexperts.engine.entry.ray_train_worker`, on
``scaling.num_workers`` workers, each given the driver's resolved config)."""

from __future__ import annotations

import math
import os

from omegaconf import DictConfig

from rayexperts.launch.cluster import ship_plugins
from rayexperts.rundir import RunDir


def worker_resources(cfg: DictConfig, total_cpus: float | None = None) -> tuple[float, float, int]:
    """(CPUs per worker, GPUs per worker, torch threads per worker).

    ``scaling.cpus_per_worker`` = 0 gives each worker an equal share of the cluster's CPUs (``total_cpus``:
    this machine's, for a run trained in this process; None: Ray's cluster), and every worker runs exactly
    that many torch threads (oversubscribed threads on shared cores made each process 5–7× slower here).
    """
    cpus = float(cfg.scaling.cpus_per_worker)
    if cpus <= 0:
        if total_cpus is None:
            import ray

            total_cpus = ray.cluster_resources().get("CPU", 1)
        cpus = float(max(1, math.floor(total_cpus / cfg.scaling.num_workers)))
    gpus = float(cfg.scaling.gpus_per_worker) if cfg.scaling.use_gpu else 0.0
    return cpus, gpus, worker_threads(cpus)


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; what a local Ray instance would count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def uses_ray_train(*cfgs: DictConfig) -> bool:
    """True when any of these runs has several workers: a Ray Train run (a one-worker run is one actor)."""
    return any(int(cfg.scaling.num_workers) > 1 for cfg in cfgs)


def worker_threads(cpus: float) -> int:
    """Torch threads of a worker given ``cpus``: its whole CPUs, at least one (half a CPU runs one)."""
    return max(1, int(cpus))


POLL_INTERVAL_S = 0.25  # Ray Train's controller polls its workers this often (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)


def build_trainer(cfg: DictConfig, callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` (run.name must be set)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayexperts.engine.entry import ray_train_worker  # torch is imported by the workers, not here

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
        ray_train_worker,
        train_loop_config={"config": cfg, "threads": threads, "plugins": ship_plugins()},
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


def fit_trainer(cfg: DictConfig, callbacks: list | None = None) -> None:
    """Fit ``cfg``'s Ray Train run (its directory checked and its config written by the caller)."""
    result = build_trainer(cfg, callbacks).fit()
    if result.error is not None:
        raise result.error
