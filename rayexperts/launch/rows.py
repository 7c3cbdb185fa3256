"""Paper rows on a lent GPU (``jobs/gpu_rows.py``, docs/gpu.md "Paper rows on a lent GPU"): the CIFAR-10-LT IF 100
rows of the catalogue, each trained to its last epoch under a time budget, beside the published number.

Each row is ``rayexperts train --config <preset> compat=official seed=0 run.ray=false ...`` in a child process
(in-process training: no Ray; a crash or an out-of-memory error ends one row, not the script), bf16 autocast
(``train.amp``) and the data on the device (``data.cache=device``). The rows go in :data:`ROWS` order; a row
starts only with ``--min-row-s`` seconds left, and a row whose pace (the time between its checkpoints) shows it
cannot end inside the budget is stopped at once (Ctrl-C: its checkpoints stay, re-running the command resumes it)
and marked unfinished, leaving its time to the rows after it. ``rows.json`` and ``rows.md`` in ``--out`` are
rewritten after every row, so what finished is kept whatever happens next.

Each row is shown at ``last`` and, where it differs, at the selection the paper reported (the catalogue's, else
the recipe's ``eval.selection``), beside the catalogue's number, with its wall time and training images/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding rayexperts/ (the work tree)
# Most value per minute first: CE and LDAM-DRW are one ResNet-32 for 200 epochs with a catalogue row each (ECL
# Table I; NCL Table 1 and ECL Table I); NCL's two rows (single expert, ensemble) cost three ResNet-32 with MoCo
# for 400 epochs; BalPoE (three experts, 200 epochs) has no catalogue row to compare with.
ROWS = ("cifar10_lt_if100_ce", "cifar10_lt_if100_ldam_drw", "cifar10_lt_if100_ncl", "cifar10_lt_if100_balpoe")
PROTOCOL = ("compat=official", "seed=0", "run.ray=false", "train.amp=true", "data.cache=device",
            "run.tensorboard=false")  # tensorboardX is not on the lent machine
STOP_GRACE_S = 30.0  # after Ctrl-C, how long a row may take to stop before it is killed
MARGIN_S = 10.0  # kept back from the budget to stop a row and write the summary


@dataclass
class Row:
    """One trained (or skipped) row: what ran, how it ended, and its numbers beside the catalogue's."""

    preset: str
    status: str = "not started"  # finished | unfinished | failed | not started
    reason: str = ""
    epochs: int = 0
    epochs_done: int = 0
    wall_s: float = 0.0
    images_per_sec: float = math.nan
    run_dir: str = ""
    command: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ one row


def row_config(preset: str, data: str, storage: str, overrides: Sequence[str], epochs: int | None, use_gpu: bool):
    """The row's resolved config and the dotted overrides that give it (also the child's command line): the
    protocol, the catalogue's overrides of the preset, ``--epochs`` as a short protocol (every epoch count
    scaled alike: :func:`rayexperts.launch.reproduce_plan.short_protocol`), then the user's."""
    from rayexperts.config import load_config, parse_overrides

    catalogue = " ".join(dict.fromkeys(str(o) for o in catalogue_rows(preset)["overrides"] if str(o).strip()))
    dotted = list(dict.fromkeys([*PROTOCOL, *catalogue.split(), f"scaling.use_gpu={str(use_gpu).lower()}",
                                 f"data.root={data}", f"run.storage_path={storage}", f"run.name={preset}", *overrides]))
    if epochs:
        from rayexperts.launch.reproduce_plan import short_protocol

        base = load_config(preset, parse_overrides(dotted))
        dotted += [f"{k}={json.dumps(v)}" for k, v in short_protocol(base, None, epochs).items()]
    return load_config(preset, parse_overrides(dotted)), dotted


def catalogue_rows(preset: str) -> pd.DataFrame:
    """The catalogue's CIFAR-10-LT IF 100 rows that ``preset`` trains (:func:`rayexperts.analysis.published`)."""
    from rayexperts.analysis import published

    return published(preset=preset, dataset="cifar10-lt", imbalance_factor=100)


