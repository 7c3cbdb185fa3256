"""A run's results and progress (docs/results.md): an evaluation's metrics rows and per-class table
(:func:`result_rows`), the reliability table, what a worker reports to Ray (:func:`reported_metrics`), the per-epoch
tables of the run directory (``metrics.parquet``, ``classes.parquet``, ``reliability.parquet``, written by rank 0:
:class:`ResultWriter`), and the lines people read (:func:`progress_line` after an evaluation,
:func:`step_progress` inside a long epoch). People see % and 1-based epochs; the files keep fractions and
0-based epochs. ``run`` is a :class:`~rayexperts.engine.run.Run`, typed ``Any`` (``engine.loop`` imports this
module, ``engine.run`` imports ``engine.loop``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from rayexperts.engine.tta import is_tta_view
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.rundir import RunDir

METRIC_COLUMNS = ["epoch", "view", "top1", "top1_many", "top1_medium", "top1_few", "ece", "timestamp"]
CLASS_COLUMNS = ["epoch", "view", "class_id", "class_name", "train_count", "shot_group", "accuracy"]


class ResultWriter:
    """Accumulates per-epoch rows on rank 0 and rewrites the Parquet tables after each evaluation.

    On resume, rows of epochs at or after ``start_epoch`` (written after the checkpoint the run
    resumed from) are dropped, so the tables end with exactly one row per (epoch, view).
    """

    def __init__(self, rundir: RunDir, start_epoch: int = 0) -> None:
        self.rundir = rundir
        self.metrics: list[dict[str, Any]] = []
        old = rundir.read_table("metrics.parquet")
        if old is not None and start_epoch > 0:
            self.metrics = old[old["epoch"] < start_epoch].to_dict("records")

    def add(self, rows: list[dict[str, Any]], classes: pd.DataFrame, reliability: pd.DataFrame) -> None:
        """Append one evaluation's rows; ``classes`` and ``reliability`` (latest evaluation) replace the old."""
        self.metrics.extend(rows)
        df = pd.DataFrame(self.metrics)
        df["epoch"] = df["epoch"].astype("int64")
        self.rundir.write_table("metrics.parquet", df)
        self.rundir.write_table("classes.parquet", classes)
        self.rundir.write_table("reliability.parquet", reliability)


# --------------------------------------------------------------------------------------- rows


def result_rows(run: Any, epoch: int, accs: dict[str, EvalAccumulator],
                train_stats: dict[str, float]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """One metrics row per view of ``run``'s evaluation ``accs`` (by split prefix), and its per-class table."""
    now = time.time()
    rows = []
    test = accs[""]
    extra = [v for v in test.views if v not in run.views]  # learnt on the test images, or eval.tta's ensembles
    transductive = [v for v in extra if not is_tta_view(v)]  # eval.tta's use each image alone (engine.tta)
    primary = run.method.primary_view_for(run.cfg)
    for view in [*run.views, *extra]:
        row: dict[str, Any] = {"epoch": epoch, "view": view, "transductive": view in transductive}
        for prefix, acc in accs.items():
            if view in acc.views:
                row.update(acc.summary(view, run.groups, prefix))
            if view == "ensemble":
                row.update(acc.expert_kl_summary(run.groups, prefix))
            if view == primary:
                for name in acc.stats:
                    row.update(acc.stat_summary(name, run.groups, prefix))
        row.update(train_stats)
        row.update(timestamp=now, workers=run.world, torch_threads=torch.get_num_threads())
        rows.append(row)
    data = run.data
    classes = pd.concat(
        [
            pd.DataFrame(
                {
                    "epoch": epoch,
                    "view": view,
                    "class_id": np.arange(data.num_classes),
                    "class_name": data.class_names,
                    "train_count": data.train_counts.astype("int64"),
                    "shot_group": run.groups,
                    "accuracy": test.per_class_accuracy(view),
                }
            )
            for view in [*run.views, *extra]
        ],
        ignore_index=True,
    )
    return rows, classes


def reliability_table(epoch: int, acc: EvalAccumulator, views: list[str]) -> pd.DataFrame:
    """Per view and confidence bin of the test split: count, mean confidence, accuracy (reliability diagrams)."""
    return pd.concat([pd.DataFrame({"epoch": epoch, "view": v, **acc.reliability(v)}) for v in views], ignore_index=True)


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


# ----------------------------------------------------------------------------------- progress


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


def step_progress(run: Any, epoch: int) -> Callable[[int, int, float], None] | None:
    """Rank 0's line inside a long epoch (``run.verbose``): where it is, images/s, the epoch's ETA and the
    whole run's (the epochs left at this rate; evaluation not counted). None on other ranks or when quiet."""
    if run.rank != 0 or not run.cfg.run.verbose:
        return None
    epochs, name = int(run.cfg.train.epochs), run.cfg.run.name
    per_rank = int(run.cfg.train.batch_size) // run.world

    def say(step: int, steps: int, rate: float) -> None:
        left, whole = time_left(step, steps, epoch, epochs, per_rank / max(rate, 1e-9))
        print(f"{name} | epoch {epoch + 1}/{epochs} | step {step}/{steps} | {rate:.0f} img/s | "
              f"epoch ETA {left:.0f} s | run ETA {duration(whole)}", flush=True)

    return say


def time_left(step: int, steps: int, epoch: int, epochs: int, seconds_per_step: float) -> tuple[float, float]:
    """(seconds left in epoch ``epoch``, 0-based, after ``step`` of its ``steps``; seconds left in the run: that
    and every later epoch's ``steps``), at ``seconds_per_step``."""
    epoch_left = (steps - step) * seconds_per_step
    return epoch_left, epoch_left + (epochs - epoch - 1) * steps * seconds_per_step


def duration(seconds: float) -> str:
    """A time left for people: ``45 s``, ``12.5 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
