"""The per-epoch tables of a run directory (docs/results.md): ``metrics.parquet``, ``classes.parquet``,
``reliability.parquet``, written by rank 0 through :class:`~rayexperts.rundir.RunDir`."""

from __future__ import annotations

from typing import Any

import pandas as pd

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
