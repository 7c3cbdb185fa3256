"""Search space (``tune_spaces/*.yaml``) → Ray Tune sweep whose trials are training runs (``jobs/sweep.py``).

Each trial is a Tune function trainable whose run directory is its Tune trial directory
``<sweep>/tune_<trial_id>/``. A one-worker trial (``scaling.num_workers=1``) asks Tune for the
worker's resources and trains in its own process (Ray Tune's pattern for trials that need no
distributed training: no Train run to start). A multi-worker trial reserves nothing itself and
calls :func:`~rayexperts.launch.train.run_training`, whose ``TorchTrainer`` asks for its own workers
(Ray Train V2 inside Tune). ``tune.max_concurrent`` (0: as many trials as the cluster's CPUs/GPUs
hold) caps how many trials run at once. The tuned metric is a validation metric only; the best
trial's test accuracy is reported beside it. A method with runs that must finish first (CBD's
teachers) has them trained once, before the trials.

An all-discrete space (``choice``/``grid`` keys only, at least one ``choice``) never repeats a trial:
:func:`plan_trials` grids it when ``tune.num_samples`` covers it, else draws that many distinct points
(seeded by ``seed``), and says so in one line. The console is quiet unless ``run.verbose=true`` is given
(command line or config file): trials print no per-epoch lines, Tune's reporter and Ray's checkpoint lines
are silenced (:func:`tune_console`), and one line per finished or failed trial shows the searched keys,
epochs, the tuned metric and test top-1 in %. The end prints the trials (top-1 in %), failed trials'
errors and directories, and ties for the best trial; the files keep fractions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

from rayexperts.analysis import best_trial, cell
from rayexperts.config import (ConfigError, file_layers, from_dict, load_config, parse_overrides, provenance, settings,
                               to_dict, to_yaml, valid_keys, with_overrides)
from rayexperts.data import DataError, build_dataset
from rayexperts.launch.cluster import ClusterUnreachable, dashboard_wanted, ensure_ray, ship_plugins
from rayexperts.launch.ensemble import PrerequisiteFailed, raise_failed, train_in_parallel
from rayexperts.launch.trainer import uses_ray_train, worker_threads
from rayexperts.launch.train import announce, default_run_name, root_error, run_training
from rayexperts.methods import METHODS
from rayexperts.registry import did_you_mean
from rayexperts.rundir import CheckpointMismatch, RunDir, StorageError
from rayexperts.trace import mark

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "randint")
TIME_ATTR = "epochs_done"

# A multi-worker trial only drives its Train run: no CPU, so the workers get every core. Tune needs a
# non-empty request, so it asks for a sliver of the head node's marker resource, which also keeps the
# drivers on the head node, the "safe node" Ray's Train + Tune guide recommends (at most 100 at a time).
DRIVER_RESOURCES = {"cpu": 0, "node:__internal_head__": 0.01}

Space = dict[str, dict[str, list]]  # dotted key -> {distribution: arguments}


# ------------------------------------------------------------------------------- spaces


def load_space(path: str | Path, cfg: DictConfig) -> Space:
    """Read and check a search space: every key valid, every distribution well formed, and every
    value it can produce accepted by ``cfg``; errors name the file and the key."""
    if not Path(path).is_file():
        raise ConfigError(f"search space file '{path}' does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read search space '{path}': {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search space '{path}' must be a non-empty mapping of dotted config keys to distributions")
    keys = valid_keys(cfg)
    method = METHODS.get(cfg.method)
    space: Space = {}
    for key, spec in raw.items():
        where = f"search space '{path}', key '{key}'"
        if key not in keys:
            raise ConfigError(f"{where}: unknown config key for method={cfg.method}{did_you_mean(key, keys)}")
        space[key] = _check_distribution(spec, where)
        method.check_search_space(key, space[key], cfg, where)
        for value in method.probe_values(key, _probe_values(space[key]), cfg):
            try:
                with_overrides(cfg, {key: value}, f"value {value!r}")
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from e
    return space


def _check_distribution(spec: Any, where: str) -> dict[str, list]:
    form = f"write it as {{DIST: ARGS}} with DIST one of {', '.join(DISTRIBUTIONS)}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: {spec!r} is not a distribution; {form}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{kind}'; {form}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: '{kind}' needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if len(args) != 2 or not numeric or not args[0] < args[1]:
            raise ConfigError(f"{where}: '{kind}' needs [low, high] numbers with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: 'loguniform' needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: 'randint' needs integers [low, high) , got {args!r}")
    return {kind: args}


def _probe_values(dist: dict[str, list]) -> list[Any]:
    (kind, args), = dist.items()
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def to_param_space(space: Space) -> dict[str, Any]:
    """Tune's ``param_space``: the same dotted keys, each a Tune domain."""
    from ray import tune

    makers = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: makers[kind](args) for key, dist in space.items() for kind, args in dist.items()}


