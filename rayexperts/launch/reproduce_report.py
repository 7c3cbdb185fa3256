"""``rayexperts reproduce``'s outputs in the job directory: ``reproduce.parquet`` (one row per catalogue row ×
metric × selection: paper value, ours mean and sd over seeds, delta, run ids, wall seconds, GPU- and CPU-hours,
protocol), ``reproduce.md`` laid out like the paper's table, and ``reproduce.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from rayexperts.launch.reproduce_plan import Setting
from rayexperts.launch.stages import main_stage
from rayexperts.registry import METHODS
from rayexperts.rundir import RunDir

# catalogue metric -> metrics.parquet column (top-1 and ECE as fractions; ``error`` = 1 − top-1)
METRIC_COLUMN = {"top1_all": "top1", "top1_many": "top1_many", "top1_medium": "top1_medium", "top1_few": "top1_few",
                 "ece": "ece", "error": "top1"}
METRIC_HEADINGS = {"top1_many": "Many", "top1_medium": "Medium", "top1_few": "Few", "top1_all": "All", "ece": "ECE",
                   "error": "Error"}
SHORT = "short protocol: not comparable with the paper"
SELECTION_LABEL = {"last": "last epoch", "best_test": "best_test (selected on the test set)",
                   "best_val": "best_val (selected on the validation split)"}


def wall_seconds(metrics: pd.DataFrame) -> float:
    first = metrics.sort_values("timestamp").iloc[0]
    return float(metrics["timestamp"].max() - first["timestamp"] + first.get("train_seconds", 0.0))


def _run_values(path: str, view: str, metric: str, selection: str) -> float | None:
    """The run's number for a catalogue metric at ``selection``, in percent; None when it lacks the view."""
    from rayexperts.analysis import select_epochs
    metrics = RunDir(path).read_table("metrics.parquet")
    if metrics is None or view not in set(metrics["view"]):
        return None
    rows = select_epochs(metrics[metrics["view"] == view].assign(run=path), selection)
    value = float(rows[METRIC_COLUMN[metric]].iloc[0]) * 100
    return 100 - value if metric == "error" else value


def results(settings: list[Setting], protocol: str) -> pd.DataFrame:
    """``reproduce.parquet``: one row per (catalogue row, metric, selection)."""
    out = []
    for s in settings:
        paths = [RunDir.for_config(main_stage(cfg, first)).uri for cfg, first in zip(s.configs, s.first)]
        runs = [(p, RunDir(p).read_table("metrics.parquet")) for p in paths]
        for _, row in s.rows.iterrows():
            view = row.get("view", "") or METHODS.get(s.configs[0].method).primary_view_for(s.configs[0])
            selections = list(dict.fromkeys([row["selection"] or "last", "last"]))
            for selection in selections:
                values = [v for p, m in runs if m is not None and (v := _run_values(p, view, row["metric"], selection))
                          is not None]
                mean = sum(values) / len(values) if values else float("nan")
                sd = pd.Series(values).std() if len(values) > 1 else float("nan")
                walls = [wall_seconds(m) for _, m in runs if m is not None and not m.empty]
                cfg = s.configs[0]
                share = float(cfg.scaling.gpus_per_worker) if cfg.scaling.use_gpu else 0.0
                cpus = float(cfg.scaling.cpus_per_worker) or 1.0
                out.append({
                    **{k: row[k] for k in ("paper", "table", "dataset", "imbalance_factor", "backbone", "method",
                                           "variant", "metric")},
                    "view": view, "selection": selection, "paper_selection": row["selection"] or "",
                    "paper_value": float(row["value"]), "ours_mean": mean, "ours_sd": sd, "n_seeds": len(values),
                    "delta": mean - float(row["value"]), "run_ids": json.dumps(paths), "wall_seconds": sum(walls),
                    "gpu_hours": sum(walls) * share * int(cfg.scaling.num_workers) / 3600,
                    "cpu_hours": sum(walls) * cpus * int(cfg.scaling.num_workers) / 3600,
                    "protocol": protocol, "preset": s.preset, "overrides": s.overrides,
                    "transductive": view == "tta_aggregate", "inferred": bool(row.get("inferred", False)),
                    "protocol_note": str(row.get("protocol_note", "") or ""),
                })
    return pd.DataFrame(out)


def _cell(r: pd.Series) -> str:
    if not r["n_seeds"]:
        return f"– (paper {r['paper_value']:g}" + (" [inferred])" if r.get("inferred", False) else ")")
    sd = "" if math.isnan(r["ours_sd"]) else f" ± {r['ours_sd']:.2f}"
    label = " [best_test]" if r["selection"] == "best_test" else ""
    mark = " [inferred]" if r.get("inferred", False) else ""
    return f"{r['ours_mean']:.2f}{sd}{label} (paper {r['paper_value']:g}{mark}, Δ {r['delta']:+.2f})"


