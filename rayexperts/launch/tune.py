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

The sweep's concerns live beside this module: the spaces in :mod:`.sweep_space`, the searchers and schedulers
(random, grid, Optuna; ASHA, FIFO, PBT) in :mod:`.sweep_search`, several seeds per configuration in
:mod:`.sweep_seeds`, the console in :mod:`.sweep_console`; their names stay importable from here.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rayexperts.analysis import best_trial, cell, tied_trials
from rayexperts.config import (ConfigError, file_layers, load_config, parse_overrides, provenance, settings,
                               to_dict, to_yaml, with_overrides)
from rayexperts.data import build_dataset
from rayexperts.launch.cluster import dashboard_wanted, ensure_ray, ship_plugins
from rayexperts.launch.stages import train_prerequisites
from rayexperts.launch.torch_trainer import uses_ray_train, worker_threads
from rayexperts.launch.train import announce, needs_ray, run_training, timestamped_run_name
from rayexperts.launch.sweep_console import (_DropRecords, _progress_callback, _trial_dirname,  # noqa: F401
                                            best_lines, error_line, failure_line, percent, shown_value,
                                            sweep_summary, trial_line, trials_for_people, tune_console)
from rayexperts.launch.sweep_search import TIME_ATTR, check_search, scheduler, searcher
from rayexperts.launch.sweep_seeds import SEED_DIR, aggregate_trials, seed_configs, train_seeds
from rayexperts.methods import METHODS
from rayexperts.launch.sweep_space import (DISTRIBUTIONS, POINT_KEY, Space, TrialPlan, load_space,  # noqa: F401
                                           plan_trials, to_param_space)
from rayexperts.rundir import RunDir
from rayexperts.trace import mark

# A multi-worker trial only drives its Train run: no CPU, so the workers get every core. Tune needs a
# non-empty request, so it asks for a sliver of the head node's marker resource, which also keeps the
# drivers on the head node, the "safe node" Ray's Train + Tune guide recommends (at most 100 at a time).
DRIVER_RESOURCES = {"cpu": 0, "node:__internal_head__": 0.01}


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
        cfg.run.name = timestamped_run_name(cfg, "sweep-")
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


def swept_stage(cfg: DictConfig) -> DictConfig:
    """What the trials sweep: ``cfg``, or for a method with runs that must finish first (CBD's teachers) its own
    stage against them; they are trained once, in parallel (finished ones skipped), under the sweep directory."""
    main, first = train_prerequisites(cfg, str(cfg.method), "The sweep did not start")
    if not first:
        return cfg
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


def run_trial(params: dict[str, Any], base: DictConfig, sweep: str, plugins: dict[str, Any]) -> None:
    """One Tune trial: the sweep driver's resolved config ``base`` (never recomposed here) with the sampled
    ``params``, its run directory Tune's trial directory; trained in this process (one worker) or through a
    Ray Train run (several). The driver's ``plugins`` are registered once, here."""
    import ray.tune

    from rayexperts import registry

    mark("trial start")
    registry.load_plugins(shipped=plugins)
    cfg = base
    method = METHODS.get(cfg.method)
    params = {k: method.search_value(k, v, cfg) for k, v in params.items() if k != POINT_KEY}
    trial = _trial_dirname(ray.tune.get_context().get_trial_id())
    if not cfg.run.verbose:  # Ray Train's INFO lines ("Checkpoint successfully created at: ...", every epoch)
        logging.getLogger("ray.train").setLevel(str(cfg.run.ray_log_level))
    cfg = with_overrides(cfg, {**params, "run.storage_path": sweep, "run.name": trial}, "sweep trial")
    if uses_ray_train(cfg):
        run_training(cfg, callbacks=[_report_callback(cfg)])
        return
    rundir = RunDir.for_config(cfg)
    if rundir.holds_run_of(cfg):
        print(f"[rayexperts] {rundir} exists: resuming from Tune's latest checkpoint if there is one", flush=True)
    rundir.write_config(cfg)
    metric, view = str(cfg.tune.metric), str(cfg.tune.view)
    if int(cfg.tune.seeds_per_config) > 1:  # one configuration, its seeds in seed_<k>/ (launch/sweep_seeds.py)
        train_seeds(seed_configs(cfg, rundir.uri), worker_threads(cfg.scaling.cpus_per_worker),
                    lambda reported: trial_result(reported, metric, view))
        return
    from rayexperts.engine.entry import tune_trial

    tune_trial(cfg, worker_threads(cfg.scaling.cpus_per_worker), lambda reported: trial_result(reported, metric, view))


def trial_resources(cfg: DictConfig) -> dict[str, float]:
    """What a trial asks Tune for: a one-worker trial its worker's CPUs/GPUs, a multi-worker trial nothing
    (its Train run asks for the workers)."""
    if uses_ray_train(cfg):
        return DRIVER_RESOURCES
    gpus = float(cfg.scaling.gpus_per_worker) if cfg.scaling.use_gpu else 0.0
    return {"cpu": float(cfg.scaling.cpus_per_worker), **({"gpu": gpus} if gpus else {})}


# ------------------------------------------------------------------------------- sweep