POINT_KEY = "_point"  # an all-discrete sweep's index into its points: in Tune's trial config, never a config key


@dataclass
class TrialPlan:
    """What Tune is asked to run: its ``param_space`` and ``num_samples``, the fixed points of an all-discrete
    space (None: Tune samples the space), and one line saying what was done (empty: nothing to say)."""

    param_space: dict[str, Any]
    num_samples: int
    points: list[dict[str, Any]] | None
    note: str


def plan_trials(space: Space, num_samples: int, seed: int) -> TrialPlan:
    """The trials of a sweep. A space with a continuous key (``uniform``, ``loguniform``, ``randint``) is
    sampled by Tune, ``num_samples`` times (each ``grid`` point that often). So is a ``grid``-only space: each
    point is repeated ``num_samples`` times (repeats measure the noise). An all-discrete space with ``choice``
    keys gives no duplicate trial: with at least as many samples as its choice points, every point once (a grid);
    with fewer, ``num_samples`` distinct choice points drawn with ``seed``; for each ``grid`` point."""
    kinds = {key: next(iter(dist)) for key, dist in space.items()}
    if any(kind not in ("choice", "grid") for kind in kinds.values()):
        return TrialPlan(to_param_space(space), num_samples, None, "")
    values = {key: _distinct(next(iter(dist.values()))) for key, dist in space.items()}
    grid_keys = [k for k in space if kinds[k] == "grid"]
    choice_keys = [k for k in space if kinds[k] == "choice"]
    grid_points = _product(grid_keys, values)
    if not choice_keys:
        g = len(grid_points)
        note = (f"grid-only space of {g} point{'s' * (g != 1)}: each repeated tune.num_samples={num_samples} times "
                f"({g * num_samples} trials)" if num_samples > 1 else f"grid-only space: a grid of {g} trials")
        return TrialPlan(to_param_space(space), num_samples, None, note)
    m = math.prod(len(values[k]) for k in choice_keys)
    g, total = len(grid_points), len(grid_points) * m
    rng = random.Random(seed)
    points = []
    for grid_point in grid_points:
        picked = range(m) if num_samples >= m else sorted(rng.sample(range(m), num_samples))
        for index in picked:
            chosen = {**grid_point, **_point_at(index, choice_keys, values)}
            points.append({k: chosen[k] for k in space})
    head = f"all-discrete space of {total} points:"
    per_grid = f" for each of the {g} grid points" if g > 1 else ""
    if num_samples > m:
        holds = "the space holds" if g == 1 else f"its choice keys hold ({m} points)"
        note = f"{head} a grid of {len(points)} trials, tune.num_samples={num_samples} is more than {holds}"
    elif num_samples == m:
        note = f"{head} a grid of {len(points)} trials (tune.num_samples={num_samples})"
    else:
        note = f"{head} {num_samples} distinct point{'s' * (num_samples != 1)} drawn{per_grid} (seed {seed})"
        note += f": {len(points)} trials" if g > 1 else ""
    return TrialPlan(_points_space(points, list(space)), 1, points, note)


def _distinct(values: list) -> list:
    """``values`` without repeats, in order (lists compare by value)."""
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _product(keys: list[str], values: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]


def _point_at(index: int, keys: list[str], values: dict[str, list]) -> dict[str, Any]:
    """The ``index``-th point of the product of ``keys``' values (the first key varies slowest)."""
    point = {}
    for key in reversed(keys):
        index, i = divmod(index, len(values[key]))
        point[key] = values[key][i]
    return {k: point[k] for k in keys}