def markdown_report(df: pd.DataFrame, skipped: pd.DataFrame, title: str, protocol: str) -> str:
    """``reproduce.md``: per selection, a table laid out like the paper's (a row per method and setting,
    Many / Medium / Few / All columns), each cell "ours mean ± sd (paper, Δ)"."""
    from rayexperts.analysis import markdown

    lines = [f"# {title}", ""]
    if protocol == "short":
        lines += [f"**{SHORT}.** The deltas below compare a shortened schedule with the paper's numbers: none of them "
                  "is a reproduction.", ""]
    lines += ["Ours: mean ± sd over the seeds (n per cell in `reproduce.parquet`); paper: the value as printed; "
              "Δ = ours − paper, in points.", ""]
    if not df.empty:
        for selection in dict.fromkeys(df["selection"]):
            part = df[df["selection"] == selection].copy()
            part["row"] = part.apply(lambda r: " ".join(str(x) for x in (
                r["table"], r["method"], f"({r['variant']})" if r["variant"] else "", r["dataset"],
                f"IF {int(r['imbalance_factor'])}" if pd.notna(r["imbalance_factor"]) else "", r["backbone"],
                f"[{r['view']}]", "[transductive]" if r["transductive"] else "") if x), axis=1)
            part["cell"] = part.apply(_cell, axis=1)
            table = part.pivot_table(index="row", columns="metric", values="cell", aggfunc="first", sort=False)
            table = table[[m for m in METRIC_HEADINGS if m in table.columns]].rename(columns=METRIC_HEADINGS)
            heading = SELECTION_LABEL.get(selection, selection)
            lines += [f"## Checkpoint: {heading}" + (f" ({SHORT})" if protocol == "short" else ""), "",
                      markdown(table.fillna("")), ""]
    notes = df[df["protocol_note"] != ""] if "protocol_note" in df else df.iloc[:0]
    if not notes.empty:
        lines += ["## What the presets run differently from the paper", ""]
        lines += [f"- {r['table']}: {r['method']}" + (f" ({r['variant']})" if r["variant"] else "")
                  + f", {r['dataset']} {r['backbone']}: {r['protocol_note']}"
                  for _, r in notes.drop_duplicates(["table", "method", "variant", "dataset", "backbone"]).iterrows()]
        lines.append("")
    if not skipped.empty:
        listed = skipped.drop_duplicates(["table", "method", "variant", "dataset", "backbone"])
        lines += ["## Rows without a preset (not trained)", ""]
        lines += [f"- {r['table']}: {r['method']}" + (f" ({r['variant']})" if r["variant"] else "")
                  + f", {r['dataset']} {r['backbone']}: no preset" for _, r in listed.iterrows()]
        lines.append("")
    return "\n".join(lines)


def figure(df: pd.DataFrame, path: Path, protocol: str) -> None:
    """``reproduce.png``: per row of the table (All, top-1), ours with error bars beside the paper's value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    part = df[df["metric"].isin(["top1_all"])]
    if part.empty:
        part = df
    part = part.reset_index(drop=True)
    fig = Figure(figsize=(max(6, 0.9 * len(part) + 2), 4))
    ax = fig.add_subplot()
    x = range(len(part))
    ax.bar([i - 0.2 for i in x], part["paper_value"], width=0.4, label="paper", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], part["ours_mean"], width=0.4, yerr=part["ours_sd"].fillna(0), capsize=3,
           label="ours (mean ± sd)", color="#4c78a8")
    ax.set_xticks(list(x), [f"{r['method']}\n{r['dataset']} [{r['selection']}]" for _, r in part.iterrows()],
                  fontsize=7, rotation=20)
    ax.set_ylabel(f"{part['metric'].iloc[0] if len(part) else ''} (%)")
    title = "reproduced beside the paper" + (f" — {SHORT}" if protocol == "short" else "")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def write_report(settings: list[Setting], skipped: pd.DataFrame, job_dir: str, title: str, protocol: str) -> Path:
    df = results(settings, protocol)
    job = RunDir(job_dir)
    job.write_table("reproduce.parquet", df)
    md = markdown_report(df, skipped, title, protocol)
    job.write_text("reproduce.md", md + "\n")
    if job.is_local and not df.empty:
        figure(df, Path(job.path) / "reproduce.png", protocol)
    return Path(job.path) / "reproduce.md"
