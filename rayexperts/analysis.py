"""Run, sweep and ensemble directories as pandas DataFrames, and the papers' results table.

Every loader reads local directories written by ``jobs/train.py``, ``jobs/sweep.py`` and
``jobs/cbd_ens.py``. Config values become dotted columns (``ncl.distill_weight``);
lists and mappings are JSON strings so that every column stays a scalar. Files keep fractions and
0-based epochs; the tables made for people (:func:`paper_table`) show top-1 in %.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from rayexperts.config import flatten, is_result_key
from rayexperts.errors import InputError
from rayexperts.eval.tables import SHOT_COLUMNS, shot_table
from rayexperts.rundir import FAILED_MARK


class NotAResultDirectory(InputError, FileNotFoundError):
    """A path given as a run, job or sweep directory holds none; the message names it and what is missing."""


def in_percent(metric: str) -> bool:
    """Whether people read ``metric`` in % (the files keep the fraction): the accuracies (``top1``, ``val_top1_few``,
    ``top5``, ...) and the calibration error (``ece``, ``val_ece``)."""
    name = metric.removeprefix("val_")
    return name.startswith(("top1", "top5")) or name == "ece" or name.startswith("ece_")


@dataclass
class Sweep:
    """A sweep directory: one row per trial, every trial's metrics, what was searched and tuned."""

    trials: pd.DataFrame
    metrics: pd.DataFrame  # load_runs of the trial run directories; ``run`` matches ``trials.run``
    keys: list[str]
    metric: str
    mode: str
    scheduler: str = ""  # tune.scheduler (asha, fifo, pbt)


@dataclass
class Ensemble:
    """An ensemble job directory: summary.parquet and every model's metrics (``model`` column)."""

    summary: pd.DataFrame
    metrics: pd.DataFrame


def cell(value: Any) -> Any:
    """A config value as a DataFrame cell: lists and mappings as JSON."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def read_config(run: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml``, flattened to dotted keys (``sources`` kept as one mapping)."""
    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    sources = cfg.pop("sources", None)
    out = flatten(cfg)
    if sources:
        out["sources"] = dict(sources)
    return out


# What marks a directory that holds runs of its own: a sweep (its trials) or a two-stage job (its members).
_HOLDERS = ("sweep.yaml", "trials.parquet", "summary.parquet")


def find_runs(path: str | Path, *, trials: bool = False, members: bool = False) -> list[Path]:
    """Every run directory (``metrics.parquet`` + ``config.yaml``) at or below ``path``, sorted. Sweep trials and
    the runs of a two-stage job (CBD's teachers and student) found below ``path`` are left out unless asked for
    (``trials``, ``members``); when ``path`` is itself the sweep or the job, its runs are what was asked for."""
    root = Path(path)
    found = []
    for p in sorted(root.rglob("metrics.parquet")):
        run = p.parent
        if not (run / "config.yaml").is_file() or (run / FAILED_MARK).exists():
            continue
        between = [d for d in run.parents if d != root and root in d.parents]
        holders = {name for d in between for name in _HOLDERS if (d / name).is_file()}
        if (holders & {"sweep.yaml", "trials.parquet"} and not trials) or ("summary.parquet" in holders and not members):
            continue
        found.append(run)
    return found


def _run_label(run: Path, root: Path) -> str:
    rel = run.relative_to(root).as_posix()
    return run.name if rel == "." else rel


def load_runs(path: str | Path, *, trials: bool = False, members: bool = False) -> pd.DataFrame:
    """Every run's metrics under ``path`` in one DataFrame: the metrics.parquet rows, a ``run``
    column (the run directory relative to ``path``; its name when ``path`` is the run) and the
    run's config as dotted columns (listed in ``df.attrs["config_columns"]``). Sweep trials and the
    members of a two-stage job below ``path`` come only when asked (:func:`find_runs`)."""
    root = Path(path)
    runs = find_runs(root, trials=trials, members=members)
    if not runs:
        raise NotAResultDirectory(f"no run directory (metrics.parquet + config.yaml) at or below {root}")
    frames, config_columns = [], set()
    for run in runs:
        metrics = pd.read_parquet(run / "metrics.parquet")
        config = {k: cell(v) for k, v in read_config(run).items() if k not in metrics}
        config_columns |= set(config)
        frames.append(metrics.assign(run=_run_label(run, root), **config))
    df = pd.concat(frames, ignore_index=True)
    df = df[["run", *(c for c in df.columns if c != "run")]]
    df.attrs["config_columns"] = sorted(config_columns)
    return df