def _points_space(points: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Tune's ``param_space`` for fixed ``points``: a grid over their indices (``POINT_KEY``), each key
    resolved from its trial's point. Tune's own ``BasicVariantGenerator`` runs it, as any other sweep."""
    from ray import tune

    space = {POINT_KEY: tune.grid_search(list(range(len(points))))}
    space.update({key: tune.sample_from(functools.partial(_value_at_point, points, key)) for key in keys})
    return space


def _value_at_point(points: list[dict[str, Any]], key: str, config: dict[str, Any]) -> Any:
    return copy.deepcopy(points[config[POINT_KEY]][key])


# ------------------------------------------------------------------------------- config


def sweep_config(cfg: DictConfig) -> DictConfig:
    """Check the sweep's settings (before Ray starts) and turn on a validation split:
    ``data.val_per_class`` := ``tune.val_per_class`` when it is 0. Checking a checked config changes nothing."""
    if not cfg.data.val_per_class:
        cfg = with_overrides(cfg, {"data.val_per_class": cfg.tune.val_per_class}, "sweep: a validation split")
    if int(cfg.tune.num_samples) < 1:
        raise ConfigError(f"tune.num_samples={cfg.tune.num_samples}: a sweep needs at least 1 trial")
    if not str(cfg.tune.metric).startswith("val_"):
        raise ConfigError(
            f"tune.metric={cfg.tune.metric!r} is not a validation metric: sweeps never tune on the test split; "
            "use val_top1, val_top1_few, ... (test accuracy of the best trial is reported beside it)"
        )
    if build_dataset(cfg.data).val is None:
        raise ConfigError(
            f"data set {cfg.data.name!r} gives no validation split (data.val_per_class={cfg.data.val_per_class}): "
            "a sweep needs one (data.val_split for split files, val rows or a val/ folder for parquet/imagefolder)"
        )
    if not cfg.run.name:
        cfg.run.name = "sweep-" + default_run_name(cfg)
    return cfg


def _cpu_share(cfg: DictConfig) -> float:
    """CPUs per worker when ``scaling.cpus_per_worker`` is 0: the cluster split over
    ``tune.max_concurrent`` trials, or 1 when that is 0 too."""
    import ray

    if cfg.tune.max_concurrent <= 0:
        return 1.0
    total = ray.cluster_resources().get("CPU", 1)
    return float(max(1, math.floor(total / (cfg.tune.max_concurrent * cfg.scaling.num_workers))))


def max_concurrent(cfg: DictConfig) -> int:
    """``tune.max_concurrent``, or when 0 the number of trials the cluster's CPUs and GPUs hold
    (trials reserve nothing, so Tune alone would start every trial at once)."""
    import ray

    if cfg.tune.max_concurrent > 0:
        return int(cfg.tune.max_concurrent)
    res = ray.cluster_resources()
    n = cfg.scaling.num_workers
    fits = [res.get("CPU", 1) / (n * cfg.scaling.cpus_per_worker)]
    if cfg.scaling.use_gpu and cfg.scaling.gpus_per_worker > 0:
        fits.append(res.get("GPU", 0) / (n * cfg.scaling.gpus_per_worker))
    return max(1, math.floor(min(fits) + 1e-9))


def after_prerequisites(cfg: DictConfig) -> DictConfig:
    """A method with runs that must finish first (CBD's teachers) sweeps its own stage against them:
    they are trained once, in parallel (finished ones skipped), under the sweep directory."""
    method = METHODS.get(cfg.method)
    first = method.prerequisites(cfg)
    if not first:
        return cfg
    outcomes = train_in_parallel(first, str(cfg.method), ray_train_later=uses_ray_train(cfg))
    raise_failed([o for o in outcomes if o.status == "failed"], "The sweep did not start")
    main = method.after_prerequisites(cfg, [o.path for o in outcomes])
    return with_overrides(main, {"run.storage_path": cfg.run.storage_path, "run.name": cfg.run.name}, "sweep")


# ------------------------------------------------------------------------------- trials


def trial_result(reported: dict[str, Any], metric: str, view: str) -> dict[str, Any] | None:
    """A worker's report as Tune's result: ``tune.view``'s metrics at the top level and ``epochs_done``
    (ASHA's time); None for an epoch without the tuned metric (it was not evaluated)."""
    result = view_metrics(reported, view)
    if metric not in result:
        return None
    return {**result, TIME_ATTR: int(result["epoch"]) + 1}


def _report_callback(cfg: DictConfig):
    """Tune's ``TuneReportCallback`` for a Train run inside a trial, reporting :func:`trial_result`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReport(TuneReportCallback):
        def __init__(self, metric: str, view: str) -> None:
            super().__init__()
            self.metric, self.view = metric, view

        def after_report(self, run_context, metrics, checkpoint):
            result = trial_result(dict(metrics[0]), self.metric, self.view)
            if result is not None:
                super().after_report(run_context, [result, *metrics[1:]], checkpoint)

    return TrialReport(str(cfg.tune.metric), str(cfg.tune.view))


def view_metrics(reported: dict[str, Any], view: str) -> dict[str, Any]:
    """A worker's report with ``view``'s metrics (reported as ``<view>/<metric>``) at the top level;
    unchanged when ``view`` is empty or the primary view. An epoch without evaluation passes through."""
    if not view or view == reported.get("view") or "view" not in reported:
        return reported
    prefix = f"{view}/"
    chosen = {k[len(prefix):]: v for k, v in reported.items() if k.startswith(prefix)}
    if not chosen:
        views = sorted({k.split("/")[0] for k in reported if "/" in k})
        raise ValueError(f"tune.view={view!r} is not a view of this run; views: {', '.join(views)}")
    return {**reported, **chosen, "view": view}


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep: str, plugins: dict[str, Any]) -> None:
    """One Tune trial: the base config with the sampled ``params``, its run directory Tune's trial
    directory; trained in this process (one worker) or through a Ray Train run (several)."""
    import ray.tune

    from rayexperts import registry

    mark("trial start")
    registry.add_plugins(plugins)
    cfg = from_dict(base)
    method = METHODS.get(cfg.method)
    params = {k: method.search_value(k, v, cfg) for k, v in params.items() if k != POINT_KEY}
    trial = _trial_dirname(ray.tune.get_context().get_trial_id())
    if not cfg.run.verbose:  # Ray Train's INFO lines ("Checkpoint successfully created at: ...", every epoch)
        logging.getLogger("ray.train").setLevel(str(cfg.run.ray_log_level))
    cfg = with_overrides(cfg, {**params, "run.storage_path": sweep, "run.name": trial}, "sweep trial")
    if uses_ray_train(cfg):
        run_training(cfg, callbacks=[_report_callback(cfg)])
        return
    rundir = RunDir.of(sweep, trial)
    if rundir.holds_run_of(cfg):
        print(f"[rayexperts] {rundir} exists: resuming from Tune's latest checkpoint if there is one", flush=True)
    rundir.write_config(cfg)
    from rayexperts.engine.worker import tune_trial  # the trial's process, not the sweep's driver

    metric, view = str(cfg.tune.metric), str(cfg.tune.view)
    tune_trial({"config": to_dict(cfg), "threads": worker_threads(cfg.scaling.cpus_per_worker), "plugins": plugins},
               lambda reported: trial_result(reported, metric, view))


def _trial_dirname(trial) -> str:
    return f"tune_{getattr(trial, 'trial_id', trial)}"


def trial_resources(cfg: DictConfig) -> dict[str, float]:
    """What a trial asks Tune for: a one-worker trial its worker's CPUs/GPUs, a multi-worker trial nothing
    (its Train run asks for the workers)."""
    if uses_ray_train(cfg):
        return DRIVER_RESOURCES
    gpus = float(cfg.scaling.gpus_per_worker) if cfg.scaling.use_gpu else 0.0
    return {"cpu": float(cfg.scaling.cpus_per_worker), **({"gpu": gpus} if gpus else {})}


# ------------------------------------------------------------------------------- sweep


def build_tuner(cfg: DictConfig, space: Space):
    """The ``Tuner`` for a checked sweep config, restored when its directory holds one. A new sweep says in
    one line how it covers an all-discrete space (:func:`plan_trials`)."""
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = RunDir.of(cfg.run.storage_path, cfg.run.name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), sweep=sweep.uri, plugins=ship_plugins()), trial_resources(cfg)
    )
    if tune.Tuner.can_restore(sweep.uri):
        return tune.Tuner.restore(sweep.uri, trainable, resume_unfinished=True, resume_errored=True)
    if cfg.tune.scheduler == "asha":
        scheduler = AsyncHyperBandScheduler(
            time_attr=TIME_ATTR,
            max_t=int(cfg.train.epochs) + 1,  # ASHA kills a trial at max_t: let full runs end on their own
            grace_period=int(cfg.tune.grace_period),
            reduction_factor=int(cfg.tune.reduction_factor),
        )
    else:
        scheduler = FIFOScheduler()
    plan = plan_trials(space, int(cfg.tune.num_samples), int(cfg.seed))
    if plan.note:
        print(f"[rayexperts] {plan.note}", flush=True)
    return tune.Tuner(
        trainable,
        param_space=plan.param_space,
        tune_config=tune.TuneConfig(
            metric=str(cfg.tune.metric),
            mode=str(cfg.tune.mode),
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=int(cfg.seed), max_concurrent=max_concurrent(cfg)),
            num_samples=plan.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=str(cfg.run.name),
            storage_path=RunDir(cfg.run.storage_path).uri,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=int(cfg.run.num_to_keep)),
            # Quiet: Tune's own reporter prints nothing (its tables hold every metric of every view);
            # SweepProgress prints one line per finished trial instead.
            verbose=1 if cfg.run.verbose else 0,
            callbacks=[] if cfg.run.verbose else [_progress_callback(cfg, space)],
        ),
    )


# ------------------------------------------------------------------------------- console


# Tune's log records a quiet sweep drops: the traceback of each failed trial (SweepProgress prints its one-line
# error and trial directory; the traceback stays in error.txt there) and the list of trials that did not complete.
_QUIET_DROPPED = {
    "ray.tune.execution.tune_controller": ("Trial task failed for trial",),
    "ray.tune.tune": ("Trials did not complete",),
}


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def tune_console(verbose: bool) -> Iterator[None]:
    """The driver's console while Tune runs. Verbose: Tune's own. Quiet (the sweep's default):
    ``RAY_AIR_NEW_OUTPUT=0`` with ``verbose=0`` makes Tune's reporter silent (the new one at ``verbose=0``
    still prints every metric of a failed trial); ``TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0``
    turns off the "snapshotting has been triggered multiple times" warning that our own
    ``CheckpointConfig(num_to_keep)`` with a checkpoint every epoch triggers (Tune's message: "Set it to 0 to
    completely suppress this warning"); ``ray.tune.tune`` at WARNING drops its "Wrote the latest version of all
    result files" line. Everything is put back afterwards."""
    if verbose:
        yield
        return
    env = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    tune_logger = logging.getLogger("ray.tune.tune")
    saved_level = tune_logger.level
    filters = [(logging.getLogger(name), _DropRecords(prefixes)) for name, prefixes in _QUIET_DROPPED.items()]
    os.environ.update(env)
    tune_logger.setLevel(logging.WARNING)
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
        tune_logger.setLevel(saved_level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_top1(metric: str) -> bool:
    """An accuracy (shown in %): ``top1``, ``val_top1_few``, ..."""
    return "top1" in metric or "top5" in metric


def shown_value(metric: str, value: Any) -> str:
    """A metric for people: accuracies in % (files keep fractions), others as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if is_top1(metric):
        return f"{100 * float(value):.2f} %"
    return f"{float(value):.4f}" if isinstance(value, float) else str(value)


def trial_line(trial_id: str, config: dict[str, Any], result: dict[str, Any], keys: Sequence[str], metric: str,
               epochs: int) -> str:
    """One finished trial for the console: its searched values, epochs (1-based), tuned metric and test top-1."""
    done = int(result.get(TIME_ATTR, 0) or 0)
    how = "completed" if done >= epochs else "stopped early"
    params = " ".join(f"{k}={cell(config.get(k))}" for k in keys)
    return (f"[sweep] trial {trial_id} {how} after epoch {done}/{epochs}: "
            f"{metric} {shown_value(metric, result.get(metric))}, test top1 {shown_value('top1', result.get('top1'))}"
            f" | {params}")


def error_line(error: BaseException) -> str:
    """A failed trial's error in one line: the innermost exception's type and last message line."""
    root = root_error(error)
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    name = type(root).__name__
    return line if line.startswith(f"{name}:") or not line else f"{name}: {line}"


def failure_line(trial_id: str, error: str, path: str) -> str:
    return f"trial {trial_id} failed: {error}; trial directory {path} (error.txt there holds the traceback)"


def _trial_error(trial) -> str:
    """The one-line error of a failed Tune trial, from the error Tune pickled in its directory."""
    try:
        import ray.cloudpickle as pickle

        with open(trial.pickled_error_file, "rb") as f:
            return error_line(pickle.load(f))
    except Exception:  # noqa: BLE001 - no pickle (an unpicklable error): the text file's last line
        try:
            lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
            return lines[-1]
        except Exception:  # noqa: BLE001
            return "(no error message recorded)"


def _progress_callback(cfg: DictConfig, space: Space):
    """A quiet sweep's console (a Tune ``Callback``): a line per finished or failed trial, and every
    ``HEARTBEAT_S`` seconds how many trials are done and the best so far."""
    from ray.tune import Callback

    keys, metric, mode, epochs = list(space), str(cfg.tune.metric), str(cfg.tune.mode), int(cfg.train.epochs)
    sweep_uri = RunDir.of(cfg.run.storage_path, cfg.run.name).uri

    class SweepProgress(Callback):
        HEARTBEAT_S = 60.0

        def __init__(self) -> None:
            self.start = self.last = time.monotonic()

        def setup(self, **info) -> None:
            self.start = self.last = time.monotonic()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            print(trial_line(trial.trial_id, trial.config, trial.last_result or {}, keys, metric, epochs), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            path = RunDir(sweep_uri).child(_trial_dirname(trial)).uri
            print(f"[sweep] {failure_line(trial.trial_id, _trial_error(trial), path)}", flush=True)

        def on_step(self, iteration, trials, **info) -> None:
            now = time.monotonic()
            if now - self.last < self.HEARTBEAT_S:
                return
            self.last = now
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
            scored = [t for t in trials if (t.last_result or {}).get(metric) is not None]
            best = ""
            if scored:
                top = (max if mode == "max" else min)(scored, key=lambda t: t.last_result[metric])
                best = f"; best {metric} so far {shown_value(metric, top.last_result[metric])} (trial {top.trial_id})"
            print(f"[sweep] {int(now - self.start)} s: {done}/{len(trials)} trials done, {running} running{best}",
                  flush=True)

    return SweepProgress()


def check_same_sweep(sweep: RunDir, cfg: DictConfig, space: Space) -> None:
    """Write ``sweep.yaml`` (config + space); refuse to continue a sweep of another one (``run.verbose``,
    only what the console shows, may differ)."""
    spec = {"config": settings(cfg), "space": space}
    if sweep.is_file("sweep.yaml"):
        old = OmegaConf.to_container(OmegaConf.create(sweep.read_text("sweep.yaml")))
        for written in ("layers", "sources"):
            old["config"].pop(written, None)  # type: ignore[index, union-attr]
        if _without_verbose(old) != _without_verbose(spec):
            raise ConfigError(
                f"{sweep} holds a sweep of another config or search space; choose another run.name "
                "or remove that directory"
            )
        print(f"[rayexperts] continuing the sweep in {sweep}", flush=True)
    sweep.write_text("sweep.yaml", OmegaConf.to_yaml(OmegaConf.create({**spec, "config": to_dict(cfg)})))


def _without_verbose(spec: Any) -> Any:
    spec = copy.deepcopy(spec)
    (spec.get("config") or {}).get("run", {}).pop("verbose", None)
    return spec


def trials_table(results, space: Space, cfg: DictConfig) -> pd.DataFrame:
    """One row per trial: trial_id, status, run, each searched key, and the last evaluation of the tuned
    view read from the trial's run directory (current even for trials a continued sweep resumed)."""
    view = str(cfg.tune.view) or METHODS.get(str(cfg.method)).primary_view
    sweep = RunDir.of(cfg.run.storage_path, cfg.run.name)
    rows = []
    for r in results:
        run = Path(r.path).name
        last = _last_row(sweep.child(run).read_table("metrics.parquet"), view)
        done = int(last["epoch"]) + 1 if last else 0
        status = "error" if r.error else ("completed" if done >= cfg.train.epochs else "stopped")
        row = {"trial_id": run.removeprefix("tune_"), "status": status, "run": run, TIME_ATTR: done}
        row.update({k: cell(r.config.get(k)) for k in space})
        row.update(last)
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def _last_row(metrics: pd.DataFrame | None, view: str) -> dict[str, Any]:
    if metrics is None or not (metrics["view"] == view).any():
        return {}
    rows = metrics[metrics["view"] == view]
    return rows.loc[rows["epoch"].idxmax()].drop("view").to_dict()


def best_config(best: pd.Series, cfg: DictConfig) -> str:
    """``best.yaml``: the best trial's full config, runnable with ``jobs/train.py --config``."""
    trial = RunDir.of(cfg.run.storage_path, cfg.run.name).child(str(best["run"])).config()
    trial = with_overrides(trial, {"run.storage_path": cfg.run.storage_path, "run.name": f"{cfg.run.name}-best"},
                           f"best trial of sweep {cfg.run.name}")
    metric = cfg.tune.metric
    head = (
        f"# best trial {best['trial_id']} of sweep {cfg.run.name}: {metric} = {best[metric]:.4f} (validation)\n"
        f"# test top1 = {best.get('top1', math.nan):.4f} (reported, never tuned on)\n"
    )
    return head + to_yaml(trial)


def run_sweep(cfg: DictConfig, space: Space) -> dict[str, Any]:
    """Run (or continue) the sweep; writes trials.parquet and best.yaml into the sweep directory."""
    cfg = sweep_config(cfg)
    RunDir(cfg.run.storage_path).check_writable()
    # Ray starts before the prerequisites train: the dashboard decision counts them (multi-worker teachers).
    runs = (cfg, *METHODS.get(cfg.method).prerequisites(cfg))
    ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train=uses_ray_train(*runs)))
    if cfg.scaling.cpus_per_worker <= 0:
        cfg = with_overrides(cfg, {"scaling.cpus_per_worker": _cpu_share(cfg)}, "sweep: CPU share per trial")
    sweep = RunDir.of(cfg.run.storage_path, cfg.run.name)
    check_same_sweep(sweep, cfg, space)
    cfg = after_prerequisites(cfg)
    tuner = build_tuner(cfg, space)
    with tune_console(bool(cfg.run.verbose)):
        results = tuner.fit()
    trials = trials_table(results, space, cfg)
    sweep.write_table("trials.parquet", trials)
    best = best_trial(trials, str(cfg.tune.metric), str(cfg.tune.mode))
    if best is not None:
        sweep.write_text("best.yaml", best_config(best, cfg))
    failures = [{"trial_id": Path(r.path).name.removeprefix("tune_"), "error": error_line(r.error),
                 "path": sweep.child(Path(r.path).name).uri} for r in results if r.error]
    return {"path": sweep.uri, "trials": trials, "best": best, "config": cfg,
            "ties": best_ties(trials, best, str(cfg.tune.metric)),
            "failures": sorted(failures, key=lambda f: f["trial_id"])}


def best_ties(trials: pd.DataFrame, best: pd.Series | None, metric: str) -> list[str]:
    """The trial ids with the best trial's ``metric`` among the trials :func:`best_trial` chose from (the
    completed ones when it chose a completed one), the best first; just the best when nothing ties."""
    if best is None:
        return []
    pool = trials[(trials["status"] != "error") & trials[metric].notna()]
    if best["status"] == "completed":
        pool = pool[pool["status"] == "completed"]
    tied = pool[np.isclose(pool[metric].astype(float), float(best[metric]), rtol=1e-9, atol=1e-12)]
    others = [str(t) for t in tied["trial_id"] if str(t) != str(best["trial_id"])]
    return [str(best["trial_id"]), *others]


def trials_for_people(trials: pd.DataFrame, space: Space, metric: str) -> pd.DataFrame:
    """The trials table as printed: searched keys, epochs done, the tuned metric and test top-1 (accuracies
    in %, their headers say so); trials.parquet keeps fractions."""
    shown = ["trial_id", "status", *space, TIME_ATTR, metric, "top1"]
    table = trials[[c for c in shown if c in trials]].copy()
    for col, label in ((metric, metric), ("top1", "test top1")):
        if col in table and is_top1(col):
            table[col] = [shown_value("", v) if pd.isna(v) else f"{100 * float(v):.2f}" for v in table[col]]
            table = table.rename(columns={col: f"{label} (%)"})
    return table


def sweep_summary(out: dict[str, Any], space: Space) -> tuple[list[str], int]:
    """What :func:`main` prints after a sweep (one string per line) and its exit status: the trials table,
    each failed trial's error and directory, the best trial (ties named) or why there is none."""
    trials, best, metric = out["trials"], out["best"], str(out["config"].tune.metric)
    lines = ["", f"sweep directory: {out['path']}", trials_for_people(trials, space, metric).to_string(index=False)]
    failures = out.get("failures") or []
    if failures:
        lines.append("")
        lines += [failure_line(f["trial_id"], f["error"], f["path"]) for f in failures]
    if best is None:
        why = f"all {len(trials)} trials failed" if failures and len(failures) == len(trials) else \
            "no trial evaluated it"
        lines.append(f"no trial reported the tuned metric {metric}: {why}")
        return lines, 1
    ties = out.get("ties") or [str(best["trial_id"])]
    lines.append("")
    if len(ties) > 1:
        lines.append(f"{len(ties)} trials tie for the best {metric} ({shown_value(metric, best[metric])}): "
                     f"{', '.join(ties)}; the first is written to best.yaml")
    lines.append(f"best trial {best['trial_id']}: {metric} = {shown_value(metric, best[metric])} (validation); "
                 f"test top1 = {shown_value('top1', best.get('top1', math.nan))}")
    lines.append(f"its config: {out['path']}/best.yaml (python jobs/train.py --config {out['path']}/best.yaml)")
    return lines, 0


def verbose_chosen(config: str | None, overrides: Sequence[str]) -> bool:
    """Whether the user set ``run.verbose`` (on the command line or in the ``--config`` file or its bases)."""
    if "run.verbose" in parse_overrides(list(overrides)):
        return True
    return bool(config) and "run.verbose" in provenance(file_layers(str(config)))


def resolve_sweep_config(config: str | None, overrides: Sequence[str]) -> DictConfig:
    """The sweep's base config as ``jobs/sweep.py`` resolves it: the trials quiet unless ``run.verbose`` was set,
    a validation split, the checks of :func:`sweep_config`."""
    cfg = load_config(config, list(overrides))
    if not verbose_chosen(config, overrides):  # a sweep's trials are quiet unless asked
        cfg = with_overrides(cfg, {"run.verbose": False}, "sweep: quiet console (run.verbose=true shows all)")
    return sweep_config(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/sweep.py", description="A Ray Tune sweep whose trials are training runs.")
    parser.add_argument("--space", required=True, help="a search space YAML (tune_spaces/*.yaml)")
    parser.add_argument("--config", help="a shipped preset name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. tune.num_samples=16 tune.scheduler=fifo")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = resolve_sweep_config(args.config, args.overrides)
        space = load_space(args.space, cfg)
        announce(cfg, "sweep directory")
        out = run_sweep(cfg, space)
    except (ConfigError, DataError, CheckpointMismatch, StorageError, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PrerequisiteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lines, status = sweep_summary(out, space)
    print("\n".join(lines), flush=True)
    return status
