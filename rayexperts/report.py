"""``jobs/report.py DIR``: Markdown tables and PNG plots for a run, an ensemble job or a sweep.

Writes ``DIR/report/report.md`` and its figures: per-class accuracy against the class's training
count (the long-tail figure), the reliability diagram (from ``reliability.parquet``; older run
directories without it get a note instead), training curves per view, and for sweeps the tuned
metric against each searched key. Figures use matplotlib's Agg canvas: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rayexperts.eval.tables import shot_table
from rayexperts.methods import METHODS
from rayexperts.rundir import RunDir

from rayexperts.analysis import (
    SELECTIONS,
    NotAResultDirectory,
    best_trial,
    config_rows,
    in_percent,
    load_classes,
    load_ensemble,
    load_runs,
    load_sweep,
    markdown,
    paper_table,
    read_config,
    select_epochs,
    tied_trials,
)

MAX_VIEWS = 4
GROUP_COLORS = {"many": "#dbe9f6", "medium": "#fdf0d5", "few": "#f8d7da"}


def kind(path: str | Path) -> str:
    """``sweep``, ``ensemble`` or ``run``, from the files in ``path``."""
    p = Path(path)
    if (p / "trials.parquet").is_file():
        return "sweep"
    if (p / "summary.parquet").is_file():
        return "ensemble"
    if (p / "metrics.parquet").is_file() and (p / "config.yaml").is_file():
        return "run"
    raise NotAResultDirectory(
        f"{p} is neither a run directory (metrics.parquet + config.yaml), an ensemble job (summary.parquet) "
        "nor a sweep (trials.parquet)"
    )


def write_report(path: str | Path) -> Path:
    """Write ``path/report/`` for whatever ``path`` holds; returns the Markdown file."""
    root = Path(path)
    out = root / "report"
    out.mkdir(exist_ok=True)
    writer = {"sweep": _sweep_report, "ensemble": _ensemble_report, "run": _run_report}[kind(root)]
    lines = writer(root, out)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# ------------------------------------------------------------------------------ sections


def _run_report(run: Path, out: Path, prefix: str = "", heading: bool = True) -> list[str]:
    cfg = read_config(run)
    df = load_runs(run)
    views = _views(df["view"].unique().tolist(), _primary_view(cfg, run))
    lines = [f"# Run {run.name}", ""] if heading else []
    selection = str(cfg.get("eval.selection", "last"))
    lines += [
        f"`{cfg['method']}` on `{cfg['data.name']}` (IF {cfg['data.imbalance_factor']}), "
        f"backbone `{cfg['model.backbone']}`, K = {cfg['model.num_experts']}, "
        f"{df['epoch'].max() + 1} epochs, seed {cfg['seed']}, compat={cfg.get('compat', 'paper')}: one run, one "
        "seed (mean ± sd over seeds: `paper_table(load_runs(FOLDER), seeds=\"seed\")`).",
        "",
        "## Test top-1 (%) and ECE (%), last epoch",
        "",
        markdown(view_table(df, "last")),
        "",
    ]
    if selection != "last":
        lines += [f"## Test top-1 (%), {SELECTIONS[selection]}: the checkpoint this recipe's published number reports",
                  "", markdown(view_table(df, selection)), ""]
    val = [c for c in ("val_top1_many", "val_top1_medium", "val_top1_few", "val_top1") if c in df]
    if val:
        last = df[df["epoch"] == df["epoch"].max()].set_index("view")[val] * 100
        lines += ["## Validation top-1 (%), last epoch", "", markdown(last.round(2)), ""]
    lines += _figure_lines(run, out, prefix, views)
    return lines


def view_table(df: pd.DataFrame, selection: str) -> pd.DataFrame:
    """Many / Medium / Few / All and ECE (%) per view at ``selection``; transductive views marked."""
    table = paper_table(df, by=("view",), selection=selection)
    rows = select_epochs(df, selection).set_index("view")
    table.insert(4, "ECE", (rows["ece"].reindex(table.index) * 100).round(2))
    if "transductive" in table:
        table.index = [f"{v} (transductive)" if t else v for v, t in zip(table.index, table["transductive"])]
        table = table.drop(columns="transductive")
    return table


def _figure_lines(run: Path, out: Path, prefix: str, views: list[str]) -> list[str]:
    lines = ["## Figures", ""]
    classes = load_classes(run)
    if classes is not None:
        _save(_longtail_figure(classes, views), out / f"{prefix}longtail.png")
        lines += [f"Per-class test accuracy against training images per class: ![]({prefix}longtail.png)", ""]
    rel = run / "reliability.parquet"
    if rel.is_file():
        _save(_reliability_figure(pd.read_parquet(rel), views), out / f"{prefix}reliability.png")
        lines += [f"Reliability diagram (test split): ![]({prefix}reliability.png)", ""]
    else:
        lines += ["No reliability diagram: this run directory has no reliability.parquet (written by newer runs).", ""]
    _save(_curves_figure(pd.read_parquet(run / "metrics.parquet"), views), out / f"{prefix}curves.png")
    lines += [f"Training curves per view: ![]({prefix}curves.png)", ""]
    return lines


def _ensemble_report(root: Path, out: Path) -> list[str]:
    ens = load_ensemble(root)
    s = ens.summary.set_index("model")
    lines = [f"# Ensemble job {root.name}", "", "## Test top-1 (%) per model", "",
             markdown(shot_table(ens.summary, "model")), ""]
    if {"started_at", "finished_at"} <= set(s.columns) and s["started_at"].notna().any():
        _save(_timeline_figure(s), out / "timeline.png")
        lines += ["When each model trained (teachers in parallel, then the student): ![](timeline.png)", ""]
    _save(_models_figure(ens.metrics), out / "models.png")
    lines += ["Test top-1 per epoch, every model's own main view: ![](models.png)", ""]
    student = root / "student"
    if (student / "metrics.parquet").is_file():
        lines += ["# Student", ""] + _run_report(student, out, "student_", heading=False)
    return lines


def _sweep_report(root: Path, out: Path) -> list[str]:
    """A sweep: its configurations ranked (accuracies in %, mean ± sd when several seeds each), the best ones,
    ties and failed trials named, the tuned metric against each searched key, the best configuration's run."""
    sw = load_sweep(root)
    configs = config_rows(sw.trials)
    seeds = "n_seeds" in configs and bool((configs["n_seeds"] > 1).any())
    t = configs.sort_values(sw.metric, ascending=sw.mode == "min", na_position="last")
    each = "the mean ± sd of each configuration's seeds (`n_seeds`); " if seeds else ""
    lines = [f"# Sweep {root.name}", "",
             f"Tuned on `{sw.metric}` ({sw.mode}), a validation-split metric; `top1` is test accuracy, reported only. "
             f"Accuracies in %, {each}trials.parquet keeps fractions{' and one row per seed' if seeds else ''}.", ""]
    if sw.scheduler == "pbt":
        lines += ["Population-based training: a trial's values are its last ones (each trial's `result.json` has the "
                  "values of every epoch).", ""]
    best = best_trial(sw.trials, sw.metric, sw.mode)
    if best is not None:
        top = t[(t["status"] != "error") & t[sw.metric].notna()].head(5)
        lines += ["## Best configurations", "", markdown(_sweep_table(top, sw, seeds), index=False), ""]
        n = int(best.get("n_seeds", 1) or 1)
        how = f"selected on validation, mean of {n} seeds" if n > 1 else "selected on validation, one seed"
        lines += [f"Best: `{best['trial_id']}`, {sw.metric} = {_pct(best, sw.metric)} (validation), test top1 = "
                  f"{_pct(best, 'top1')} ({how}). Its full config: `best.yaml` (`python jobs/train.py --config "
                  "best.yaml`).", ""]
        ties = tied_trials(sw.trials, best, sw.metric)
        if len(ties) > 1:
            lines += [f"{len(ties)} configurations tie for the best {sw.metric}: {', '.join(f'`{x}`' for x in ties)}; "
                      "the first is in best.yaml.", ""]
    failed = t[t["status"] == "error"]
    if not failed.empty:
        lines += ["## Failed trials", ""]
        for _, row in failed.iterrows():
            why = str(row.get("error") or "").strip() or "no error recorded"
            lines.append(f"- `{row['trial_id']}`: {why} (its directory `{row['run']}`, error.txt there)")
        lines.append("")
    lines += ["## All configurations", "", markdown(_sweep_table(t, sw, seeds), index=False), ""]
    lines += [f"## {sw.metric} against each searched key", ""]
    for key in sw.keys:
        name = f"sweep_{key}.png"
        _save(_key_figure(sw.trials, key, sw.metric), out / name)
        lines += [f"![]({name})", ""]
    if not sw.metrics.empty and sw.metric in sw.metrics:
        _save(_trial_curves_figure(sw.metrics, sw.metric), out / "trial_curves.png")
        lines += [f"`{sw.metric}` per epoch of every trial (early-stopped trials end early): ![](trial_curves.png)", ""]
    run = None if best is None else root / str(best["run"])
    if run is not None and not (run / "metrics.parquet").is_file():
        run = run / "seed_0"  # several seeds: the first seed's run
    if run is not None and (run / "metrics.parquet").is_file():
        lines += [f"# Best configuration's run ({run.relative_to(root).as_posix()})", ""]
        lines += _run_report(run, out, "best_", heading=False)
    return lines