def checkpoint_epoch(run_dir: Path) -> int:
    """Epochs held by the newest ``checkpoint_<epoch>`` of ``run_dir`` (0 without one)."""
    found = [int(p.name.split("_")[-1]) for p in run_dir.glob("checkpoint_*") if p.name.split("_")[-1].isdigit()]
    return max(found, default=0)


def projected_end(seen: list[tuple[float, int]], epochs: int) -> float | None:
    """When the run should end, from the times its checkpoints appeared (``(time, epochs done)``, oldest first):
    the pace between the first and the newest one seen (the first epoch's compile and caching excluded), carried
    on to ``epochs``; None before two checkpoints."""
    if len(seen) < 2 or seen[-1][1] <= seen[0][1]:
        return None
    (t0, e0), (t1, e1) = seen[0], seen[-1]
    return t1 + (t1 - t0) / (e1 - e0) * (epochs - e1)


def watch(proc: subprocess.Popen, run_dir: Path, epochs: int, deadline: float, poll_s: float = 0.5,
          min_pace_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> tuple[str, str]:
    """Wait for ``proc`` (a row's training); stop it with Ctrl-C (SIGINT, then SIGKILL after
    :data:`STOP_GRACE_S`) at ``deadline``, or as soon as its pace, measured over at least ``min_pace_s``
    seconds of its new checkpoints (so that polling every ``poll_s`` cannot distort it), projects an end after
    ``deadline``. Returns (status, reason): ``finished``, ``failed`` (its exit status) or ``unfinished`` (why
    it was stopped)."""
    before = checkpoint_epoch(run_dir)  # a resumed row's old checkpoints say nothing about its pace now
    seen: list[tuple[float, int]] = []
    reason = ""
    while proc.poll() is None:
        now = clock()
        done = checkpoint_epoch(run_dir)
        if done > max(before, seen[-1][1] if seen else 0):
            seen.append((now, done))
        end = projected_end(seen, epochs) if seen and seen[-1][0] - seen[0][0] >= min_pace_s else None
        if now >= deadline:
            reason = f"stopped at the budget after {done}/{epochs} epochs"
        elif end is not None and end > deadline:
            reason = (f"stopped after {done}/{epochs} epochs: at its pace it would end {end - deadline:.0f} s after the "
                      "budget")
        if reason:
            stop(proc)
            return "unfinished", reason
        time.sleep(poll_s)
    if proc.returncode == 0 and checkpoint_epoch(run_dir) >= epochs:
        return "finished", ""
    return "failed", f"exit status {proc.returncode}"


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the row's process (it keeps its checkpoints and exits), then kill its process group if it hangs."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session (start_new_session)
        proc.wait()


def child_env() -> dict[str, str]:
    """This environment with the work tree first on ``PYTHONPATH`` (the rows run the package they were started from)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PACKAGE_ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *paths]), "PYTHONUNBUFFERED": "1"}


def run_row(row: Row, cfg, deadline: float, log: Path) -> None:
    """Train ``row`` in a child process (its output echoed and kept in ``log``) until it ends or is stopped."""
    run_dir = Path(str(cfg.run.storage_path)) / str(cfg.run.name)
    tail: deque[str] = deque(maxlen=20)
    started = time.monotonic()
    with open(log, "a") as keep:
        proc = subprocess.Popen(row.command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def echo() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                print(f"  {line}", end="", flush=True)
                keep.write(line)
                tail.append(line.strip())

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        try:
            row.status, row.reason = watch(proc, run_dir, row.epochs, deadline)
        except KeyboardInterrupt:
            stop(proc)
            row.status, row.reason = "unfinished", "interrupted"
            raise
        finally:
            reader.join(timeout=5)
            row.wall_s = time.monotonic() - started
            row.epochs_done = checkpoint_epoch(run_dir)
            if row.status == "failed":
                last = [line for line in tail if line.startswith("error:")] or list(tail)[-1:]
                row.reason += f": {last[-1][:300]}" if last else ""


def row_results(row: Row, cfg) -> None:
    """``row.results``: per catalogue row (or the method's primary view when the catalogue has none), ours at
    ``last`` and at the paper's selection, in percent, from the run's ``metrics.parquet`` (a row not started: the
    catalogue's numbers only); and the median training images/s of its epochs after the first (which holds the
    compile and the caching)."""
    from rayexperts.analysis import select_epochs
    from rayexperts.launch.reproduce_report import METRIC_COLUMN
    from rayexperts.registry import METHODS

    path = Path(row.run_dir) / "metrics.parquet"
    metrics = pd.read_parquet(path) if path.exists() and row.status != "not started" else None
    if metrics is not None and "images_per_sec" in metrics:
        per_epoch = metrics.groupby("epoch")["images_per_sec"].first()
        later = per_epoch[per_epoch.index > per_epoch.index.min()]
        row.images_per_sec = float((later if len(later) else per_epoch).median())
    found = catalogue_rows(row.preset)
    primary = METHODS.get(str(cfg.method)).primary_view_for(cfg)
    wanted = [r for _, r in found.iterrows()] or [None]
    for r in wanted:
        view = (str(r.get("view", "")) or primary) if r is not None else primary
        metric = str(r["metric"]) if r is not None else "top1_all"
        paper_selection = (str(r["selection"]) if r is not None and str(r["selection"]) else "") \
            or str(cfg.eval.selection)
        entry: dict[str, Any] = {
            "view": view, "metric": metric, "paper": float(r["value"]) if r is not None else None,
            "paper_selection": paper_selection, "source": str(r["source"]) if r is not None else "not in the catalogue",
            "variant": str(r["variant"]) if r is not None else "", "last": None, "at_paper_selection": None,
        }
        if metrics is not None and view in set(metrics["view"]):
            rows = metrics[metrics["view"] == view].assign(run=row.run_dir)
            for key, selection in (("last", "last"), ("at_paper_selection", paper_selection)):
                if selection in ("last", "best_test") or (selection == "best_val" and "val_top1" in rows):
                    value = 100 * float(select_epochs(rows, selection)[METRIC_COLUMN[metric]].iloc[0])
                    entry[key] = 100 - value if metric == "error" else value
        row.results.append(entry)


# ------------------------------------------------------------------------------------------------ summary


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    """``rows.md``: one line per (row, catalogue number)."""
    lines = [f"# CIFAR-10-LT IF 100 rows ({summary['protocol']})", "",
             f"Device: {summary['device']}; torch {summary['torch']}; budget {summary['budget_s']:.0f} s, spent "
             f"{summary['spent_s']:.0f} s; `{' '.join(summary['protocol_overrides'])}`.", "",
             "| preset | status | epochs | view | ours, last (%) | ours, paper's selection (%) | paper (%) | source | "
             "wall (s) | img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        status = row["status"] + (f" ({row['reason']})" if row["reason"] else "")
        for r in row["results"] or [{}]:
            differs = r.get("paper_selection", "last") != "last"
            theirs = f"{_pct(r.get('at_paper_selection'))} [{r['paper_selection']}]" if differs else "= last"
            view = r.get("view", "") + (f" ({r['variant']})" if r.get("variant") else "")
            lines.append(f"| `{row['preset']}` | {status} | {row['epochs_done']}/{row['epochs']} | {view} | "
                         f"{_pct(r.get('last'))} | {theirs if r else '–'} | {_pct(r.get('paper'))} | "
                         f"{r.get('source', '')} | {row['wall_s']:.0f} | {_pct(row['images_per_sec'])} |")
    if summary["protocol"] != "paper":
        lines += ["", "Short protocol: not comparable with the papers' numbers."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``rows.json`` and ``rows.md`` in ``out``, each written to a temporary name and moved into place."""
    for name, text in (("rows.json", json.dumps(summary, indent=1, default=str)), ("rows.md", markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def print_row(row: Row) -> None:
    for r in row.results:
        mine = f"{_pct(r['last'])} (last)" + (f", {_pct(r['at_paper_selection'])} ({r['paper_selection']})"
                                             if r["paper_selection"] != "last" else "")
        paper = f"paper {_pct(r['paper'])} ({r['source']})" if r["paper"] is not None else r["source"]
        print(f"[rows] {row.preset} {r['view']}: ours {mine} | {paper}", flush=True)
    print(f"[rows] {row.preset}: {row.status}{' (' + row.reason + ')' if row.reason else ''}, "
          f"{row.epochs_done}/{row.epochs} epochs, wall {row.wall_s:.0f} s, {_pct(row.images_per_sec)} img/s", flush=True)


# ------------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> int:
    """Train the rows (``args``: :func:`rayexperts.cli.gpu_rows`); 0 when every row ran without an error (finished,
    or stopped by the budget), 1 if one failed; bad input raises :class:`~rayexperts.config.ConfigError`."""
    started = time.monotonic()
    from importlib.metadata import version

    from rayexperts.config import ConfigError

    cuda = False
    if not args.cpu:  # the rehearsal's parent never imports torch (seconds on 2 cores)
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("[rows] no CUDA device (torch.cuda.is_available() is False): nothing trained; --cpu trains on the CPU",
              flush=True)
        return 0
    deadline = started + args.budget - MARGIN_S
    out = Path(args.out).resolve()
    if not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data}: no such file (the CIFAR-10 Parquet file)")
    planned = [(p, *row_config(p, str(Path(args.data).resolve()), str(out / "runs"), args.overrides, args.epochs,
                               cuda)) for p in [s.strip() for s in args.rows.split(",") if s.strip()]]
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    summary: dict[str, Any] = {
        "device": device, "torch": version("torch"), "budget_s": args.budget, "spent_s": 0.0,
        "protocol": f"short protocol: {args.epochs} epochs" if args.epochs else "paper",
        "protocol_overrides": [*PROTOCOL, *args.overrides], "data": str(Path(args.data).resolve()), "rows": [],
    }
    print(f"[rows] {len(planned)} rows on {device}, budget {args.budget:.0f} s, results in {out}", flush=True)
    failed = False
    try:
        for preset, cfg, dotted in planned:
            row = Row(preset, epochs=int(cfg.train.epochs), run_dir=str(out / "runs" / preset),
                      command=[sys.executable, "-m", "rayexperts.cli", "train", "--config", preset, *dotted])
            summary["rows"].append(row)
            left = deadline - time.monotonic()
            if left < args.min_row_s:
                row.reason = f"{left:.0f} s left, under --min-row-s {args.min_row_s:.0f}"
            else:
                print(f"[rows] {preset}: {row.epochs} epochs, {left:.0f} s left: {' '.join(row.command[2:])}", flush=True)
                run_row(row, cfg, deadline, out / "rows.log")
                failed |= row.status == "failed"
            row_results(row, cfg)
            print_row(row)
            summary["spent_s"] = time.monotonic() - started
            write_summary(out, {**summary, "rows": [asdict(r) for r in summary["rows"]]})
    except KeyboardInterrupt:
        print("\n[rows] interrupted: the summary keeps the rows so far; re-run the command to resume", file=sys.stderr)
        summary["spent_s"] = time.monotonic() - started
        write_summary(out, {**summary, "rows": [asdict(r) for r in summary["rows"]]})
        return 130
    summary["spent_s"] = time.monotonic() - started
    write_summary(out, {**summary, "rows": [asdict(r) for r in summary["rows"]]})
    print(markdown({**summary, "rows": [asdict(r) for r in summary["rows"]]}), flush=True)
    return 1 if failed else 0
