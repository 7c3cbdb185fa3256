"""Two-stage jobs (``jobs/cbd_ens.py``): a method's prerequisite runs in parallel, then its own run.

CBD / CBD_ENS (docs/methods.md "CBD") is such a method: its prerequisites are the K teachers
(``cbd.teachers``), its own run the class-balanced student. Stage 1: every prerequisite trains from its
own Ray actor (:mod:`rayexperts.launch.actor`: in the actor for one worker, a Ray Train run for more), so
all K start at once and Ray packs them onto the cluster; torch threads per worker = the CPU share. A finished run
(its latest checkpoint at the last epoch) is not retrained. One run failing does not stop the
others: the job waits for all, writes the summary, then raises :class:`PrerequisiteFailed` naming
it and its log. Stage 2: the method's own run (:func:`~rayexperts.launch.train.run_training`) on the job's
``scaling``.

The job directory (docs/results.md) ``run.storage_path/run.name/``: ``config.yaml``, the
prerequisites' run directories (CBD: ``teachers/teacher<i>/``), the method's (CBD: ``student/``),
and ``summary.parquet``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from rayexperts.config import ConfigError, load_config, parse_overrides
from rayexperts.eval.tables import SHOT_COLUMNS, shot_table
from rayexperts.launch.cluster import dashboard_wanted, ensure_ray
from rayexperts.launch.actor import start_run
from rayexperts.launch.trainer import uses_ray_train
from rayexperts.launch.train import default_run_name, needs_ray, preflight, run_training
from rayexperts.methods import METHODS
from rayexperts.rundir import IDENTITY_KEYS, RunDir

DEMO_PRESET = "cbd_digits"
SUMMARY_COLUMNS = ["model", "top1", "top1_many", "top1_medium", "top1_few", "started_at", "finished_at"]


class PrerequisiteFailed(RuntimeError):
    """One or more prerequisite runs (CBD: teachers) failed; the message names each, its run directory
    and its error log."""


TeacherFailed = PrerequisiteFailed  # CBD's word for it


@dataclass
class Outcome:
    """How one run of the job ended: ``finished``, ``skipped`` (already done) or ``failed``."""

    name: str
    cfg: DictConfig
    path: str
    status: str
    error: str = ""


def reuse_keys(cfg: DictConfig) -> tuple[str, ...]:
    """What a finished run directory must agree on to be reused: the identity keys, the seed and the
    augmentation (a teacher), and the method's path keys (CBD's student: the same teachers)."""
    return (*IDENTITY_KEYS, "seed", "data.augment", *METHODS.get(cfg.method).path_keys)


def is_finished(cfg: DictConfig) -> bool:
    """True when ``cfg``'s run directory holds the checkpoint and the evaluation of its last epoch.
    A directory holding another configuration (:func:`reuse_keys`) is refused."""
    return RunDir.of(cfg.run.storage_path, cfg.run.name).holds_finished_run(cfg, reuse_keys(cfg))


def _describe(cfg: DictConfig) -> str:
    return f"{cfg.method}, {cfg.data.augment}, seed {cfg.seed}"


def train_in_parallel(cfgs: list[DictConfig], tag: str, ray_train_later: bool = False,
                      on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Train every unfinished run concurrently, each from its own actor; wait for all, report each.
    ``ray_train_later``: the job goes on with a multi-worker run (the local instance's dashboard);
    ``on_done`` is told of every run as it ends (a skipped one at once)."""
    import ray

    outcomes: dict[int, Outcome] = {}
    pending: dict[Any, tuple[int, Any]] = {}
    ray_train = ray_train_later or uses_ray_train(*cfgs)
    for i, cfg in enumerate(cfgs):
        rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
        name, path = cfg.run.name, rundir.uri
        if is_finished(cfg):
            print(f"[{tag}] {name}: finished checkpoint found in {path}: reused (not retrained)", flush=True)
            outcomes[i] = Outcome(name, cfg, path, "skipped")
            if on_done is not None:
                on_done(outcomes[i])
            continue
        ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train))  # only when something is left to train
        rundir.write_config(cfg)  # is_finished checked the directory
        actor, ref = start_run(cfg)
        pending[ref] = (i, actor)
        print(f"[{tag}] {name} ({_describe(cfg)}) launched: {path}", flush=True)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        i, _actor = pending.pop(ref)
        cfg = cfgs[i]
        name, path = cfg.run.name, RunDir.of(cfg.run.storage_path, cfg.run.name).uri
        try:
            ray.get(ref)
            outcomes[i] = Outcome(name, cfg, path, "finished")
            print(f"[{tag}] {name} finished: {path}", flush=True)
        except Exception as e:  # RayTaskError / ActorDiedError: keep waiting for the others
            outcomes[i] = Outcome(name, cfg, path, "failed", _root_cause(e))
            print(f"[{tag}] {name} FAILED: {outcomes[i].error}", flush=True)
        if on_done is not None:
            on_done(outcomes[i])
    return [outcomes[i] for i in range(len(cfgs))]


def _root_cause(e: BaseException) -> str:
    """The last line of the innermost error (Ray wraps the worker's exception twice)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def raise_failed(failed: list[Outcome], where: str) -> None:
    if failed:
        raise PrerequisiteFailed("; ".join(
            f"{t.name} failed ({t.error}); run directory {t.path}, traceback in {t.path}/error.log" for t in failed
        ) + f". {where}; re-run to retry.")


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
    first = method.prerequisites(cfg)  # config errors before Ray starts
    if not first:
        raise ConfigError(f"method={cfg.method} has no runs to train first (CBD's teachers): use jobs/train.py")
    needs_ray(cfg, f"method={cfg.method} (its first runs train in parallel as Ray actors)")
    preflight(cfg)
    job = RunDir.of(cfg.run.storage_path, cfg.run.name)
    job.write_config(cfg)
    started = time.time()
    outcomes = train_in_parallel(first, str(cfg.method), ray_train_later=uses_ray_train(cfg))
    summary = write_summary(job, outcomes)
    raise_failed([o for o in outcomes if o.status == "failed"],
                 f"The other runs' results are kept in {job}/summary.parquet")
    print(f"[{cfg.method}] stage 1 done in {time.time() - started:.1f} s", flush=True)
    main_cfg = method.after_prerequisites(cfg, [o.path for o in outcomes])
    main_dir = RunDir.of(main_cfg.run.storage_path, main_cfg.run.name)
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


__all__ = ["SHOT_COLUMNS", "PrerequisiteFailed", "TeacherFailed", "is_finished", "run_ensemble"]
