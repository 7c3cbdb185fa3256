"""What ``rayexperts reproduce`` trains (docs/reproduce.md): the catalogue rows the command selects, grouped into
settings (a preset and its overrides) × seeds, with a short protocol scaled from the paper's epochs, the data
roots checked before any config is resolved, and every run's data and storage checked before Ray starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rayexperts.config import ConfigError, is_result_key, load_config, parse_overrides, with_overrides
from rayexperts.registry import METHODS


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
