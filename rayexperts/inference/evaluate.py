"""``rayexperts eval RUN_DIR [key=value ...]``: a run's checkpoint evaluated on another data set, split or test
distribution, every view as the run's own evaluation computes it (``rayexperts.engine.loop.evaluate_splits``, test-time
views re-learnt on the split they are evaluated on), into ``RUN_DIR/eval/<name>.parquet`` with the
``metrics.parquet`` columns. The run's own files are not touched.

The model keeps what it was trained with: the training counts of the run (``classes.parquet``) for the PC views,
the priors and the shot groups, whatever data set the overrides name; a data set whose classes differ from the
model's is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rayexperts.errors import ConfigError
from rayexperts.inference.load import RunSpec, resolve
from rayexperts.rundir import RunDir

# Keys of the run that an evaluation may not change: they would build another model.
MODEL_KEYS = ("method", "model.")


def eval_name(overrides: dict[str, Any]) -> str:
    """A file name for an evaluation: ``test`` without overrides, else the overrides (``eval.test_distributions=
    [forward50]`` → ``eval.test_distributions=forward50``)."""
    if not overrides:
        return "test"
    text = "_".join(f"{k}={v if not isinstance(v, (list, tuple)) else '+'.join(map(str, v))}"
                    for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")[:120]


def eval_config(spec: RunSpec, overrides: dict[str, Any]):
    """The run's config with ``overrides`` (checked; the model's keys refused)."""
    from rayexperts.config import with_overrides

    for key in overrides:
        if key == "method" or key.startswith("model.") or key.split(".")[0] == str(spec.cfg.method):
            raise ConfigError(f"{key}: rayexperts eval keeps the run's model and method; it changes the data and the "
                              "evaluation only (data.*, eval.*, scaling.use_gpu)")
    cfg = with_overrides(spec.cfg, overrides, "rayexperts eval") if overrides else spec.cfg
    cfg.run.verbose = False
    return cfg


def check_classes(spec: RunSpec, class_names: Sequence[str], data_name: str) -> None:
    names = [str(c) for c in class_names]
    if names != list(spec.classes):
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise ConfigError(f"data set {data_name} has {len(names)} classes ({shown}) but the model of {spec.run} was "
                          f"trained on {len(spec.classes)} others ({', '.join(spec.classes[:5])}"
                          f"{' ...' if len(spec.classes) > 5 else ''})")


def evaluate_run(run_dir: str, overrides: dict[str, Any] | None = None, checkpoint: str = "last",
                 threads: int = 0) -> tuple[pd.DataFrame, str]:
    """Every view of ``run_dir``'s checkpoint on the (overridden) data: the metrics rows (``metrics.parquet``
    columns, with ``checkpoint`` and ``selection``) and the evaluation's name. Nothing is written."""
    import torch

    from rayexperts.data.imbalance import shot_group
    from rayexperts.engine.loop import evaluate_splits
    from rayexperts.engine.results import result_rows
    from rayexperts.engine.run import Run
    from rayexperts.rundir import identity, load_model_state

    overrides = dict(overrides or {})
    spec = resolve(run_dir, None, checkpoint)
    cfg = eval_config(spec, overrides)
    from rayexperts.data import build_dataset

    build_dataset(cfg.data)  # bad data keys fail here, in one line, before the model is built
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")
    run = Run(cfg, 0, 1, device)
    check_classes(spec, run.data.class_names, str(cfg.data.name))
    counts = torch.tensor(spec.train_counts, dtype=torch.float32)
    run.method.class_counts = counts  # the model's training prior, whatever data set it is evaluated on
    run.method.setup(device, run.opts.memory_format)
    run.groups = shot_group(np.asarray(spec.train_counts), cfg.data.many_threshold, cfg.data.few_threshold)
    from rayexperts.inference.load import _read_state

    state = _read_state(spec.checkpoint, identity(spec.cfg, len(spec.classes)))
    load_model_state(run.model, state["model"])
    epoch = int(state["epoch"]) - 1
    accs = evaluate_splits(run, last=True)
    rows, _ = result_rows(run, epoch, accs, {})
    df = pd.DataFrame(rows)
    df["epoch"] = df["epoch"].astype("int64")
    df["checkpoint"] = spec.checkpoint.uri.rsplit("/", 1)[-1]
    df["selection"] = spec.selection
    return df, eval_name(overrides)


def print_table(df: pd.DataFrame) -> None:
    """Many / Medium / Few / All and ECE (%) of every view, per held-out split (test, val_, <distribution>_)."""
    prefixes = [""] + sorted({c[: -len("top1")] for c in df.columns if c.endswith("_top1") and c != "top1"})
    for prefix in prefixes:
        cols = {f"{prefix}top1_many": "Many", f"{prefix}top1_medium": "Medium", f"{prefix}top1_few": "Few",
                f"{prefix}top1": "All", f"{prefix}ece": "ECE"}
        if f"{prefix}top1" not in df:
            continue
        table = (df.set_index("view")[list(cols)].rename(columns=cols) * 100).round(2)
        table.index = [f"{v} (transductive)" if t else v for v, t in zip(table.index, df["transductive"])]
        print(f"{prefix.rstrip('_') or 'test'} split: top-1 and ECE (%)")
        print(table.to_string())


def main(run_dir: str, overrides: Sequence[str], checkpoint: str = "last", name: str | None = None) -> int:
    from rayexperts.config import parse_overrides

    flat = parse_overrides(list(overrides))
    df, default = evaluate_run(run_dir, flat, checkpoint)
    name = name or default
    out = RunDir(str(run_dir)).child("eval")
    out.write_table(f"{name}.parquet", df)
    epoch = int(df["epoch"].iloc[0]) + 1
    print(f"{run_dir}: checkpoint {df['checkpoint'].iloc[0]} (epoch {epoch}, {df['selection'].iloc[0]})")
    print_table(df)
    print(f"written: {out.uri}/{name}.parquet")
    return 0