def build_tuner(cfg: DictConfig, space: Space):
    """The ``Tuner`` for a checked sweep config, restored when its directory holds one (every finished trial kept,
    the searcher's state too). A new sweep says in one line how it searches (:func:`~.sweep_search.searcher`)."""
    from ray import tune

    sweep = RunDir.for_config(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, sweep=sweep.uri, plugins=ship_plugins()), trial_resources(cfg)
    )
    if tune.Tuner.can_restore(sweep.uri):
        return tune.Tuner.restore(sweep.uri, trainable, resume_unfinished=True, resume_errored=True)
    plan, search_alg = searcher(cfg, space, max_concurrent(cfg))
    if plan.note:
        print(f"[rayexperts] {plan.note}", flush=True)
    return tune.Tuner(
        trainable,
        param_space=plan.param_space,
        tune_config=tune.TuneConfig(
            metric=str(cfg.tune.metric),
            mode=str(cfg.tune.mode),
            scheduler=scheduler(cfg, space),
            search_alg=search_alg,
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
    """One row per seed (``kind=seed``) and one per configuration (``kind=config``, the mean of its seeds:
    :func:`~.sweep_seeds.aggregate_trials`); with one seed per configuration the one row is the configuration's.
    A row holds trial_id, status, run, seed, each searched key (PBT: the trial's last values), a failed trial's
    error, and the last evaluation of the tuned view read from the run directory (current even for trials a
    continued sweep resumed)."""
    view = str(cfg.tune.view) or METHODS.get(str(cfg.method)).primary_view_for(cfg)
    sweep = RunDir.for_config(cfg)
    n = int(cfg.tune.seeds_per_config)
    rows = []
    for r in results:
        trial = Path(r.path).name
        runs = [f"{trial}/{SEED_DIR.format(k)}" for k in range(n)] if n > 1 else [trial]
        for k, run in enumerate(runs):
            last = _last_row(sweep.child(run).read_table("metrics.parquet"), view)
            done = int(last["epoch"]) + 1 if last else 0
            status = "error" if r.error else ("completed" if done >= cfg.train.epochs else "stopped")
            row = {"trial_id": trial.removeprefix("tune_"), "kind": "seed" if n > 1 else "config", "status": status,
                   "run": run, "seed": int(cfg.seed) + k, TIME_ATTR: done, "error": error_line(r.error) if r.error else ""}
            row.update({key: cell(r.config.get(key)) for key in space})
            row.update(last)
            rows.append(row)
    table = pd.DataFrame(rows).sort_values(["trial_id", "run"], ignore_index=True)
    metric = str(cfg.tune.metric)
    table["n_seeds"] = table[metric].notna().astype(int) if metric in table else 0
    if n > 1:
        configs = aggregate_trials(table, list(space), metric)
        table = pd.concat([configs, table], ignore_index=True).sort_values(["trial_id", "kind"], ignore_index=True)
    return table.astype({"seed": "Int64", TIME_ATTR: "int64", "n_seeds": "int64"})


def _last_row(metrics: pd.DataFrame | None, view: str) -> dict[str, Any]:
    if metrics is None or not (metrics["view"] == view).any():
        return {}
    rows = metrics[metrics["view"] == view]
    return rows.loc[rows["epoch"].idxmax()].drop("view").to_dict()


def best_config(best: pd.Series, cfg: DictConfig) -> str:
    """``best.yaml``: the best configuration's full config (its first seed; one seed: ``tune.seeds_per_config=1``),
    runnable with ``jobs/train.py --config``; its head gives the validation and test numbers in %."""
    trial = RunDir.for_config(cfg).child(str(best["run"])).config()
    trial = with_overrides(trial, {"run.storage_path": cfg.run.storage_path, "run.name": f"{cfg.run.name}-best",
                                   "tune.seeds_per_config": 1}, f"best trial of sweep {cfg.run.name}")
    head = "".join(f"# {line}\n" for line in best_lines(best, str(cfg.tune.metric), str(cfg.run.name)))
    return head + to_yaml(trial)


def run_sweep(cfg: DictConfig, space: Space) -> dict[str, Any]:
    """Run (or continue) the sweep; writes trials.parquet and best.yaml into the sweep directory."""
    cfg = sweep_config(cfg)
    check_search(cfg, space)
    RunDir(cfg.run.storage_path).check_writable()
    # Ray starts before the prerequisites train: the dashboard decision counts them (multi-worker teachers).
    runs = (cfg, *METHODS.get(cfg.method).prerequisites(cfg))
    ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train=uses_ray_train(*runs)))
    if cfg.scaling.cpus_per_worker <= 0:
        cfg = with_overrides(cfg, {"scaling.cpus_per_worker": _cpu_share(cfg)}, "sweep: CPU share per trial")
    sweep = RunDir.for_config(cfg)
    check_same_sweep(sweep, cfg, space)
    cfg = swept_stage(cfg)
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
    """The configurations that tie with ``best`` on ``metric``, the best first (:func:`~rayexperts.analysis.tied_trials`)."""
    return tied_trials(trials, best, metric)


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


def sweep_command(space_file: str, config: str | None, overrides: Sequence[str]) -> int:
    """``rayexperts sweep --space FILE [--config X] [key=value ...]`` once parsed (:mod:`rayexperts.cli`): check
    everything before Ray starts, run the sweep, print its summary; the exit status (1: no trial reported the
    tuned metric)."""
    cfg = resolve_sweep_config(config, overrides)
    needs_ray(cfg, "a sweep (Ray Tune)")
    space = load_space(space_file, cfg)
    check_search(cfg, space)
    announce(cfg, "sweep directory")
    out = run_sweep(cfg, space)
    lines, status = sweep_summary(out, space)
    print("\n".join(lines), flush=True)
    return status
