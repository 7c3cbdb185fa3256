"""Run, sweep and ensemble directories as pandas DataFrames, and the papers' results table.

Every loader reads local directories written by ``jobs/train.py``, ``jobs/sweep.py`` and
``jobs/cbd_ens.py`` (INTERFACES.md). Config values become dotted columns (``loss.ncl_lambda``);
lists and mappings are JSON strings so that every column stays a scalar.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from rayexperts.config import flatten
from rayexperts.eval.tables import SHOT_COLUMNS, shot_table


@dataclass
class Sweep:
    """A sweep directory: one row per trial, every trial's metrics, what was searched and tuned."""

    trials: pd.DataFrame
    metrics: pd.DataFrame  # load_runs of the trial run directories; ``run`` matches ``trials.run``
    keys: list[str]
    metric: str
    mode: str


@dataclass
class Ensemble:
    """An ensemble job directory: summary.parquet and every model's metrics (``model`` column)."""

    summary: pd.DataFrame
    metrics: pd.DataFrame


def cell(value: Any) -> Any:
    """A config value as a DataFrame cell: lists and mappings as JSON."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def read_config(run: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml``, flattened to dotted keys."""
    return flatten(yaml.safe_load((Path(run) / "config.yaml").read_text()) or {})


def find_runs(path: str | Path) -> list[Path]:
    """Every run directory (``metrics.parquet`` + ``config.yaml``) at or below ``path``, sorted."""
    root = Path(path)
    return sorted(p.parent for p in root.rglob("metrics.parquet") if (p.parent / "config.yaml").is_file())


def _run_label(run: Path, root: Path) -> str:
    rel = run.relative_to(root).as_posix()
    return run.name if rel == "." else rel


def load_runs(path: str | Path) -> pd.DataFrame:
    """Every run's metrics under ``path`` in one DataFrame: the metrics.parquet rows, a ``run``
    column (the run directory relative to ``path``; its name when ``path`` is the run) and the
    run's config as dotted columns."""
    root = Path(path)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run directory (metrics.parquet + config.yaml) at or below {root}")
    frames = []
    for run in runs:
        metrics = pd.read_parquet(run / "metrics.parquet")
        config = {k: cell(v) for k, v in read_config(run).items() if k not in metrics}
        frames.append(metrics.assign(run=_run_label(run, root), **config))
    df = pd.concat(frames, ignore_index=True)
    return df[["run", *(c for c in df.columns if c != "run")]]


def load_classes(run: str | Path) -> pd.DataFrame | None:
    """A run's classes.parquet (per class and view: train_count, shot_group, accuracy), if any."""
    path = Path(run) / "classes.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def load_sweep(path: str | Path) -> Sweep:
    """A sweep directory: trials.parquet, the trials' metrics, the searched keys and the tuned metric."""
    root = Path(path)
    if not (root / "trials.parquet").is_file():
        raise FileNotFoundError(f"{root} is not a finished sweep directory (no trials.parquet)")
    spec = yaml.safe_load((root / "sweep.yaml").read_text())
    trials = pd.read_parquet(root / "trials.parquet")
    metrics = load_runs(root) if find_runs(root) else pd.DataFrame(columns=["run"])
    tune = spec["config"]["tune"]
    return Sweep(trials, metrics, list(spec["space"]), str(tune["metric"]), str(tune["mode"]))


def load_ensemble(path: str | Path) -> Ensemble:
    """An ensemble job directory: summary.parquet and the metrics of ``teachers/*`` and ``student``
    with a ``model`` column (``teacher0`` …, ``student``)."""
    root = Path(path)
    if not (root / "summary.parquet").is_file():
        raise FileNotFoundError(f"{root} is not an ensemble job directory (no summary.parquet)")
    metrics = load_runs(root)
    return Ensemble(pd.read_parquet(root / "summary.parquet"), metrics.assign(model=metrics["run"].map(_model_name)))


def _model_name(run: str) -> str:
    return run.rsplit("/", 1)[-1]


def best_trial(trials: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best trial on ``metric`` (a validation metric), among the trials that ran every epoch
    when there are any; None when no trial reported it."""
    if metric not in trials:
        return None
    ok = trials[(trials["status"] != "error") & trials[metric].notna()]
    if ok.empty:
        return None
    if (ok["status"] == "completed").any():
        ok = ok[ok["status"] == "completed"]
    return ok.loc[ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()]


def last_epoch(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's last evaluated epoch."""
    last = df.groupby("run")["epoch"].transform("max")
    return df[df["epoch"] == last]


def paper_table(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "view"),
    seeds: str | None = None,
    decimals: int = 2,
) -> pd.DataFrame:
    """The papers' table from :func:`load_runs` rows: one row per ``by`` group, columns Many, Medium,
    Few, All (test top-1 in %, each run's last epoch).

    Without ``seeds`` every group must hold one run. With ``seeds`` (a column, e.g. ``"seed"``)
    a group's runs are repeats over seeds: cells are ``"mean ± std"`` (sample std) and a
    ``seeds`` column counts them.
    """
    rows = last_epoch(df)
    by = list(by)
    if seeds is None:
        dup = rows.duplicated(by)
        if dup.any():
            raise ValueError(
                f"several runs per {tuple(by)} (e.g. {tuple(rows.loc[dup, by].iloc[0])}): "
                "pass seeds='seed' to average them or add a column to by"
            )
        return shot_table(rows, by, decimals)
    groups = rows.groupby(by, sort=False)
    out = pd.DataFrame({name: groups[col].agg(lambda s: _mean_std(s * 100, decimals)) for col, name in SHOT_COLUMNS.items()})
    out["seeds"] = groups[seeds].nunique()
    return out


def _mean_std(values: pd.Series, decimals: int) -> str:
    v = values.dropna()
    if v.empty:
        return "–"
    std = v.std() if len(v) > 1 else math.nan
    return f"{v.mean():.{decimals}f}" + ("" if math.isnan(std) else f" ± {std:.{decimals}f}")


def markdown(df: pd.DataFrame, index: bool = True, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    table = df.reset_index() if index else df
    fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