def _pct(row: pd.Series, col: str) -> str:
    """``row[col]`` in %, ``± sd`` from ``row[col_sd]`` when the row is the mean of several seeds."""
    value, sd = row.get(col), row.get(f"{col}_sd")
    if value is None or pd.isna(value):
        return "-"
    spread = f" ± {100 * float(sd):.2f}" if sd is not None and not pd.isna(sd) else ""
    return f"{100 * float(value):.2f}{spread} %"


def _sweep_table(t: pd.DataFrame, sw: Any, seeds: bool) -> pd.DataFrame:
    """Configurations for people: searched keys, status, epochs, the tuned metric and test top-1 (accuracies and ECE
    in %: :func:`~rayexperts.analysis.in_percent`)."""
    shown = [c for c in ["trial_id", "status", *sw.keys, "epochs_done"] if c in t]
    table = t[shown].copy()
    for col, label in ((sw.metric, sw.metric), ("top1", "test top1")):
        if col in t and in_percent(col):
            table[f"{label} (%)"] = [_pct(row, col).removesuffix(" %") for _, row in t.iterrows()]
        elif col in t:
            table[label] = t[col]
    if seeds:
        table["n_seeds"] = t["n_seeds"]
    return table


# ------------------------------------------------------------------------------ figures


def _primary_view(cfg: dict[str, Any], run: Path | None = None) -> str | None:
    """The method's headline view for the run in ``run`` (its typed config.yaml), else the method's default."""
    try:
        method = METHODS.get(str(cfg["method"]))
        typed = RunDir(str(run)).config() if run is not None else None
        return method.primary_view_for(typed) if typed is not None else method.primary_view
    except (ValueError, KeyError):
        return None