def load_classes(run: str | Path) -> pd.DataFrame | None:
    """A run's classes.parquet (per class and view: train_count, shot_group, accuracy), if any."""
    path = Path(run) / "classes.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def load_sweep(path: str | Path) -> Sweep:
    """A sweep directory: trials.parquet, the trials' metrics, the searched keys and the tuned metric."""
    root = Path(path)
    if not (root / "trials.parquet").is_file():
        raise NotAResultDirectory(f"{root} is not a finished sweep directory (no trials.parquet)")
    spec = yaml.safe_load((root / "sweep.yaml").read_text())
    trials = pd.read_parquet(root / "trials.parquet")
    metrics = load_runs(root, trials=True) if find_runs(root, trials=True) else pd.DataFrame(columns=["run"])
    tune = spec["config"]["tune"]
    return Sweep(trials, metrics, list(spec["space"]), str(tune["metric"]), str(tune["mode"]),
                 str(tune.get("scheduler", "")))


def load_ensemble(path: str | Path) -> Ensemble:
    """An ensemble job directory: summary.parquet and the metrics of ``teachers/*`` and ``student``
    with a ``model`` column (``teacher0`` …, ``student``)."""
    root = Path(path)
    if not (root / "summary.parquet").is_file():
        raise NotAResultDirectory(f"{root} is not an ensemble job directory (no summary.parquet)")
    metrics = load_runs(root, members=True)
    return Ensemble(pd.read_parquet(root / "summary.parquet"), metrics.assign(model=metrics["run"].map(_model_name)))


def _model_name(run: str) -> str:
    return run.rsplit("/", 1)[-1]


def config_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """A sweep's rows per configuration (``kind=config``: the mean of its seeds), without the per-seed rows."""
    return trials[trials["kind"] == "config"] if "kind" in trials else trials


def best_trial(trials: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best trial (configuration: :func:`config_rows`, the mean of its seeds) on ``metric`` (a validation
    metric), among the trials that ran every epoch when there are any; None when no trial reported it."""
    trials = config_rows(trials)
    if metric not in trials:
        return None
    ok = trials[(trials["status"] != "error") & trials[metric].notna()]
    if ok.empty:
        return None
    if (ok["status"] == "completed").any():
        ok = ok[ok["status"] == "completed"]
    return ok.loc[ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()]


def tied_trials(trials: pd.DataFrame, best: pd.Series | None, metric: str) -> list[str]:
    """The trial ids with the best trial's ``metric`` among the configurations :func:`best_trial` chose from (the
    completed ones when it chose a completed one), the best first; just the best when nothing ties."""
    if best is None:
        return []
    trials = config_rows(trials)
    pool = trials[(trials["status"] != "error") & trials[metric].notna()]
    if best["status"] == "completed":
        pool = pool[pool["status"] == "completed"]
    tied = pool[np.isclose(pool[metric].astype(float), float(best[metric]), rtol=1e-9, atol=1e-12)]
    return [str(best["trial_id"]), *(str(t) for t in tied["trial_id"] if str(t) != str(best["trial_id"]))]


def last_epoch(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's last evaluated epoch."""
    last = df.groupby("run")["epoch"].transform("max")
    return df[df["epoch"] == last]


SELECTIONS = {"last": "last", "best_test": "best_test (selected on the test set)", "best_val": "best_val"}


def select_epochs(df: pd.DataFrame, selection: str = "last") -> pd.DataFrame:
    """One row per (run, view): the checkpoint ``selection`` names. ``last``: the last evaluated epoch;
    ``best_test``: the epoch with the best test top-1 of that view (the earliest on a tie), which is what the
    NCL, LDAM-DRW and Balanced Softmax code print ("selected on the test set"); ``best_val``: the epoch with the
    best validation top-1, its test metrics reported (a run without a validation split is an error)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: choose one of {', '.join(SELECTIONS)}")
    if selection == "last":
        return last_epoch(df)
    metric = "top1" if selection == "best_test" else "val_top1"
    if metric not in df or df[metric].isna().all():
        runs = sorted(df["run"].unique())[:3]
        raise ValueError(f"selection='best_val': run(s) {', '.join(runs)} have no validation split (no val_top1): "
                         "train with data.val_per_class > 0 or the data set's val split, or use last / best_test")
    missing = df.groupby("run")[metric].apply(lambda s: s.isna().all())
    if missing.any():
        raise ValueError(f"selection={selection!r}: run {missing[missing].index[0]} has no {metric}")
    ordered = df.sort_values(["run", "view", "epoch"])
    best = ordered.loc[ordered.groupby(["run", "view"], sort=False)[metric].idxmax()]
    return best.sort_index()


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns :func:`load_runs` made from config keys (dotted names when the attrs were lost)."""
    cols = df.attrs.get("config_columns") or [c for c in df.columns if "." in c or c in ("method", "seed", "compat")]
    return [c for c in cols if c in df]


