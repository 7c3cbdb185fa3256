"""Two-stage jobs (``rayexperts cbd``, ``jobs/cbd_ens.py``): a method's prerequisite runs in parallel, then its own
run, with a summary of both.

CBD / CBD_ENS (docs/methods.md "CBD") is such a method: its prerequisites are the K teachers
(``cbd.teachers``), its own run the class-balanced student. Stage 1 (:func:`~rayexperts.launch.stages.
train_prerequisites`): every prerequisite trains from its own Ray actor, all at once; a finished one is not
retrained; one failing does not stop the others, the job writes the summary, then raises
:class:`~rayexperts.launch.stages.PrerequisiteFailed`. Stage 2: the method's own run
(:func:`~rayexperts.launch.train.run_training`) on the job's ``scaling``.

The job directory (docs/results.md) ``run.storage_path/run.name/``: ``config.yaml``, the
prerequisites' run directories (CBD: ``teachers/teacher<i>/``), the method's (CBD: ``student/``),
and ``summary.parquet``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from rayexperts.config import ConfigError, load_config, parse_overrides
from rayexperts.eval.tables import SHOT_COLUMNS, shot_table
from rayexperts.launch.stages import Outcome, is_finished, train_prerequisites
from rayexperts.launch.train import default_run_name, needs_ray, preflight, run_training
from rayexperts.methods import METHODS
from rayexperts.rundir import RunDir

DEMO_PRESET = "cbd_digits"
SUMMARY_COLUMNS = ["model", "top1", "top1_many", "top1_medium", "top1_few", "started_at", "finished_at"]


# ------------------------------------------------------------------------------------ summary


def _interval(metrics: pd.DataFrame) -> tuple[float, float]:
    """(start of the first evaluated epoch's training, time of the last evaluation), Unix seconds."""
    first = metrics.sort_values("timestamp").iloc[0]
    return float(first["timestamp"] - first.get("train_seconds", 0.0)), float(metrics["timestamp"].max())


def _row(model: str, metrics: pd.DataFrame, view: str, interval: tuple[float, float], **extra: Any) -> dict[str, Any]:
    last = metrics[metrics["epoch"] == metrics["epoch"].max()].set_index("view").loc[view]
    row = {"model": model, **{k: float(last[k]) for k in SUMMARY_COLUMNS[1:5]}}
    return {**row, "started_at": interval[0], "finished_at": interval[1], **extra}


def summary_rows(outcome: Outcome, prerequisite: bool) -> list[dict[str, Any]]:
    """A prerequisite's row: its own last evaluation of its raw logits (its method's ``logits_view``: what
    the CBD student run's ``teacher<i>`` view computes). The method's own run: its ``summary_views``, with
    its run's interval. A failed run: a row of NaNs."""
    status = "failed" if outcome.status == "failed" else "finished"
    cfg, extra = outcome.cfg, {"status": status, "reused": outcome.status == "skipped", "run_dir": outcome.path}
    method = METHODS.get(cfg.method)
    if prerequisite:
        extra.update(method=str(cfg.method), type=str(cfg.data.augment), seed=int(cfg.seed))
    metrics = RunDir(outcome.path).read_table("metrics.parquet")
    if outcome.status == "failed" or metrics is None or metrics.empty:
        return [{"model": outcome.name, **{k: float("nan") for k in SUMMARY_COLUMNS[1:]}, **extra}]
    span = _interval(metrics)
    if not prerequisite:
        return [_row(v, metrics, v, span, **extra) for v in method.summary_views()]
    return [_row(outcome.name, metrics, method.logits_view(cfg), span, **extra)]


def write_summary(job: RunDir, before: list[Outcome], main: Outcome | None = None) -> pd.DataFrame:
    rows = [row for o in before for row in summary_rows(o, True)] + (summary_rows(main, False) if main else [])
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")  # NaN for the method's own rows
    job.write_table("summary.parquet", df)
    return df


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Many / Medium / Few / All top-1 (%) per model."""
    return shot_table(summary, "model")


# ------------------------------------------------------------------------------------ the job


def run_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1 then stage 2; returns the job directory and the summary DataFrame."""
    method = METHODS.get(cfg.method)
    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    if not method.prerequisites(cfg):  # config errors before Ray starts
        raise ConfigError(f"method={cfg.method} has no runs to train first (CBD's teachers): use jobs/train.py")
    needs_ray(cfg, f"method={cfg.method} (its first runs train in parallel as Ray actors)")
    preflight(cfg)
    job = RunDir.for_config(cfg)
    job.write_config(cfg)
    started = time.time()
    main_cfg, outcomes = train_prerequisites(cfg, str(cfg.method),
                                             f"The other runs' results are kept in {job}/summary.parquet",
                                             on_outcomes=lambda done: write_summary(job, done))
    print(f"[{cfg.method}] stage 1 done in {time.time() - started:.1f} s", flush=True)
    main_dir = RunDir.for_config(main_cfg)
    if is_finished(main_cfg):
        print(f"[{cfg.method}] {main_cfg.run.name}: finished checkpoint found in {main_dir}: reused (not retrained)",
              flush=True)
        main = Outcome(str(main_cfg.run.name), main_cfg, main_dir.uri, "skipped")
    else:
        run_training(main_cfg)
        main = Outcome(str(main_cfg.run.name), main_cfg, main_dir.uri, "finished")
    summary = write_summary(job, outcomes, main)
    return {"path": job.uri, "summary": summary}


def resolve_job_config(config: str | None, overrides: Sequence[str]) -> DictConfig:
    """``method=cbd`` + the preset + overrides; without ``--config`` and without another ``data.name``,
    the embedded demo preset."""
    flat = parse_overrides(list(overrides))
    if config is None and flat.get("data.name", "digits-lt") == "digits-lt":
        config = DEMO_PRESET
    return load_config(config, {"method": "cbd", **flat})


__all__ = ["SHOT_COLUMNS", "run_ensemble"]