def _views(views: list[str], primary: str | None) -> list[str]:
    """At most MAX_VIEWS views: the primary one first, then the others without ``_pc`` first."""
    order = sorted(views, key=lambda v: (v != primary, v.endswith("_pc"), views.index(v)))
    return order[:MAX_VIEWS]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _longtail_figure(classes: pd.DataFrame, views: list[str]) -> Figure:
    """Training images per class (bars, classes by decreasing count, shot groups shaded) and each
    view's per-class test accuracy (lines)."""
    c = classes[classes["epoch"] == classes["epoch"].max()] if "epoch" in classes else classes
    per_class = c.drop_duplicates("class_id").sort_values(["train_count", "class_id"], ascending=[False, True])
    order = per_class["class_id"].to_numpy()
    x = np.arange(len(order))
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for i, group in enumerate(per_class["shot_group"]):
        ax.axvspan(i - 0.5, i + 0.5, color=GROUP_COLORS.get(group, "white"), lw=0)
    ax.bar(x, per_class["train_count"], color="#9aa5b1", width=0.8 if len(x) < 200 else 1.0)
    if per_class["train_count"].max() / max(per_class["train_count"].min(), 1) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("class (sorted by training images)")
    ax.set_ylabel("training images")
    acc = ax.twinx()
    for view in views:
        v = c[c["view"] == view].set_index("class_id")["accuracy"].reindex(order)
        acc.plot(x, v.to_numpy() * 100, marker="o" if len(x) <= 20 else None, ms=3, label=view)
    acc.set_ylim(0, 100)
    acc.set_ylabel("test accuracy (%)")
    acc.legend(loc="lower left", fontsize=8)
    ax.set_title("Per-class accuracy vs training images (shaded: many / medium / few)")
    return fig


def _reliability_figure(rel: pd.DataFrame, views: list[str]) -> Figure:
    rel = rel[rel["epoch"] == rel["epoch"].max()]
    shown = [v for v in views if v in set(rel["view"])]
    fig = Figure(figsize=(3.2 * max(len(shown), 1), 3.4))
    for i, view in enumerate(shown):
        r = rel[rel["view"] == view].sort_values("bin")
        n = len(r)
        centers = (r["bin"].to_numpy() + 0.5) / n
        ax = fig.add_subplot(1, len(shown), i + 1)
        acc, conf = r["accuracy"].fillna(0).to_numpy(), r["confidence"].fillna(0).to_numpy()
        ax.bar(centers, acc, width=1 / n, edgecolor="black", lw=0.5, label="accuracy")
        ax.bar(centers, np.abs(conf - acc), bottom=np.minimum(acc, conf), width=1 / n, color="#e57373", alpha=0.6,
               label="|confidence − accuracy|")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        count = r["count"].to_numpy()
        gap = np.abs(r["accuracy"] - r["confidence"]).fillna(0).to_numpy()
        ece = float((count * gap).sum() / max(count.sum(), 1))
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{view}: ECE {100 * ece:.2f}%")
        if i == 0:
            ax.set_ylabel("accuracy")
            ax.legend(loc="upper left", fontsize=8)
    return fig