def _check_same_settings(rows: pd.DataFrame, by: list[str], seeds: str | None) -> None:
    """The runs of one table row must agree on every key that can change a result (:func:`rayexperts.config.
    is_result_key`) but the seed: else an error naming the keys that differ."""
    keys = [c for c in config_columns(rows) if c not in (*by, seeds or "seed") and is_result_key(c)]
    for group, g in rows.groupby(by, sort=False, dropna=False):
        per_run = g.drop_duplicates("run")
        differ = [k for k in keys if per_run[k].astype(str).nunique() > 1]
        if differ:
            shown = ", ".join(f"{k} ({_values(per_run[k])})" for k in differ[:5])
            more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            raise ValueError(f"the runs of row {group} differ in {shown}{more}: a row averages repeats of one "
                             "config; add those keys to by=(...) or filter the runs")


def _values(column: pd.Series, show: int = 3) -> str:
    """The distinct values of ``column``, the first ``show`` of them, with an ellipsis when some are left out."""
    values = sorted(column.astype(str).unique())
    return ", ".join(values[:show]) + (", …" if len(values) > show else "")


def paper_table(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "view"),
    seeds: str | None = None,
    decimals: int = 2,
    selection: str = "last",
) -> pd.DataFrame:
    """The papers' table from :func:`load_runs` rows: one row per ``by`` group, columns Many, Medium,
    Few, All (test top-1 in %) at the checkpoint ``selection`` names (:func:`select_epochs`), and a
    ``selection`` column that says which ("best_test (selected on the test set)" for ``best_test``).

    Without ``seeds`` every group must hold one run. With ``seeds`` (a column, e.g. ``"seed"``)
    a group's runs are repeats over seeds: cells are ``"mean ± std"`` (sample std) and a
    ``seeds`` column counts them. The runs of a group must agree on every config key but the
    seed (keys that cannot change a result, :data:`rayexperts.config.NOT_RESULT_KEYS`, may differ): otherwise a
    ValueError names the keys that differ. A view learnt on the
    unlabelled test images (SADE's ``tta_aggregate``) is marked in a ``transductive`` column.
    """
    by = list(by)
    rows = select_epochs(df, selection)
    _check_same_settings(rows, by, seeds)
    if seeds is None:
        dup = rows.duplicated(by)
        if dup.any():
            raise ValueError(
                f"several runs per {tuple(by)} (e.g. {tuple(rows.loc[dup, by].iloc[0])}), repeats over seeds: "
                "pass seeds='seed' to average them"
            )
        out = shot_table(rows, by, decimals)
    else:
        groups = rows.groupby(by, sort=False)
        out = pd.DataFrame({name: groups[col].agg(lambda s: _mean_std(s * 100, decimals))
                            for col, name in SHOT_COLUMNS.items()})
        out["seeds"] = groups[seeds].nunique()
    out["selection"] = SELECTIONS[selection]
    if "transductive" in rows and rows["transductive"].fillna(False).astype(bool).any():
        marked = rows.assign(transductive=rows["transductive"].fillna(False).astype(bool)).groupby(by, sort=False)
        out["transductive"] = marked["transductive"].any().reindex(out.index).map(
            {True: "yes: learnt on the test images", False: ""})
    return out


def _mean_std(values: pd.Series, decimals: int) -> str:
    v = values.dropna()
    if v.empty:
        return "–"
    std = v.std() if len(v) > 1 else math.nan
    return f"{v.mean():.{decimals}f}" + ("" if math.isnan(std) else f" ± {std:.{decimals}f}")


def published(**filters: Any) -> pd.DataFrame:
    """The packaged catalogue of published numbers (``rayexperts/published/results.csv``): every result table
    of MLLT, NCL, ECL and CBD, values in percent as printed, one row per number, with the checkpoint selection
    the paper reported (``selection``) and, where one exists, the ``preset`` and ``overrides`` that train the
    row's setting, with what that preset runs differently (``protocol_note``) and whether a cell was reconstructed
    from garbled text (``inferred``, a bool; docs/results.md). ``filters`` are column=value (a list: any of them), e.g.
    ``published(paper="NCL", table="Table 2", metric="top1_all")``."""
    from rayexperts.published import load

    return load(**filters)


def markdown(df: pd.DataFrame, index: bool = True, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    table = df.reset_index() if index else df
    fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
