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
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

from rayexperts.analysis import best_trial, cell
from rayexperts.config import ConfigError, from_dict, load_config, settings, to_dict, to_yaml, valid_keys, with_overrides
from rayexperts.data import DataError, build_dataset
from rayexperts.launch.cluster import ClusterUnreachable, dashboard_wanted, ensure_ray, ship_plugins
from rayexperts.launch.ensemble import PrerequisiteFailed, raise_failed, train_in_parallel
from rayexperts.launch.actor import uses_ray_train, worker_threads
from rayexperts.launch.train import announce, default_run_name, run_training
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


# ------------------------------------------------------------------------------- config


def sweep_config(cfg: DictConfig) -> DictConfig:
    """Check the sweep's settings (before Ray starts) and turn on a validation split:
    ``data.val_per_class`` := ``tune.val_per_class`` when it is 0. Checking a checked config changes nothing."""
    if not cfg.data.val_per_class:
        cfg = with_overrides(cfg, {"data.val_per_class": cfg.tune.val_per_class}, "sweep: a validation split")
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
    params = {k: method.search_value(k, v, cfg) for k, v in params.items()}
    trial = _trial_dirname(ray.tune.get_context().get_trial_id())
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
    """The ``Tuner`` for a checked sweep config, restored when its directory holds one."""
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
    return tune.Tuner(
        trainable,
        param_space=to_param_space(space),
        tune_config=tune.TuneConfig(
            metric=str(cfg.tune.metric),
            mode=str(cfg.tune.mode),
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=int(cfg.seed), max_concurrent=max_concurrent(cfg)),
            num_samples=int(cfg.tune.num_samples),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=str(cfg.run.name),
            storage_path=RunDir(cfg.run.storage_path).uri,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=int(cfg.run.num_to_keep)),
            verbose=1 if cfg.run.verbose else 0,
        ),
    )


def check_same_sweep(sweep: RunDir, cfg: DictConfig, space: Space) -> None:
    """Write ``sweep.yaml`` (config + space); refuse to continue a sweep of another one."""
    spec = {"config": settings(cfg), "space": space}
    if sweep.is_file("sweep.yaml"):
        old = OmegaConf.to_container(OmegaConf.create(sweep.read_text("sweep.yaml")))
        for written in ("layers", "sources"):
            old["config"].pop(written, None)  # type: ignore[index, union-attr]
        if old != spec:
            raise ConfigError(
                f"{sweep} holds a sweep of another config or search space; choose another run.name "
                "or remove that directory"
            )
        print(f"[rayexperts] continuing the sweep in {sweep}", flush=True)
    sweep.write_text("sweep.yaml", OmegaConf.to_yaml(OmegaConf.create({**spec, "config": to_dict(cfg)})))


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
    results = build_tuner(cfg, space).fit()
    trials = trials_table(results, space, cfg)
    sweep.write_table("trials.parquet", trials)
    best = best_trial(trials, str(cfg.tune.metric), str(cfg.tune.mode))
    if best is not None:
        sweep.write_text("best.yaml", best_config(best, cfg))
    return {"path": sweep.uri, "trials": trials, "best": best, "config": cfg}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/sweep.py", description="A Ray Tune sweep whose trials are training runs.")
    parser.add_argument("--space", required=True, help="a search space YAML (tune_spaces/*.yaml)")
    parser.add_argument("--config", help="a shipped preset name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. tune.num_samples=16 tune.scheduler=fifo")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = sweep_config(load_config(args.config, args.overrides))
        space = load_space(args.space, cfg)
        announce(cfg, "sweep directory")
        out = run_sweep(cfg, space)
    except (ConfigError, DataError, CheckpointMismatch, StorageError, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PrerequisiteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    best, metric = out["best"], out["config"].tune.metric
    shown = ["trial_id", "status", *space, metric, "top1"]
    print(f"\nsweep directory: {out['path']}")
    print(out["trials"][[c for c in shown if c in out["trials"]]].to_string(index=False))
    if best is None:
        print("no trial reported the tuned metric", file=sys.stderr)
        return 1
    test = best.get("top1", math.nan)
    print(f"\nbest trial {best['trial_id']}: {metric} = {best[metric]:.4f} (validation); test top1 = {test:.4f}")
    print(f"its config: {out['path']}/best.yaml (python jobs/train.py --config {out['path']}/best.yaml)")
    return 0