def _curves_figure(metrics: pd.DataFrame, views: list[str]) -> Figure:
    fig = Figure(figsize=(10, 3.6))
    ax, lax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for view in views:
        m = metrics[metrics["view"] == view].sort_values("epoch")
        line = ax.plot(m["epoch"] + 1, m["top1"] * 100, label=f"{view} test")[0]
        if "val_top1" in m:
            ax.plot(m["epoch"] + 1, m["val_top1"] * 100, "--", color=line.get_color(), label=f"{view} val")
    ax.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy per view")
    for a in (ax, lax):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    first = metrics[metrics["view"] == metrics["view"].iloc[0]].sort_values("epoch")
    if "loss" in first:
        lax.plot(first["epoch"] + 1, first["loss"], color="black")
    lax.set(xlabel="epoch", ylabel="training loss", title="loss")
    return fig


def _key_figure(trials: pd.DataFrame, key: str, metric: str) -> Figure:
    """The tuned metric (%) of each configuration against ``key``, by status; several seeds: the mean with an
    error bar of one sd, each seed a small grey dot."""
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    configs = config_rows(trials)
    seeds = trials[trials["kind"] == "seed"] if "kind" in trials else trials.iloc[:0]
    values = configs[key]
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    cats: list[str] = []
    if numeric:
        x = values.astype(float).to_numpy()
        positive = np.all(x > 0)
        if positive and x.max() / x.min() > 20:
            ax.set_xscale("log")
    else:
        cats = sorted(values.astype(str).unique())
        x = values.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy().astype(float)
        ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=7)
    if not seeds.empty and metric in seeds:
        sx = seeds[key].astype(float) if numeric else seeds[key].astype(str).map({c: i for i, c in enumerate(cats)})
        ax.scatter(sx, seeds[metric] * 100, s=8, color="#9aa5b1", label="a seed")
    sd = configs.get(f"{metric}_sd")
    for status, marker in (("completed", "o"), ("stopped", "x"), ("error", "s")):
        sel = (configs["status"] == status).to_numpy()
        if sel.any():
            y = configs.loc[sel, metric] * 100
            if sd is not None and sd[sel].notna().any():
                ax.errorbar(x[sel], y, yerr=sd[sel].fillna(0) * 100, fmt=marker, capsize=3, label=f"{status} (mean ± sd)")
            else:
                ax.scatter(x[sel], y, marker=marker, label=status)
    ax.set(xlabel=key, ylabel=f"{metric} (%)", title=f"{metric} vs {key}")
    ax.legend(fontsize=8)
    return fig


def _trial_curves_figure(metrics: pd.DataFrame, metric: str) -> Figure:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    primary = metrics.dropna(subset=[metric])
    for run, m in primary.groupby("run"):
        m = m.drop_duplicates("epoch").sort_values("epoch")
        ax.plot(m["epoch"] + 1, m[metric] * 100, marker=".", lw=1, label=str(run).rsplit("/", 1)[-1])
    ax.set(xlabel="epoch", ylabel=f"{metric} (%)", title=f"{metric} per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if primary["run"].nunique() <= 12:
        ax.legend(fontsize=6)
    return fig


def _models_figure(metrics: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for model, m in metrics.groupby("model"):
        view = _views(m["view"].unique().tolist(), _primary_view({"method": m["method"].iloc[0]}))[0]
        m = m[m["view"] == view].sort_values("epoch")
        ax.plot(m["epoch"] + 1, m["top1"] * 100, label=f"{model} ({view})")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="models")
    ax.legend(fontsize=7)
    return fig


def _timeline_figure(summary: pd.DataFrame) -> Figure:
    s = summary.dropna(subset=["started_at", "finished_at"])
    t0 = s["started_at"].min()
    fig = Figure(figsize=(6, 0.4 * len(s) + 1.2))
    ax = fig.add_subplot()
    ax.barh(range(len(s)), s["finished_at"] - s["started_at"], left=s["started_at"] - t0)
    ax.set_yticks(range(len(s)), s.index)
    ax.invert_yaxis()
    ax.set(xlabel="seconds since the first model started", title="training timeline")
    return fig
