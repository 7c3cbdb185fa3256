"""What a cluster user watches besides the Parquet tables: TensorBoard event files in every run
directory (``tensorboard --logdir runs/``) and, with ``run.mlflow_tracking_uri``, an MLflow run.

Rank 0 logs every evaluated epoch: each view's metrics as ``<view>/<metric>`` (test, and ``val_*``
when there is a validation split) and the training statistics as ``train/<name>`` (the loss and
its terms, lr, images/s). A resumed run hides the events after the epoch it resumed from
(TensorBoard's ``purge_step``), so every epoch shows once.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rayexperts.config import flatten, settings
from rayexperts.rundir import RunDir

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run_id"
_SKIPPED = ("epoch", "view", "timestamp", "num_samples", "val_num_samples")


def scalars(rows: list[dict[str, Any]], train_stats: dict[str, float]) -> dict[str, float]:
    """One evaluation's numbers by tag: ``<view>/<metric>`` and ``train/<statistic>`` (NaNs left out)."""
    out = {f"train/{k}": float(v) for k, v in train_stats.items()}
    for row in rows:
        for k, v in row.items():
            if k not in _SKIPPED and k not in train_stats and isinstance(v, (int, float)):
                out[f"{row['view']}/{k}"] = float(v)
    return {k: v for k, v in out.items() if math.isfinite(v)}


class TensorBoardLog:
    """Event files under ``<run>/tensorboard/``; for a URI run directory they are written locally and
    copied there after every epoch."""

    def __init__(self, rundir: RunDir, start_epoch: int) -> None:
        from tensorboardX import SummaryWriter

        self.target = rundir.child(TENSORBOARD_DIR)
        self._tmp = None if rundir.is_local else tempfile.TemporaryDirectory(prefix="rayexperts-tb-")
        logdir = self.target.path if self._tmp is None else self._tmp.name
        self.writer = SummaryWriter(logdir=logdir, purge_step=start_epoch if start_epoch > 0 else None,
                                    flush_secs=3600, filename_suffix=f".from_epoch_{start_epoch}")

    def log(self, epoch: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=epoch)
        self.writer.flush()
        if self._tmp is not None:
            for f in Path(self._tmp.name).iterdir():
                self.target.write_bytes(f.name, f.read_bytes())

    def close(self) -> None:
        self.writer.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class MlflowLog:
    """One MLflow run per run directory (its id kept in the run directory, so a resumed run continues it):
    the resolved config as parameters, every epoch's scalars as metrics (step = epoch)."""

    def __init__(self, cfg: DictConfig, rundir: RunDir) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=str(cfg.run.mlflow_tracking_uri))
        run_id = rundir.read_text(MLFLOW_RUN_FILE).strip() if rundir.is_file(MLFLOW_RUN_FILE) else ""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = str(cfg.run.mlflow_experiment)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=str(cfg.run.name),
                                            tags={"rayexperts.run_dir": rundir.uri}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(settings(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(run_id, params=params[i:i + 100])
            rundir.write_text(MLFLOW_RUN_FILE, run_id)
        self.run_id = run_id

    def log(self, epoch: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class Trackers:
    """TensorBoard always (``run.tensorboard``), MLflow when ``run.mlflow_tracking_uri`` is set."""

    def __init__(self, cfg: DictConfig, rundir: RunDir, start_epoch: int) -> None:
        self.logs: list[Any] = []
        if cfg.run.tensorboard:
            self.logs.append(TensorBoardLog(rundir, start_epoch))
        if cfg.run.mlflow_tracking_uri:
            self.logs.append(MlflowLog(cfg, rundir))

    def log(self, epoch: int, rows: list[dict[str, Any]], train_stats: dict[str, float]) -> None:
        values = scalars(rows, train_stats)
        for log in self.logs:
            log.log(epoch, values)

    def close(self, finished: bool = True) -> None:
        for log in self.logs:
            log.close(finished) if isinstance(log, MlflowLog) else log.close()
