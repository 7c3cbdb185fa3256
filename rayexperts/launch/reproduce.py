"""A paper's table re-run as one Ray job, beside the published numbers (``jobs/reproduce.py``).

1. **Rows**: from the packaged catalogue (:func:`rayexperts.analysis.published`, ``--paper/--table/--dataset/
   --method``) or a CSV in its format (``--catalog``). A row without a ``preset`` is listed as "no preset" and
   skipped; rows sharing a (preset, overrides) pair are one setting, trained once per seed.
2. **Plan**: settings × seeds (``--seeds``, else the most the catalogue's rows state, else 3; seed values start
   at the resolved config's ``seed``). ``--dry-run`` prints each run's preset, overrides, epochs, resources and an
   estimated cost from a timing probe of each distinct model on this machine, then exits.
3. **Run**: every run trains from its own Ray actor with its own resources (a quarter of a GPU for a CIFAR
   ResNet, one GPU for an ImageNet one; on a CPU-only cluster an equal share of the CPUs, as many torch threads);
   runs that must finish first (CBD's teachers, RIDE's experts) train in a first wave. Run directories are named
   by setting and seed under ``run.storage_path/<job>/``: a finished run is reused, an interrupted one resumes
   from its checkpoint, so the same command after a failure or ``ray job stop`` does only the missing work.
4. **Report**: ``reproduce.parquet`` (one row per catalogue row × metric × selection: paper value, ours mean and
   sd over seeds, delta, run ids, wall seconds, GPU- and CPU-hours, protocol), ``reproduce.md`` laid out like the
   paper's table, and ``reproduce.png``. Ours is computed with the selection the paper used and with ``last``.
5. **Short protocols** (``--epochs-scale F`` / ``--epochs N``): every epoch count scaled; the outputs say
   "short protocol: not comparable with the paper" and carry ``protocol=short``.

This module runs the job (:func:`execute`, :func:`main`); the plan lives in :mod:`.reproduce_plan`, the resources
and the cost estimate in :mod:`.reproduce_cost`, the report in :mod:`.reproduce_report`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rayexperts.config import ConfigError, parse_overrides, with_overrides
from rayexperts.launch.reproduce_cost import estimate, print_plan, resources
from rayexperts.launch.reproduce_plan import Setting, check_data, plan, select_rows
from rayexperts.launch.reproduce_report import SHORT, wall_seconds, write_report
from rayexperts.launch.stages import main_stage
from rayexperts.registry import METHODS
from rayexperts.rundir import RunDir


def execute(settings: list[Setting], user: dict[str, Any]) -> None:
    """Train every run not finished yet (first waves first), one actor each, with progress and an ETA."""
    import ray

    from rayexperts.launch.cluster import ensure_ray
    from rayexperts.launch.stages import is_finished, raise_failed, train_in_parallel

    waves: list[list[tuple[DictConfig, Setting, int]]] = [[], []]
    for s in settings:
        for i, (cfg, first) in enumerate(zip(s.configs, s.first)):
            waves[0].extend((c, s, i) for c in first)
            waves[1 if first else 0].append((main_stage(cfg, first), s, i))
    todo = sum(1 for wave in waves for c, _, _ in wave if not is_finished(c))
    total = sum(len(w) for w in waves)
    print(f"[reproduce] {total} runs, {total - todo} already finished", flush=True)
    if todo:
        ensure_ray(dashboard=False)
    cluster = ray.cluster_resources() if todo else {}
    done, started = [0], time.time()
    trained = [0]

    def report(outcome) -> None:
        done[0] += 1
        if outcome.status == "finished":
            trained[0] += 1
        elapsed = time.time() - started
        left = todo - trained[0]
        eta = f", ETA {elapsed / trained[0] * left / 60:.1f} min" if trained[0] and left > 0 else ""
        print(f"[reproduce] {outcome.name}: {outcome.status}{_result_text(outcome.path)} — {done[0]} of {total} "
              f"runs{eta}", flush=True)

    for wave in waves:
        if not wave:
            continue
        concurrent = len([c for c, _, _ in wave if not is_finished(c)]) or 1
        cfgs = []
        for cfg, _s, _i in wave:
            extra = resources(cfg, cluster.get("CPU", os.cpu_count() or 1), cluster.get("GPU", 0), concurrent, user)
            cfgs.append(with_overrides(cfg, extra, "reproduce resources") if extra else cfg)
        outcomes = train_in_parallel(cfgs, "reproduce", on_done=report)
        raise_failed([o for o in outcomes if o.status == "failed"], "Re-run the same command to retry them")


def _result_text(path: str) -> str:
    rundir = RunDir(path)
    metrics = rundir.read_table("metrics.parquet")
    cfg = rundir.config()
    if metrics is None or metrics.empty or cfg is None:
        return ""
    view = METHODS.get(cfg.method).primary_view_for(cfg)
    last = metrics[(metrics["epoch"] == metrics["epoch"].max()) & (metrics["view"] == view)]
    if last.empty:
        return ""
    wall = wall_seconds(metrics)
    return f" (seed {cfg.seed}): top-1 {100 * float(last['top1'].iloc[0]):.2f}% ({view}, last epoch), wall {wall:.0f} s"


def main(args: argparse.Namespace) -> int:
    """``rayexperts reproduce`` once its arguments are parsed (:func:`rayexperts.cli.reproduce_parser`)."""
    user = parse_overrides(args.overrides)
    rows = select_rows(args)
    settings, skipped, job = plan(rows, args, dict(user))
    protocol = "short" if (args.epochs_scale or args.epochs) else "paper"
    title = (f"{args.paper or Path(args.catalog).stem} {args.table or ''}".strip() + " reproduced"
             + (f" ({SHORT})" if protocol == "short" else ""))
    if not settings:
        raise ConfigError("no selected row has a preset: nothing to train (rows without one are listed above)")
    job_dir = settings[0].configs[0].run.storage_path
    if args.print_config:
        from rayexperts.config import explain

        for s in settings:
            print(f"# {s.label}: the seed-{s.seeds[0]} run's config (before the resources the job picks)")
            root = {"data.root": s.configs[0].data.root} if args.data_root and s.configs[0].data.root else {}
            print(explain(s.preset, {**parse_overrides(s.overrides.split()), **user, **root,
                                     "seed": s.seeds[0]}), end="\n\n")
        return 0
    if args.dry_run:
        import torch

        where = "GPU" if torch.cuda.is_available() else "CPU"
        concurrent = sum(len(s.configs) for s in settings)
        for s in settings:
            s.configs = [with_overrides(c, extra, "reproduce resources") if (extra := resources(
                c, float(os.cpu_count() or 1), float(torch.cuda.device_count()), concurrent, user)) else c
                for c in s.configs]
        print_plan(settings, skipped, estimate(settings, os.cpu_count() or 1, 0), where)
        return 0
    from rayexperts.launch.train import needs_ray

    needs_ray(settings[0].configs[0], "rayexperts reproduce (its runs train as Ray actors)")
    RunDir(job_dir).check_writable()
    check_data(settings)
    print(f"[reproduce] {title}: {sum(len(s.configs) for s in settings)} runs in {job_dir}", flush=True)
    execute(settings, user)
    md = write_report(settings, skipped, job_dir, title, protocol)
    print(f"\nreport: {md}")
    print(md.read_text())
    return 0
