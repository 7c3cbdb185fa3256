"""The epoch loop of one worker and how it talks to Ray.

:func:`run_epochs` trains a :class:`~rayexperts.engine.run.Run` from a checkpoint to the last epoch:
it evaluates, writes the run directory's tables and logs (rank 0), and hands every epoch's metrics and
checkpoint to a :class:`Reporter`. Two reporters exist: Ray Train's (:func:`train_loop_per_worker`,
what ``TorchTrainer`` runs on every worker) and Ray Tune's (:func:`tune_trial`, a sweep trial that
trains in its own process without a Train run).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from rayexperts import registry
from rayexperts.config import from_dict
from rayexperts.engine.results import ResultWriter
from rayexperts.engine.run import Run, duration
from rayexperts.engine.track import Trackers
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.rundir import RunDir, load_checkpoint, load_model_state, save_checkpoint, unwrap
from rayexperts.trace import mark


def reliability_table(epoch: int, acc: EvalAccumulator, views: list[str]) -> pd.DataFrame:
    """Per view and confidence bin of the test split: count, mean confidence, accuracy (reliability diagrams)."""
    return pd.concat([pd.DataFrame({"epoch": epoch, "view": v, **acc.reliability(v)}) for v in views], ignore_index=True)


def progress_line(epoch: int, epochs: int, rows: list[dict[str, Any]], primary: str,
                  also: tuple[str, ...] = (), eta: float | None = None) -> str:
    """``epoch 3/30 | loss … | lr … | img/s | <view> top-1 % | run ETA …`` for the primary view, the views in
    ``also`` (a two-stage method's comparison: CBD's teacher_ensemble) and the first others, four views in all;
    ``eta``: the seconds the run's remaining epochs should take (none after the last)."""
    r0 = rows[0]
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {r0.get('loss', math.nan):.4f}", f"lr {r0.get('lr', 0):.4g}"]
    parts.append(f"{r0.get('images_per_sec', 0):.0f} img/s")
    first = [primary, *(v for v in also if v != primary)]
    shown = [r for v in first for r in rows if r["view"] == v]
    shown += [r for r in rows if r["view"] not in first][:max(0, 4 - len(shown))]
    parts += [f"{r['view']} {100 * r['top1']:.2f}%" + (" (transductive)" if r.get("transductive") else "")
              for r in shown]
    if "val_top1" in r0:
        parts += [f"val {100 * next(r['val_top1'] for r in rows if r['view'] == primary):.2f}%"]
    if eta is not None and epoch + 1 < epochs:
        parts.append(f"run ETA {duration(eta)}")
    return " | ".join(parts)


def reported_metrics(epoch: int, stats: dict[str, float], rows: list[dict[str, Any]], primary: str) -> dict[str, Any]:
    """What a worker reports for an epoch: the training statistics, the primary view's metrics at the top
    level (``top1``, ``val_top1``, ...), and every view's as ``<view>/<metric>`` (Tune can tune on any view)."""
    metrics: dict[str, Any] = {"epoch": epoch, **stats}
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        metrics.update({f"{row['view']}/{k}": v for k, v in numbers.items()})
        if row["view"] == primary:
            metrics.update(numbers)
            metrics["view"] = primary
    return metrics


@dataclass
class Reporter:
    """How the loop hands an epoch on: ``report(metrics, checkpoint_dir)`` with a local checkpoint
    directory (or None) that the reporter owns from then on; ``latest`` is the checkpoint to resume from
    (a Ray Train / Ray Tune ``Checkpoint``, a local checkpoint directory, or None)."""

    report: Callable[[dict[str, Any], str | None], None]
    latest: Any = None
    label: str = ""  # where ``latest`` lives, for the resume line (a temporary copy's origin)


