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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rayexperts.config import ConfigError, is_result_key, load_config, parse_overrides, with_overrides
from rayexperts.registry import METHODS

# catalogue metric -> metrics.parquet column (top-1 and ECE as fractions; ``error`` = 1 − top-1)
METRIC_COLUMN = {"top1_all": "top1", "top1_many": "top1_many", "top1_medium": "top1_medium", "top1_few": "top1_few",
                 "ece": "ece", "error": "top1"}
METRIC_HEADINGS = {"top1_many": "Many", "top1_medium": "Medium", "top1_few": "Few", "top1_all": "All", "ece": "ECE",
                   "error": "Error"}
# Training images of the data sets whose split files fix them (docs/methods.md "Shared building blocks").
KNOWN_TRAIN_SIZES = {"imagenet-lt": 115_846, "places-lt": 62_500, "inat2018": 437_513}
SMALL_BACKBONES = ("resnet8", "resnet20", "resnet32", "digitsnet")  # a quarter of a GPU each
SHORT = "short protocol: not comparable with the paper"
SELECTION_LABEL = {"last": "last epoch", "best_test": "best_test (selected on the test set)",
                   "best_val": "best_val (selected on the validation split)"}


class ReproduceError(RuntimeError):
    """A run of the reproduction failed; the message names it and its log."""


@dataclass
class Setting:
    """One (preset, overrides) pair of the selected rows, trained once per seed."""

    preset: str
    overrides: str
    rows: pd.DataFrame  # the catalogue rows it reproduces
    configs: list[DictConfig] = field(default_factory=list)  # one per seed: the run (or two-stage job) config
    first: list[list[DictConfig]] = field(default_factory=list)  # per seed: runs that must finish first
    seeds: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        r = self.rows.iloc[0]
        variant = f" ({r['variant']})" if r["variant"] else ""
        return f"{r['method']}{variant}, {self.preset}" + (f" {self.overrides}" if self.overrides else "")


# ------------------------------------------------------------------------------------------------ rows


