"""The engine's Ray adapters: what runs inside the processes Ray starts for a run, each a thin shell around the
fit loop (:func:`rayexperts.engine.fit.run_epochs`) with its own :class:`~rayexperts.engine.fit.Reporter`.

- :func:`ray_train_worker`: what Ray Train's ``TorchTrainer`` runs on each worker (Ray Train V2;
  :mod:`rayexperts.launch.torch_trainer` builds the trainer);
- :func:`tune_trial`: a one-worker sweep trial trained in the trial's own process (Ray Tune's function
  trainable, :mod:`rayexperts.launch.tune`);
- :func:`train_one_worker`: one worker trained in this process, checkpointing into the run directory (a
  one-worker run's Ray actor, :mod:`rayexperts.launch.actor`, or ``run.ray=false``).

Each takes the driver's resolved config object (pickled by Ray; never recomposed here) and the worker's torch
thread count. Each process registers the driver's plugins once (:func:`rayexperts.registry.load_plugins`): a
Train worker in :func:`start_worker`, the actor or the trial at their own entry. The driver imports this module
to name its functions: torch and the engine are imported only when one of them runs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rayexperts.trace import mark

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from rayexperts.engine.run import Run


def _use_threads(threads: int) -> None:
    """This worker's CPU share of torch threads (0: leave torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------------------- Ray Train


def _set_ray_train_log_level(level: str) -> None:
    """Ray Train's worker loggers; the per-report one is named by its file path, not ``ray.train``."""
    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(level)
    except ImportError:  # another Ray layout: only the package logger
        pass


def start_worker(loop_config: dict[str, Any]) -> Run:
    """This Ray Train worker's :class:`~rayexperts.engine.run.Run` from the trainer's ``train_loop_config``
    (``config``: the resolved config; ``threads``: torch threads; ``plugins``: what the driver shipped): the
    plugins, Ray Train's log level, its device, and DDP when there are several workers."""
    import ray.train
    import ray.train.torch
    import torch

    from rayexperts import registry
    from rayexperts.engine.run import Run

    mark("worker start")
    registry.load_plugins(shipped=loop_config.get("plugins"))
    cfg: DictConfig = loop_config["config"]
    _use_threads(int(loop_config.get("threads") or 0))
    _set_ray_train_log_level(str(cfg.run.ray_log_level))
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    run = Run(cfg, ctx.get_world_rank(), ctx.get_world_size(), device)
    if run.world > 1:
        run.model = ray.train.torch.prepare_model(run.model, move_to_device=False)
    run.compile()
    return run


def ray_train_worker(loop_config: dict[str, Any]) -> None:
    """What ``TorchTrainer`` runs on each worker (Ray Train V2). Rank 0's checkpoint is uploaded in the
    background (``CheckpointUploadMode.ASYNC``): the next epoch does not wait for the copy."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from rayexperts.engine.fit import Reporter, run_epochs

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    run_epochs(start_worker(loop_config), Reporter(report, ray.train.get_checkpoint()))


# -------------------------------------------------------------------------------- one worker, this process


def one_worker_run(cfg: DictConfig, threads: int = 0) -> Run:
    """The :class:`~rayexperts.engine.run.Run` of a one-worker run trained in this process (a Tune trial, a
    sweep trial's seed, a run's actor), with ``threads`` torch threads (0: torch's default)."""
    import torch

    from rayexperts.engine.run import Run

    _use_threads(threads)
    device = torch.device("cpu")
    if cfg.scaling.use_gpu:
        # GPU finding F15: an explicit index (Ray's CUDA_VISIBLE_DEVICES makes it the run's GPU); GPU finding
        # F14: a fractional share caps this process's memory, so one trial OOMs cleanly, not its neighbours.
        device = torch.device("cuda", torch.cuda.current_device())
        share = float(cfg.scaling.gpus_per_worker)
        if 0 < share < 1:
            torch.cuda.set_per_process_memory_fraction(share, device)
    run = Run(cfg, 0, 1, device)
    run.compile()
    return run


def tune_trial(cfg: DictConfig, threads: int, prepare: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """A one-worker sweep trial trained in the trial's own process (Ray Tune's function-trainable
    pattern: no Train run to start). ``prepare`` turns a worker report into Tune's (None: skip it)."""
    import ray.tune

    from rayexperts.engine.fit import Reporter, run_epochs

    mark("trial worker start")
    run = one_worker_run(cfg, threads)

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        result = prepare(metrics)
        if result is None:
            if checkpoint is not None:
                shutil.rmtree(checkpoint, ignore_errors=True)
            return
        if checkpoint is None:
            ray.tune.report(result)
            return
        try:
            ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint))
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)

    run_epochs(run, Reporter(report, ray.tune.get_checkpoint()))


def train_one_worker(cfg: DictConfig, threads: int = 0) -> None:
    """One worker trained in this process, without Ray Train (a one-worker run's actor, or ``run.ray=false``):
    checkpoints go to the run directory as ``checkpoint_<epoch>`` (the latest ``run.num_to_keep`` kept), and a
    re-run resumes from the newest one there."""
    from rayexperts.engine.fit import Reporter, run_epochs
    from rayexperts.rundir import RunDir

    run = one_worker_run(cfg, threads)
    rundir = RunDir.for_config(cfg)

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        if checkpoint is not None:
            try:
                rundir.put_checkpoint(checkpoint, int(metrics["epoch"]) + 1, int(cfg.run.num_to_keep))
            finally:
                shutil.rmtree(checkpoint, ignore_errors=True)

    latest = rundir.latest_checkpoint()
    local = None
    if latest is not None:
        local = tempfile.mkdtemp(prefix="rayexperts-resume-")
        latest.get_file("checkpoint.pt", f"{local}/checkpoint.pt")
    try:
        run_epochs(run, Reporter(report, local, str(latest) if latest is not None else ""))
    finally:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