def resume(run: Run, checkpoint: Any, label: str = "") -> int:
    """Load ``checkpoint`` into ``run``; returns the next epoch to train (0 without one). ``label`` names the
    checkpoint where a temporary copy is loaded (the run directory's, for people)."""
    if checkpoint is None:
        return 0
    if isinstance(checkpoint, str):
        state, where = load_checkpoint(checkpoint, run.ident), checkpoint
    else:
        with checkpoint.as_directory() as d:
            state, where = load_checkpoint(d, run.ident), checkpoint.path
    load_model_state(run.model, state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    epoch = int(state["epoch"])
    if run.rank == 0:
        where = label or where
        print(f"[rayexperts] {run.cfg.run.name}: resuming from {where}: {epoch} of {run.cfg.train.epochs} epochs done",
              flush=True)
    return epoch


def run_epochs(run: Run, reporter: Reporter) -> None:
    """Train ``run`` from its latest checkpoint to the last epoch; rank 0 writes the tables and logs."""
    cfg, rank = run.cfg, run.rank
    if rank == 0 and cfg.run.verbose:
        import rayexperts

        print(f"{cfg.run.name} | rayexperts {rayexperts.__version__} from {rayexperts.PACKAGE_DIR} | "
              f"{run.world} worker(s) on {run.device.type}, {torch.get_num_threads()} torch thread(s) each", flush=True)
    start_epoch = resume(run, reporter.latest, reporter.label)
    mark(f"run ready {cfg.run.name}")
    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
    writer = ResultWriter(rundir, start_epoch) if rank == 0 else None
    trackers = Trackers(cfg, rundir, start_epoch) if rank == 0 else None
    epochs = int(cfg.train.epochs)
    every_eval, every_ckpt = int(cfg.eval.every), int(cfg.run.checkpoint_every)
    primary = run.method.primary_view_for(cfg)
    finished, started = False, time.time()
    try:
        for epoch in range(start_epoch, epochs):
            mark(f"epoch start {cfg.run.name} {epoch}")
            stats = run.train_epoch(epoch)
            mark(f"epoch trained {cfg.run.name} {epoch}")
            last = epoch == epochs - 1
            metrics: dict[str, Any] = {"epoch": epoch, **stats}
            if last or (epoch + 1) % every_eval == 0:
                accs = run.evaluate(last)
                rows, classes = run.result_rows(epoch, accs, stats)
                if writer is not None and trackers is not None:
                    writer.add(rows, classes, reliability_table(epoch, accs[""], accs[""].views))
                    trackers.log(epoch, rows, stats)
                    if cfg.run.verbose:
                        also = run.method.summary_views()
                        eta = (time.time() - started) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
                        print(f"{cfg.run.name} | {progress_line(epoch, epochs, rows, primary, also, eta)}", flush=True)
                metrics = reported_metrics(epoch, stats, rows, primary)
            checkpoint = None
            if (last or (epoch + 1) % every_ckpt == 0) and rank == 0:
                checkpoint = tempfile.mkdtemp(prefix="rayexperts-ckpt-")
                save_checkpoint(checkpoint, model=run.model, optimizer=run.optimizer, epoch=epoch + 1, ident=run.ident)
            reporter.report(metrics, checkpoint)
            mark(f"epoch done {cfg.run.name} {epoch}")
        finished = True
    finally:
        if trackers is not None:
            trackers.close(finished)


# -------------------------------------------------------------------------------- Ray Train


def _set_ray_train_log_level(level: str) -> None:
    """Ray Train's worker loggers; the per-report one is named by its file path, not ``ray.train``."""
    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(level)
    except ImportError:  # another Ray layout: only the package logger
        pass


def _prepare(loop_config: dict[str, Any]):
    """The driver's plugins registered, the config rebuilt, the worker's CPU share of torch threads."""
    registry.load_plugins(shipped=loop_config.get("plugins"))
    cfg = from_dict(loop_config["config"])
    threads = int(loop_config.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return cfg


def start_worker(loop_config: dict[str, Any]) -> Run:
    """This Ray Train worker's :class:`Run`: plugins, Ray Train's log level, torch threads
    (``loop_config["threads"]``), its device, and DDP when there are several workers."""
    import ray.train
    import ray.train.torch

    mark("worker start")
    cfg = _prepare(loop_config)
    _set_ray_train_log_level(str(cfg.run.ray_log_level))
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    run = Run(cfg, ctx.get_world_rank(), ctx.get_world_size(), device)
    if run.world > 1:
        run.model = ray.train.torch.prepare_model(run.model, move_to_device=False)
    run.compile()
    return run


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What ``TorchTrainer`` runs on each worker (Ray Train V2). Rank 0's checkpoint is uploaded in the
    background (``CheckpointUploadMode.ASYNC``): the next epoch does not wait for the copy."""
    import ray.train
    from ray.train import CheckpointUploadMode

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    run_epochs(start_worker(loop_config), Reporter(report, ray.train.get_checkpoint()))


# -------------------------------------------------------------------------------- Ray Tune


def _one_worker_run(loop_config: dict[str, Any]) -> Run:
    """The :class:`Run` of a one-worker run trained in this process (a Tune trial or a run's actor)."""
    cfg = _prepare(loop_config)
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


def tune_trial(loop_config: dict[str, Any], prepare: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """A one-worker sweep trial trained in the trial's own process (Ray Tune's function-trainable
    pattern: no Train run to start). ``prepare`` turns a worker report into Tune's (None: skip it)."""
    import shutil

    import ray.tune

    mark("trial worker start")
    run = _one_worker_run(loop_config)

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


# -------------------------------------------------------------------------------- this process


def train_here(loop_config: dict[str, Any]) -> None:
    """One worker trained in this process, without Ray Train (a one-worker run's actor): checkpoints go to
    the run directory as ``checkpoint_<epoch>`` (the latest ``run.num_to_keep`` kept), and a re-run resumes
    from the newest one there."""
    import shutil

    run = _one_worker_run(loop_config)
    cfg = run.cfg
    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)

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
