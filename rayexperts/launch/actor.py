"""A run's resources, and a run trained from its own Ray actor.

A one-worker run needs no distributed training: it trains inside one Ray actor that holds the worker's
CPUs/GPUs (no Ray Train controller and worker group to start, about 15 s less on 2 cores), checkpoints
into its run directory and resumes from the newest one there; ``run.max_failures`` restarts the actor.
A multi-worker run is a Ray Train run launched from the actor, which then holds nothing. ``jobs/train.py``
trains one such actor; ``jobs/cbd_ens.py`` trains its K teachers as K actors at once. With ``run.ray=false``
the driver calls the same :meth:`RunActor.train` itself (:func:`train_in_process`): no Ray.
"""

from __future__ import annotations

import traceback
from typing import Any

from omegaconf import DictConfig

from rayexperts import registry
from rayexperts.launch.cluster import ship_plugins
from rayexperts.launch.torch_trainer import fit_trainer, local_cpus, uses_ray_train, worker_resources
from rayexperts.rundir import RunDir
from rayexperts.trace import mark


class RunActor:
    """One run, as a Ray actor: a one-worker run trains in the actor's own process (the actor holds the
    worker's CPUs/GPUs); a multi-worker run is a Ray Train run launched from here (the actor holds
    nothing: its workers do)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:  # Ray's prefix for this actor's output lines
        return self.name

    def train(self, cfg: DictConfig, plugins: dict[str, Any] | None, threads: int) -> str:
        """Train the driver's resolved config ``cfg`` (never recomposed here); ``plugins``: what the driver
        shipped (:func:`~rayexperts.launch.cluster.ship_plugins`), registered once in this process (None: this
        is the driver's process). On failure the traceback goes to ``<run dir>/error.log`` before re-raising."""
        mark(f"actor start {self.name}")
        if plugins is not None:
            registry.load_plugins(shipped=plugins)
        rundir = RunDir.for_config(cfg)
        try:
            if uses_ray_train(cfg):
                fit_trainer(cfg)  # the caller checked the directory and wrote config.yaml
            else:
                from rayexperts.engine.entry import train_one_worker  # this actor's process, not the driver

                train_one_worker(cfg, threads)
        except BaseException:
            rundir.write_text("error.log", traceback.format_exc())
            raise
        rundir.delete("error.log")
        return rundir.uri


def train_in_process(cfg: DictConfig) -> str:
    """``run.ray=false``: :meth:`RunActor.train` called in this process instead of in a Ray actor: the same
    config object (this process's plugins already registered), torch threads (this machine's CPUs, or
    ``scaling.cpus_per_worker``), loop, checkpoints and run directory, and no Ray imported. The caller has
    checked the run directory and written ``config.yaml``; the process's torch thread count is restored
    afterwards."""
    import torch

    _cpus, _gpus, threads = worker_resources(cfg, total_cpus=local_cpus())
    before = torch.get_num_threads()
    try:
        return RunActor(str(cfg.run.name)).train(cfg, None, threads)
    finally:
        torch.set_num_threads(before)


def start_run(cfg: DictConfig) -> tuple[Any, Any]:
    """Start ``cfg``'s run in a new :class:`RunActor`: (the actor, the ``ObjectRef`` of its run directory).
    Keep the actor while the run lasts. Ray must be running, and the caller has checked the run directory
    and written its ``config.yaml``."""
    import ray

    cpus, gpus, threads = worker_resources(cfg)
    resources = {"num_cpus": 0} if uses_ray_train(cfg) else {"num_cpus": cpus, "num_gpus": gpus}
    failures = int(cfg.run.max_failures)
    actor = ray.remote(RunActor).options(**resources, max_restarts=failures, max_task_retries=failures)
    handle = actor.remote(str(cfg.run.name))
    return handle, handle.train.remote(cfg, ship_plugins(), threads)  # the resolved config, pickled by Ray
