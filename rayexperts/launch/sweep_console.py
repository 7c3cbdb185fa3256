"""What a sweep prints: Tune's console quieted (:func:`tune_console`), one line per finished or failed trial
(:func:`_progress_callback`), and the summary at the end (:func:`sweep_summary`): accuracies in %, the best
configuration with the spread of its seeds, ties and failed trials named. The files keep fractions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from rayexperts.analysis import cell, config_rows, in_percent
from rayexperts.launch.sweep_search import TIME_ATTR
from rayexperts.launch.sweep_space import Space
from rayexperts.launch.train import root_error
from rayexperts.rundir import RunDir


def _trial_dirname(trial) -> str:
    return f"tune_{getattr(trial, 'trial_id', trial)}"


# Tune's log records a quiet sweep drops: the traceback of each failed trial (SweepProgress prints its one-line
# error and trial directory; the traceback stays in error.txt there) and the list of trials that did not complete.
_QUIET_DROPPED = {
    "ray.tune.execution.tune_controller": ("Trial task failed for trial",),
    "ray.tune.tune": ("Trials did not complete",),
}


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def tune_console(verbose: bool) -> Iterator[None]:
    """The driver's console while Tune runs. Verbose: Tune's own. Quiet (the sweep's default):
    ``RAY_AIR_NEW_OUTPUT=0`` with ``verbose=0`` makes Tune's reporter silent (the new one at ``verbose=0``
    still prints every metric of a failed trial); ``TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0``
    turns off the "snapshotting has been triggered multiple times" warning that our own
    ``CheckpointConfig(num_to_keep)`` with a checkpoint every epoch triggers (Tune's message: "Set it to 0 to
    completely suppress this warning"); ``ray.tune.tune`` at WARNING drops its "Wrote the latest version of all
    result files" line, ``optuna`` at WARNING its "A new study created" line. Everything is put back afterwards."""
    if verbose:
        yield
        return
    env = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    quieted = [logging.getLogger(name) for name in ("ray.tune.tune", "optuna")]
    saved_levels = [logger.level for logger in quieted]
    filters = [(logging.getLogger(name), _DropRecords(prefixes)) for name, prefixes in _QUIET_DROPPED.items()]
    os.environ.update(env)
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
        for logger, level in zip(quieted, saved_levels):
            logger.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shown_value(metric: str, value: Any) -> str:
    """A metric for people: accuracies and ECE in % (:func:`~rayexperts.analysis.in_percent`; files keep fractions),
    others as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if in_percent(metric):
        return f"{100 * float(value):.2f} %"
    return f"{float(value):.4f}" if isinstance(value, float) else str(value)


def trial_line(trial_id: str, config: dict[str, Any], result: dict[str, Any], keys: Sequence[str], metric: str,
               epochs: int) -> str:
    """One finished trial for the console: its searched values, epochs (1-based), tuned metric and test top-1."""
    done = int(result.get(TIME_ATTR, 0) or 0)
    how = "completed" if done >= epochs else "stopped early"
    params = " ".join(f"{k}={cell(config.get(k))}" for k in keys)
    seeds = int(result.get("n_seeds", 1) or 1)
    mean = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    return (f"[sweep] trial {trial_id} {how} after epoch {done}/{epochs}: "
            f"{metric} {shown_value(metric, result.get(metric))}, test top1 {shown_value('top1', result.get('top1'))}"
            f"{mean} | {params}")


def error_line(error: BaseException) -> str:
    """A failed trial's error in one line: the innermost exception's type and last message line."""
    root = root_error(error)
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    name = type(root).__name__
    return line if line.startswith(f"{name}:") or not line else f"{name}: {line}"


def failure_line(trial_id: str, error: str, path: str) -> str:
    return f"trial {trial_id} failed: {error}; trial directory {path} (error.txt there holds the traceback)"


def _trial_error(trial) -> str:
    """The one-line error of a failed Tune trial, from the error Tune pickled in its directory."""
    try:
        import ray.cloudpickle as pickle

        with open(trial.pickled_error_file, "rb") as f:
            return error_line(pickle.load(f))
    except Exception:  # noqa: BLE001 - no pickle (an unpicklable error): the text file's last line
        try:
            lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
            return lines[-1]
        except Exception:  # noqa: BLE001
            return "(no error message recorded)"


def _progress_callback(cfg: DictConfig, space: Space):
    """A quiet sweep's console (a Tune ``Callback``): a line per finished or failed trial, and every
    ``HEARTBEAT_S`` seconds how many trials are done and the best so far."""
    from ray.tune import Callback

    keys, metric, mode, epochs = list(space), str(cfg.tune.metric), str(cfg.tune.mode), int(cfg.train.epochs)
    sweep_uri = RunDir.for_config(cfg).uri

    class SweepProgress(Callback):
        HEARTBEAT_S = 60.0

        def __init__(self) -> None:
            self.start = self.last = time.monotonic()

        def setup(self, **info) -> None:
            self.start = self.last = time.monotonic()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            print(trial_line(trial.trial_id, trial.config, trial.last_result or {}, keys, metric, epochs), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            path = RunDir(sweep_uri).child(_trial_dirname(trial)).uri
            print(f"[sweep] {failure_line(trial.trial_id, _trial_error(trial), path)}", flush=True)

        def on_step(self, iteration, trials, **info) -> None:
            now = time.monotonic()
            if now - self.last < self.HEARTBEAT_S:
                return
            self.last = now
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
            scored = [t for t in trials if (t.last_result or {}).get(metric) is not None]
            best = ""
            if scored:
                top = (max if mode == "max" else min)(scored, key=lambda t: t.last_result[metric])
                best = f"; best {metric} so far {shown_value(metric, top.last_result[metric])} (trial {top.trial_id})"
            print(f"[sweep] {int(now - self.start)} s: {done}/{len(trials)} trials done, {running} running{best}",
                  flush=True)

    return SweepProgress()


def best_lines(best: pd.Series, metric: str, sweep: str = "") -> list[str]:
    """The best configuration for people: its validation metric (the mean ± sd of its seeds) and its test top-1,
    "selected on validation, mean of N seeds" when it has several."""
    n = int(best.get("n_seeds", 1) or 1)

    def value(col: str) -> str:
        sd = best.get(f"{col}_sd")
        spread = f" ± {shown_value(col, sd).removesuffix(' %')}" if n > 1 and sd is not None and not pd.isna(sd) else ""
        return shown_value(col, best.get(col, math.nan)).removesuffix(" %") + spread + (" %" if in_percent(col) else "")

    of = f" of sweep {sweep}" if sweep else ""
    if n > 1:
        return [f"best configuration {best['trial_id']}{of}: {metric} = {value(metric)} (validation, mean ± sd of "
                f"{n} seeds)", f"test top1 = {value('top1')} (selected on validation, mean of {n} seeds)"]
    return [f"best trial {best['trial_id']}{of}: {metric} = {value(metric)} (validation); "
            f"test top1 = {value('top1')} (reported, never tuned on)"]


def trials_for_people(trials: pd.DataFrame, space: Space, metric: str) -> pd.DataFrame:
    """The trials table as printed, one row per configuration: searched keys, epochs done, the tuned metric and
    test top-1 (accuracies and ECE in %, their headers say so; several seeds: mean ± sd of n); trials.parquet keeps
    fractions and the seeds' own rows."""
    trials = config_rows(trials)
    seeds = "n_seeds" in trials and (trials["n_seeds"] > 1).any()
    shown = ["trial_id", "status", *space, TIME_ATTR, metric, "top1", *(["n_seeds"] if seeds else [])]
    table = trials[[c for c in shown if c in trials]].copy()
    for col, label in ((metric, metric), ("top1", "test top1")):
        if col in table and in_percent(col):
            sd = trials.get(f"{col}_sd") if seeds else None
            table[col] = [percent(v, None if sd is None else sd.loc[i]) for i, v in table[col].items()]
            table = table.rename(columns={col: f"{label} (%)" if sd is None else f"{label} (%, mean ± sd)"})
    return table


def percent(value: Any, sd: Any = None) -> str:
    """A fraction in % with two decimals (``-`` when missing), ``± sd`` when ``sd`` is a number."""
    if value is None or pd.isna(value):
        return "-"
    return f"{100 * float(value):.2f}" + ("" if sd is None or pd.isna(sd) else f" ± {100 * float(sd):.2f}")


def sweep_summary(out: dict[str, Any], space: Space) -> tuple[list[str], int]:
    """What :func:`~rayexperts.launch.tune.sweep_command` prints after a sweep (one string per line) and its exit
    status: the trials table, each failed trial's error and directory, the best configuration (ties named) or why
    there is none."""
    trials, best, metric = config_rows(out["trials"]), out["best"], str(out["config"].tune.metric)
    lines = ["", f"sweep directory: {out['path']}", trials_for_people(trials, space, metric).to_string(index=False)]
    failures = out.get("failures") or []
    if failures:
        lines.append("")
        lines += [failure_line(f["trial_id"], f["error"], f["path"]) for f in failures]
    if best is None:
        why = f"all {len(trials)} trials failed" if failures and len(failures) == len(trials) else \
            "no trial evaluated it"
        lines.append(f"no trial reported the tuned metric {metric}: {why}")
        return lines, 1
    ties = out.get("ties") or [str(best["trial_id"])]
    lines.append("")
    if len(ties) > 1:
        lines.append(f"{len(ties)} trials tie for the best {metric} ({shown_value(metric, best[metric])}): "
                     f"{', '.join(ties)}; the first is written to best.yaml")
    lines += best_lines(best, metric)
    lines.append(f"its config: {out['path']}/best.yaml (python jobs/train.py --config {out['path']}/best.yaml)")
    return lines, 0