def select_rows(args: argparse.Namespace) -> pd.DataFrame:
    """The catalogue rows the command names (``--catalog`` CSV or the packaged catalogue with filters)."""
    from rayexperts import published

    if args.catalog:
        if not Path(args.catalog).is_file():
            raise ConfigError(f"--catalog {args.catalog}: no such file")
        try:
            df = published.read(args.catalog)
        except ValueError as e:
            raise ConfigError(f"--catalog {args.catalog}: {e}") from e
    else:
        df = published.load()
    for column, value in (("paper", args.paper), ("table", args.table), ("dataset", args.dataset),
                          ("method", args.method)):
        if value:
            df = df[df[column] == value]
    if df.empty:
        chosen = ", ".join(f"{k}={v!r}" for k, v in (("paper", args.paper), ("table", args.table),
                                                      ("dataset", args.dataset), ("method", args.method)) if v)
        raise ConfigError(f"no catalogue row matches {chosen or 'the command'} "
                          f"(papers: {', '.join(sorted(published.load()['paper'].unique()))})")
    return df.reset_index(drop=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _epoch_keys(cfg: DictConfig) -> list[str]:
    return ["train.warmup_epochs", "train.cosine_t_max", *METHODS.get(cfg.method).epoch_keys]


def short_protocol(cfg: DictConfig, scale: float | None, epochs: int | None) -> dict[str, Any]:
    """Overrides that shorten ``cfg`` to ``epochs`` (or ``scale`` × its epochs): every epoch count (warm-up,
    milestones, cosine period, the method's epoch keys) scaled alike, at least 1 where it was."""
    total = int(cfg.train.epochs)
    target = int(epochs) if epochs else max(1, round(total * float(scale)))
    factor = target / total

    def scaled(value: float) -> int:
        return 0 if value == 0 else max(1, round(value * factor))

    out: dict[str, Any] = {"train.epochs": target, "train.milestones": [scaled(m) for m in cfg.train.milestones]}
    for key in _epoch_keys(cfg):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            out[key] = scaled(float(value)) if isinstance(value, (int, float)) else value
    return out


def run_protocol(cfg: DictConfig, row: Any, seeds: int) -> dict[str, Any]:
    """What a setting's runs do about a catalogue row, in the row's terms (:func:`rayexperts.published.
    disagreements`): epochs, checkpoint selection, ``seeds`` runs averaged, the view read, ``data.augment``."""
    view = str(row.get("view", "") or "") or METHODS.get(cfg.method).primary_view_for(cfg)
    return {"epochs": int(cfg.train.epochs), "selection": str(cfg.eval.selection), "seeds": int(seeds), "view": view,
            "augment": str(cfg.data.augment)}


def protocol_lines(setting: Setting) -> list[str]:
    """Per catalogue row of ``setting``: the protocol the row states, what will run, and the row's
    ``protocol_note`` and ``inferred`` mark (``--dry-run``; docs/reproduce.md)."""
    from rayexperts.published import disagreements, stated_protocol

    lines = []
    for _, row in setting.rows.iterrows():
        r = run_protocol(setting.configs[0], row, len(setting.configs))
        stated = stated_protocol(row)
        differ = disagreements(row, r)
        says = ", ".join(f"{k} {v}" for k, v in stated.items()) or "nothing"
        will = ", ".join(f"{k} {v}" + (" (differs)" if k in differ else "") for k, v in r.items())
        what = " ".join(x for x in (row["table"], row["method"], f"({row['variant']})" if row["variant"] else "",
                                    row["metric"], f"{float(row['value']):g}") if x)
        mark = " [inferred]" if row.get("inferred", False) else ""
        note = f"\n      note: {row['protocol_note']}" if str(row.get("protocol_note", "") or "") else ""
        lines.append(f"  - {what}{mark}\n      row states: {says}\n      will run: {will}{note}")
    return lines


def plan(rows: pd.DataFrame, args: argparse.Namespace, user: dict[str, Any]) -> tuple[list[Setting], pd.DataFrame, str]:
    """(the settings to train, the rows skipped for having no preset, the job name)."""
    with_preset = rows[rows["preset"].astype(str).str.strip() != ""]
    skipped = rows[rows["preset"].astype(str).str.strip() == ""]
    job = str(user.pop("run.name", "") or "reproduce-" + _slug(
        Path(args.catalog).stem if args.catalog else " ".join(filter(None, (args.paper, args.table)))))
    storage = user.pop("run.storage_path", "./runs")
    roots = data_roots(getattr(args, "data_root", None) or [])
    check_roots(with_preset, roots, "data.root" in user)
    settings = []
    for (preset, overrides), group in with_preset.groupby(["preset", "overrides"], sort=False):
        setting = Setting(str(preset), str(overrides), group)
        base = load_config(setting.preset, {**parse_overrides(setting.overrides.split()), **user})
        if str(base.data.name) in roots:
            base = load_config(setting.preset, {**parse_overrides(setting.overrides.split()), **user,
                                                "data.root": roots[str(base.data.name)]})
        extra = short_protocol(base, args.epochs_scale, args.epochs) if (args.epochs_scale or args.epochs) else {}
        stated = pd.to_numeric(group["seeds"], errors="coerce").max()
        count = int(args.seeds or (stated if pd.notna(stated) else 3))
        changing = {k: v for k, v in user.items() if is_result_key(k)}  # data.root, resources: the same runs
        digest = hashlib.sha1(json.dumps([setting.overrides, sorted(changing.items(), key=str), extra],
                                         sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{setting.preset}-{digest}"
        for i in range(count):
            seed = int(base.seed) + i
            cfg = with_overrides(base, {**extra, "seed": seed, "run.storage_path": str(Path(storage) / job)
                                        if "://" not in str(storage) else f"{storage}/{job}",
                                        "run.name": f"{name}-seed{seed}"}, "reproduce plan")
            setting.configs.append(cfg)
            setting.first.append(METHODS.get(cfg.method).prerequisites(cfg))
            setting.seeds.append(seed)
        settings.append(setting)
    return settings, skipped, job


def data_roots(items: Sequence[str]) -> dict[str, str]:
    """``--data-root DATASET=PATH`` options as {data set: path}."""
    from rayexperts.registry import DATASETS

    roots: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--data-root {item}: give DATASET=PATH, e.g. "
                              "--data-root cifar10-lt=/data/cifar-10-batches-py")
        if name not in DATASETS.names():
            raise ConfigError(f"--data-root {item}: unknown data set {name!r} (choose one of "
                              f"{', '.join(DATASETS.names())})")
        roots[name] = path
    return roots


def check_roots(rows: pd.DataFrame, roots: dict[str, str], one_root: bool) -> None:
    """Before any config is resolved: one ``data.root`` serves one data set, so rows (with a preset) of several
    need ``--dataset`` or one ``--data-root`` per data set; a ``--data-root`` for a data set no row trains on is a
    mistake. The catalogue's ``dataset`` is the preset's ``data.name``."""
    if roots and one_root:
        raise ConfigError("give either data.root=PATH (one data set) or --data-root DATASET=PATH (one per data set), "
                          "not both")
    used = rows.drop_duplicates(["preset", "overrides"]).groupby("dataset").size().to_dict()
    if one_root and len(used) > 1:
        names = sorted(used)
        raise ConfigError(
            f"the selected rows train on {len(used)} data sets ({', '.join(f'{n}: {used[n]} settings' for n in names)})"
            f" and data.root names one folder: pick one with --dataset ({' or '.join(names)}), or give one root per "
            f"data set with --data-root {names[0]}=PATH --data-root {names[1]}=PATH")
    unused = sorted(set(roots) - set(used))
    if unused:
        raise ConfigError(f"--data-root {unused[0]}=...: no selected row trains on {unused[0]} "
                          f"(they train on {', '.join(sorted(used)) or 'nothing'})")


def check_data(settings: list[Setting]) -> None:
    """Every run's data and storage, checked in the driver before Ray starts (:func:`rayexperts.launch.train.
    preflight`): a wrong ``data.root`` is one line and exit status 2, not failed runs."""
    from rayexperts.launch.train import preflight

    seen = set()
    for s in settings:
        for cfg in [c for cfg, first in zip(s.configs, s.first) for c in (*first, cfg)]:
            key = json.dumps([OmegaConf.to_container(cfg.data), cfg.run.storage_path, cfg.run.mlflow_tracking_uri],
                             sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                preflight(cfg)


# ------------------------------------------------------------------------------------------------ resources, cost


def resources(cfg: DictConfig, cpus: float, gpus: float, concurrent: int, user: dict[str, Any]) -> dict[str, Any]:
    """What a one-worker run asks for: with GPUs a quarter of one for a CIFAR-sized ResNet (four runs share a
    device), else one; on CPUs only an equal share of them (and as many torch threads). Scaling keys the user
    set on the command line win."""
    if any(k.startswith("scaling.") for k in user) or int(cfg.scaling.num_workers) > 1:
        return {}
    if gpus > 0:
        share = 0.25 if str(cfg.model.backbone) in SMALL_BACKBONES else 1.0
        per_gpu = max(1, int(1 / share))
        return {"scaling.use_gpu": True, "scaling.gpus_per_worker": share,
                "scaling.cpus_per_worker": float(max(1, math.floor(cpus / max(1, per_gpu * gpus))))}
    return {"scaling.use_gpu": False, "scaling.cpus_per_worker": float(max(1, math.floor(cpus / max(1, concurrent))))}


def train_size(cfg: DictConfig) -> int | None:
    """Training images of ``cfg``'s data set without reading the images where the profile or the published
    split fixes the number; None when unknown."""
    from rayexperts.data.imbalance import exponential_counts

    name = str(cfg.data.name)
    if name in ("cifar10-lt", "cifar100-lt") and cfg.data.imbalance_type == "exp":
        n_max, classes = (5000, 10) if name == "cifar10-lt" else (500, 100)
        return int(exponential_counts(n_max, classes, float(cfg.data.imbalance_factor)).sum())
    if name in KNOWN_TRAIN_SIZES:
        return KNOWN_TRAIN_SIZES[name]
    if name == "digits-lt" or cfg.data.root:
        from rayexperts.data import build_dataset

        try:
            return len(build_dataset(cfg.data).train)
        except Exception:  # noqa: BLE001 - unknown sizes are reported as such
            return None
    return None


def probe(cfg: DictConfig, steps: int = 5) -> float:
    """Training images per second of ``cfg``'s model on this machine's device (its GPU when it has one): the
    median of a few timed training steps on random images of the data set's size, after two untimed ones."""
    import torch
    import torch.nn.functional as F

    from rayexperts.engine.run import local_device
    from rayexperts.engine.schedule import build_optimizer
    from rayexperts.methods.base import Batch
    from rayexperts.registry import DATASETS

    entry = DATASETS.get(str(cfg.data.name))
    classes = entry.num_classes or 10
    channels = entry.in_channels
    size = {"digits-lt": 8, "cifar10-lt": 32, "cifar100-lt": 32}.get(str(cfg.data.name), int(cfg.data.image_size))
    device = local_device()
    counts = torch.linspace(100, 2, classes)
    method = METHODS.get(cfg.method)(cfg, counts, channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = method.build_model().to(device)
        b = max(2, min(int(cfg.train.batch_size) // int(cfg.scaling.num_workers), 32))
        images = torch.randn(b, channels, size, size, device=device)
        targets = torch.randint(classes, (b,)).to(device)
        batch = Batch(images, targets, key_images=images if method.uses_key_view else None)
    method.class_counts = method.class_counts.to(device)  # not setup(): CBD's would load teachers not trained yet
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
    model.train()
    method.on_epoch(0)

    def step() -> None:
        try:
            loss = method.training_step(model, batch).total
        except (ConfigError, FileNotFoundError, ValueError):  # needs finished runs (teachers): the network alone
            loss = F.cross_entropy(model(batch.images).logits[0], batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed() -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        step()
    times = sorted(timed() for _ in range(steps))
    return b / times[len(times) // 2]  # the median step: robust to a busy machine


def estimate(settings: list[Setting], cpus: float, gpus: float) -> dict[str, dict[str, Any]]:
    """Per run name: epochs, images, probe images/s and hours (of this machine's device), from one probe per
    distinct model; a run with a first wave (CBD's teachers) adds theirs."""
    probes: dict[str, float] = {}
    out = {}
    for s in settings:
        for cfg, first in zip(s.configs, s.first):
            total_h, notes = 0.0, []
            for c in [*first, cfg]:
                key = json.dumps([c.method, c.model.backbone, int(c.model.num_experts), c.data.name,
                                  int(c.train.batch_size), c.get(c.method) and OmegaConf.to_container(c[c.method])],
                                 sort_keys=True, default=str)
                if key not in probes:
                    try:
                        probes[key] = probe(c)
                    except Exception as e:  # noqa: BLE001 - a model that cannot be probed here is reported
                        probes[key] = float("nan")
                        notes.append(f"probe failed: {str(e).splitlines()[0][:80]}")
                images = train_size(c)
                if images is None:
                    notes.append(f"{c.data.name}: training size unknown")
                    total_h = float("nan")
                    continue
                total_h += int(c.train.epochs) * images / probes[key] / 3600
            out[cfg.run.name] = {"epochs": int(cfg.train.epochs), "runs": len(first) + 1, "hours": total_h,
                                 "note": "; ".join(notes)}
    return out


# ------------------------------------------------------------------------------------------------ running


def main_dir(cfg: DictConfig, first: list[DictConfig]) -> tuple[DictConfig, str]:
    """The config whose run directory holds the row's numbers (after a first wave: the method's own run)."""
    from rayexperts.rundir import RunDir

    if first:
        cfg = METHODS.get(cfg.method).after_prerequisites(
            cfg, [RunDir.of(c.run.storage_path, c.run.name).uri for c in first])
    return cfg, RunDir.of(cfg.run.storage_path, cfg.run.name).uri


def execute(settings: list[Setting], user: dict[str, Any]) -> None:
    """Train every run not finished yet (first waves first), one actor each, with progress and an ETA."""
    import ray

    from rayexperts.launch.cluster import ensure_ray
    from rayexperts.launch.ensemble import is_finished, raise_failed, train_in_parallel

    waves: list[list[tuple[DictConfig, Setting, int]]] = [[], []]
    for s in settings:
        for i, (cfg, first) in enumerate(zip(s.configs, s.first)):
            waves[0].extend((c, s, i) for c in first)
            waves[1 if first else 0].append((main_dir(cfg, first)[0] if first else cfg, s, i))
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
    from rayexperts.rundir import RunDir

    rundir = RunDir(path)
    metrics = rundir.read_table("metrics.parquet")
    cfg = rundir.config()
    if metrics is None or metrics.empty or cfg is None:
        return ""
    view = METHODS.get(cfg.method).primary_view_for(cfg)
    last = metrics[(metrics["epoch"] == metrics["epoch"].max()) & (metrics["view"] == view)]
    if last.empty:
        return ""
    wall = _wall_seconds(metrics)
    return f" (seed {cfg.seed}): top-1 {100 * float(last['top1'].iloc[0]):.2f}% ({view}, last epoch), wall {wall:.0f} s"


def _wall_seconds(metrics: pd.DataFrame) -> float:
    first = metrics.sort_values("timestamp").iloc[0]
    return float(metrics["timestamp"].max() - first["timestamp"] + first.get("train_seconds", 0.0))


# ------------------------------------------------------------------------------------------------ report


def _run_values(path: str, view: str, metric: str, selection: str) -> float | None:
    """The run's number for a catalogue metric at ``selection``, in percent; None when it lacks the view."""
    from rayexperts.analysis import select_epochs
    from rayexperts.rundir import RunDir

    metrics = RunDir(path).read_table("metrics.parquet")
    if metrics is None or view not in set(metrics["view"]):
        return None
    rows = select_epochs(metrics[metrics["view"] == view].assign(run=path), selection)
    value = float(rows[METRIC_COLUMN[metric]].iloc[0]) * 100
    return 100 - value if metric == "error" else value


def results(settings: list[Setting], protocol: str) -> pd.DataFrame:
    """``reproduce.parquet``: one row per (catalogue row, metric, selection)."""
    from rayexperts.rundir import RunDir

    out = []
    for s in settings:
        paths = [main_dir(cfg, first)[1] for cfg, first in zip(s.configs, s.first)]
        runs = [(p, RunDir(p).read_table("metrics.parquet")) for p in paths]
        for _, row in s.rows.iterrows():
            view = row.get("view", "") or METHODS.get(s.configs[0].method).primary_view_for(s.configs[0])
            selections = list(dict.fromkeys([row["selection"] or "last", "last"]))
            for selection in selections:
                values = [v for p, m in runs if m is not None and (v := _run_values(p, view, row["metric"], selection))
                          is not None]
                mean = sum(values) / len(values) if values else float("nan")
                sd = pd.Series(values).std() if len(values) > 1 else float("nan")
                walls = [_wall_seconds(m) for _, m in runs if m is not None and not m.empty]
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
    from rayexperts.rundir import RunDir

    df = results(settings, protocol)
    job = RunDir(job_dir)
    job.write_table("reproduce.parquet", df)
    md = markdown_report(df, skipped, title, protocol)
    job.write_text("reproduce.md", md + "\n")
    if job.is_local and not df.empty:
        figure(df, Path(job.path) / "reproduce.png", protocol)
    return Path(job.path) / "reproduce.md"


# ------------------------------------------------------------------------------------------------ command


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rayexperts reproduce",
        description="A published table re-run as one Ray job, beside the paper's numbers.",
        epilog="examples:\n  rayexperts reproduce --paper NCL --table 'Table 1' --dataset cifar100-lt --dry-run "
               "data.root=/data/cifar-100-python\n  rayexperts reproduce --paper NCL --table 'Table 1' "
               "--data-root cifar10-lt=/data/cifar-10-batches-py --data-root cifar100-lt=/data/cifar-100-python\n"
               "  rayexperts reproduce --catalog my_rows.csv --seeds 2 --epochs-scale 0.05\n"
               "(python jobs/reproduce.py takes the same arguments.)\n"
               "Results: run.storage_path/<job>/ (default ./runs/reproduce-<paper>-<table>/): "
               "reproduce.parquet, reproduce.md, reproduce.png; re-issue the same command to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", help="MLLT, NCL, ECL, CBD, SADE, RIDE (the catalogue's paper column)")
    p.add_argument("--table", help="e.g. 'Table 2'")
    p.add_argument("--dataset", help="e.g. cifar100-lt")
    p.add_argument("--method", help="a catalogue method, e.g. NCL")
    p.add_argument("--catalog", help="a CSV in the catalogue's format instead of the packaged one")
    p.add_argument("--data-root", action="append", metavar="DATASET=PATH",
                   help="the data of one data set (repeat it for a table over several, e.g. --data-root "
                        "cifar10-lt=/data/cifar-10-batches-py); data.root=PATH serves a plan over one data set")
    p.add_argument("--seeds", type=int, help="runs per setting (default: the paper's count, else 3)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated cost; train nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print each setting's resolved config (each value with its layer) and exit; no Ray")
    p.add_argument("--epochs-scale", type=float, help="short protocol: every epoch count times this")
    p.add_argument("--epochs", type=int, help="short protocol: this many epochs")
    p.add_argument("overrides", nargs="*", help="dotted config keys for every run, e.g. data.root=... run.storage_path=...")
    args = p.parse_args(list(argv))
    if not (args.paper or args.catalog):
        p.error("give --paper (and --table) or --catalog")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.epochs_scale is not None and not 0 < args.epochs_scale <= 1:
        p.error("--epochs-scale must lie in (0, 1]")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def print_plan(settings: list[Setting], skipped: pd.DataFrame, cost: dict[str, dict[str, Any]], where: str) -> None:
    print(f"{'run':<48} {'epochs':>6} {'resources':<28} {'est. hours':>10}  rows")
    total, unknown = 0.0, 0
    for s in settings:
        for cfg in s.configs:
            c = cost.get(cfg.run.name, {})
            cpus = f"{cfg.scaling.cpus_per_worker:g} CPU" if cfg.scaling.cpus_per_worker else "a share of the CPUs"
            res = f"{cfg.scaling.gpus_per_worker:g} GPU, {cpus}" if cfg.scaling.use_gpu else cpus
            hours = c.get("hours", float("nan"))
            unknown += math.isnan(hours)
            total += 0 if math.isnan(hours) else hours
            runs = f" (+{c['runs'] - 1} first)" if c.get("runs", 1) > 1 else ""
            note = f"  [{c['note']}]" if c.get("note") else ""
            print(f"{cfg.run.name:<48} {cfg.train.epochs:>6} {res:<28} {hours:>10.3f}  {s.label}{runs}{note}")
        for line in protocol_lines(s):
            print(line)
    for _, r in skipped.drop_duplicates(["table", "method", "variant", "dataset", "backbone"]).iterrows():
        print(f"no preset: {r['table']} {r['method']}" + (f" ({r['variant']})" if r["variant"] else "")
              + f", {r['dataset']} {r['backbone']}: skipped" + (" [inferred]" if r.get("inferred", False) else ""))
    missing = f" + {unknown} runs not estimated (see their notes)" if unknown else ""
    print(f"estimated total: {total:.3f} {where}-hours{missing} (a timing probe of each model on this machine's {where}: "
          "the median of 5 training steps; runs one after another, data loading and evaluation not counted)")


def main(argv: Sequence[str] | None = None) -> int:
    from rayexperts.data.errors import DataError
    from rayexperts.launch.cluster import ClusterUnreachable
    from rayexperts.launch.ensemble import PrerequisiteFailed
    from rayexperts.rundir import CheckpointMismatch, RunDir, StorageError

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
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
    except (ConfigError, DataError, CheckpointMismatch, StorageError, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PrerequisiteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nreport: {md}")
    print(md.read_text())
    return 0
