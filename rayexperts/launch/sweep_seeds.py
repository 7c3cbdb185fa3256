"""Several seeds per configuration (``tune.seeds_per_config=N``): one Tune trial per configuration trains its N
seeds and reports their mean, so the searcher and the scheduler rank configurations, not seeds.

The seeds (``seed``, ``seed+1``, ...) are trained in the trial's process in turn, one epoch each (each seed's run
reseeds at every epoch, so the turns change no number), each in its own run directory
``<trial>/seed_<k>/``. After every epoch the trial reports the mean of the seeds' metrics, with one checkpoint
holding each seed's (``seed_<k>/``): ASHA stops, and PBT copies, a configuration as a whole, and a restored trial
resumes every seed. ``trials.parquet`` keeps one row per seed (``kind=seed``) and one per configuration
(``kind=config``: the mean of its seeds, ``<metric>_sd`` their sample standard deviation (n - 1), ``n_seeds``);
the best configuration is chosen on the mean validation metric (docs/configs.md "Sweeps").
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from rayexperts.config import with_overrides
from rayexperts.rundir import RunDir

SEED_DIR = "seed_{}"
DROPPED = ("epoch", "timestamp", "seed")  # a seed's own columns, not in a configuration's row
NO_SPREAD = ("num_samples", "val_num_samples", "workers", "torch_threads", "images_per_sec", "train_seconds", "lr",
             "transductive")  # bookkeeping: a configuration's row holds their mean, no sd


def seed_configs(cfg: DictConfig, trial_dir: str) -> list[DictConfig]:
    """The runs of one configuration: seeds ``seed`` .. ``seed + N - 1``, each in ``trial_dir/seed_<k>``."""
    n = int(cfg.tune.seeds_per_config)
    return [with_overrides(cfg, {"seed": int(cfg.seed) + k, "run.storage_path": trial_dir,
                                 "run.name": SEED_DIR.format(k)}, f"sweep trial: seed {k + 1} of {n}")
            for k in range(n)]


def mean_metrics(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' reports of one epoch as one: each number the mean over the seeds (a key every seed reported),
    anything else the first seed's; ``n_seeds`` how many."""
    first = reports[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [r.get(key) for r in reports]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[key] = float(np.mean(values)) if numbers and key != "epoch" else value
    out["n_seeds"] = len(reports)
    return out


_END = object()


def train_seeds(configs: list[DictConfig], threads: int,
                prepare: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Train ``configs`` (one per seed) in this Tune trial, one epoch of each in turn, reporting their mean to Tune
    after each epoch (``prepare`` turns it into Tune's result; None: an epoch without evaluation, not reported)."""
    import ray.tune

    from rayexperts.engine.entry import one_worker_run
    from rayexperts.engine.fit import Reporter, run_epochs

    n = len(configs)
    for cfg in configs:
        RunDir.for_config(cfg).write_config(cfg)
    checkpoint = ray.tune.get_checkpoint()
    restored, latest = _restored(checkpoint, n)
    turns = [threading.Semaphore(0) for _ in range(n)]
    handed = threading.Semaphore(0)
    slots: list[Any] = [None] * n

    def seed(k: int) -> None:
        try:
            turns[k].acquire()
            run = one_worker_run(configs[k], threads)

            def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
                slots[k] = (metrics, checkpoint)
                handed.release()
                turns[k].acquire()

            label = f"{checkpoint.path}/{SEED_DIR.format(k)}" if checkpoint is not None else ""
            run_epochs(run, Reporter(report, latest[k], label))
            slots[k] = _END
        except BaseException as e:  # noqa: BLE001 - handed to the trial's thread, which raises it
            slots[k] = e
        handed.release()

    workers = [threading.Thread(target=seed, args=(k,), daemon=True, name=f"seed-{k}") for k in range(n)]
    for w in workers:
        w.start()
    try:
        while True:
            epoch = []
            for k in range(n):
                turns[k].release()
                handed.acquire()
                if isinstance(slots[k], BaseException):
                    raise slots[k]
                epoch.append(slots[k])
            if all(s is _END for s in epoch):
                return
            if any(s is _END for s in epoch):
                raise RuntimeError("the seeds of this trial ended at different epochs")
            _report([m for m, _ in epoch], [c for _, c in epoch], prepare)
    finally:
        if restored is not None:
            shutil.rmtree(restored, ignore_errors=True)


def _restored(checkpoint: Any, n: int) -> tuple[str | None, list[str | None]]:
    """A local copy of the trial's checkpoint (restored, or copied by PBT) and each seed's directory in it."""
    if checkpoint is None:
        return None, [None] * n
    local = tempfile.mkdtemp(prefix="rayexperts-seeds-")
    with checkpoint.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    return local, [f"{local}/{SEED_DIR.format(k)}" for k in range(n)]


def _report(metrics: list[dict[str, Any]], checkpoints: list[str | None],
            prepare: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    import ray.tune

    result = prepare(mean_metrics(metrics))
    combined = None
    try:
        if result is not None and all(c is not None for c in checkpoints):
            combined = tempfile.mkdtemp(prefix="rayexperts-ckpt-seeds-")
            for k, c in enumerate(checkpoints):
                shutil.move(c, f"{combined}/{SEED_DIR.format(k)}")
            ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(combined))
        elif result is not None:
            ray.tune.report(result)
    finally:
        for c in [*checkpoints, combined]:
            if c is not None:
                shutil.rmtree(c, ignore_errors=True)


# ------------------------------------------------------------------------------- the table


def aggregate_trials(seeds: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """One ``kind=config`` row per trial from its ``kind=seed`` rows: each metric column the mean over the seeds
    that reported it, ``<column>_sd`` the sample standard deviation (n - 1; NaN for one seed), ``n_seeds`` how many
    seeds reported the tuned ``metric``; ``epochs_done`` the fewest epochs of a seed; the status the trial's."""
    fixed = {"trial_id", "status", "run", "kind", "seed", "error", "n_seeds", *keys}
    numeric = [c for c in seeds.columns if c not in fixed and pd.api.types.is_numeric_dtype(seeds[c])
               and not pd.api.types.is_bool_dtype(seeds[c])]
    rows = []
    for trial_id, group in seeds.groupby("trial_id", sort=True):
        first = group.iloc[0]
        row: dict[str, Any] = {"trial_id": trial_id, "kind": "config", "status": first["status"],
                               "run": str(first["run"]).split("/", 1)[0], **{k: first[k] for k in keys}}
        if "error" in group:
            row["error"] = first["error"]
        row["n_seeds"] = int(group[metric].notna().sum()) if metric in group else 0
        for col in numeric:
            values = group[col].dropna().astype(float)
            if col == "epochs_done":
                row[col] = int(values.min()) if len(values) else 0
            elif col not in DROPPED:
                row[col] = values.mean() if len(values) else np.nan
                if col not in NO_SPREAD:
                    row[f"{col}_sd"] = values.std(ddof=1) if len(values) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
