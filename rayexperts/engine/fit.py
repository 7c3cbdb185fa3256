"""The fit loop of one worker: :func:`run_epochs` trains a :class:`~rayexperts.engine.run.Run` from its latest
checkpoint (:func:`resume`) to the last epoch, evaluates, writes the run directory's tables and logs (rank 0),
and hands every epoch's metrics and checkpoint to a :class:`Reporter` (Ray Train's, Ray Tune's or the run
directory's: :mod:`rayexperts.engine.entry`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rayexperts.engine.loop import evaluate_splits, train_epoch
from rayexperts.engine.results import ResultWriter, progress_line, reliability_table, reported_metrics, result_rows
from rayexperts.engine.run import Run
from rayexperts.engine.track import Trackers
from rayexperts.rundir import RunDir, load_checkpoint, load_model_state, save_checkpoint
from rayexperts.trace import mark


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
    rundir = RunDir.for_config(cfg)
    writer = ResultWriter(rundir, start_epoch) if rank == 0 else None
    trackers = Trackers(cfg, rundir, start_epoch) if rank == 0 else None
    epochs = int(cfg.train.epochs)
    every_eval, every_ckpt = int(cfg.eval.every), int(cfg.run.checkpoint_every)
    primary = run.method.primary_view_for(cfg)
    finished, started = False, time.time()
    try:
        for epoch in range(start_epoch, epochs):
            mark(f"epoch start {cfg.run.name} {epoch}")
            stats = train_epoch(run, epoch)
            mark(f"epoch trained {cfg.run.name} {epoch}")
            last = epoch == epochs - 1
            metrics: dict[str, Any] = {"epoch": epoch, **stats}
            if last or (epoch + 1) % every_eval == 0:
                accs = evaluate_splits(run, last)
                rows, classes = result_rows(run, epoch, accs, stats)
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
