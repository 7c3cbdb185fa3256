"""How a sweep searches (``tune.search``) and stops or perturbs its trials (``tune.scheduler``).

``random``: Ray Tune's ``BasicVariantGenerator`` (an all-discrete space never repeats a point, see
:func:`~rayexperts.launch.sweep_space.plan_trials`); ``grid``: every point of an all-discrete space once;
``optuna``: Optuna's TPE through Ray Tune's ``OptunaSearch``, seeded with ``seed`` and capped at the sweep's
``max_concurrent`` trials by a ``ConcurrencyLimiter``. ``asha`` stops poor trials early, ``fifo`` runs every
trial to the end, ``pbt`` (population-based training) copies the checkpoint of a trial in the top quantile into
one in the bottom quantile every ``tune.perturbation_interval`` epochs and perturbs the copy's values (each key of
the space: all continuous, kept inside the space's bounds). Every setting is checked by :func:`check_search`
before Ray starts (docs/configs.md "Sweeps").
"""

from __future__ import annotations

import functools
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rayexperts.config import ConfigError
from rayexperts.launch.sweep_space import Space, TrialPlan, plan_trials, to_param_space
from rayexperts.launch.torch_trainer import uses_ray_train

TIME_ATTR = "epochs_done"  # a trial's epochs so far: ASHA's and PBT's clock
CONTINUOUS = ("uniform", "loguniform")  # what PBT can perturb (randint values would stop being integers)
OPTUNA_MISSING = ("tune.search=optuna needs Optuna, which is not installed: "
                  "pip install 'rayexperts[optuna]' (or pip install 'optuna>=3.4')")


def _kinds(space: Space) -> dict[str, str]:
    return {key: next(iter(dist)) for key, dist in space.items()}


def check_search(cfg: DictConfig, space: Space) -> None:
    """Refuse, in one line naming the key, what the searcher, the scheduler or the seeds cannot run (before Ray)."""
    n = int(cfg.tune.seeds_per_config)
    if n < 1:
        raise ConfigError(f"tune.seeds_per_config={n}: each configuration needs at least 1 seed")
    if n > 1 and uses_ray_train(cfg):
        raise ConfigError(f"tune.seeds_per_config={n} with scaling.num_workers={cfg.scaling.num_workers}: the seeds of "
                          "a configuration train in one trial process; use one worker per trial (or seeds_per_config=1)")
    kinds = _kinds(space)
    search, sched = str(cfg.tune.search), str(cfg.tune.scheduler)
    if search == "grid":
        bad = [k for k, kind in kinds.items() if kind not in ("choice", "grid")]
        if bad:
            raise ConfigError(f"tune.search=grid needs discrete keys (choice or grid); key '{bad[0]}' is {kinds[bad[0]]}: "
                              "use tune.search=random or optuna")
    if search == "optuna":
        grid = [k for k, kind in kinds.items() if kind == "grid"]
        if grid:
            raise ConfigError(f"tune.search=optuna samples every key; key '{grid[0]}' is a grid: write it as choice, "
                              "or use tune.search=random or grid")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(OPTUNA_MISSING) from None
    if sched == "pbt" and search != "random":
        raise ConfigError(f"tune.scheduler=pbt with tune.search={search}: PBT draws its own trials and changes their "
                          "values (Ray Tune refuses a searcher beside it); use tune.search=random")
    if sched == "pbt":
        bad = [k for k, kind in kinds.items() if kind not in CONTINUOUS]
        if bad:
            raise ConfigError(f"tune.scheduler=pbt perturbs every key of the search space; key '{bad[0]}' is "
                              f"{kinds[bad[0]]}, not continuous ({' or '.join(CONTINUOUS)}): search it with asha or "
                              "fifo, or fix its value in the config")
        interval, epochs = int(cfg.tune.perturbation_interval), int(cfg.train.epochs)
        if not 1 <= interval < epochs:
            raise ConfigError(f"tune.perturbation_interval={interval}: PBT needs 1 <= interval < train.epochs={epochs}")
        for key in ("run.checkpoint_every", "eval.every"):
            every = int(OmegaConf.select(cfg, key))
            if interval % every:
                raise ConfigError(f"{key}={every} does not divide tune.perturbation_interval={interval}: PBT copies a "
                                  "trial's checkpoint of a perturbation epoch, so it needs one evaluated checkpoint there")
        if uses_ray_train(cfg):
            raise ConfigError(f"tune.scheduler=pbt with scaling.num_workers={cfg.scaling.num_workers}: a multi-worker "
                              "trial resumes from its own Train run, not from the checkpoint PBT copies into it; "
                              "use one worker per trial")


def searcher(cfg: DictConfig, space: Space, limit: int) -> tuple[TrialPlan, Any]:
    """The trials Tune is asked for and its search algorithm, at most ``limit`` trials at once."""
    seed, samples = int(cfg.seed), int(cfg.tune.num_samples)
    search = str(cfg.tune.search)
    if search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        note = f"Optuna TPE search (seed {seed}): {samples} trials, at most {limit} at once"
        return TrialPlan(to_param_space(space), samples, None, note), \
            ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if search == "grid":
        points = math.prod(len(next(iter(d.values()))) for d in space.values())
        plan = plan_trials({k: {"choice": next(iter(d.values()))} for k, d in space.items()}, points, seed)
        plan.note = f"tune.search=grid: each of the {len(plan.points or [])} points of the space once " \
                    f"(tune.num_samples={samples} not used)"
    else:
        plan = plan_trials(space, samples, seed)
    return plan, BasicVariantGenerator(random_state=seed, max_concurrent=limit)


def scheduler(cfg: DictConfig, space: Space):
    """Tune's trial scheduler for ``tune.scheduler``."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if cfg.tune.scheduler == "asha":
        return AsyncHyperBandScheduler(
            time_attr=TIME_ATTR,
            max_t=int(cfg.train.epochs) + 1,  # ASHA kills a trial at max_t: let full runs end on their own
            grace_period=int(cfg.tune.grace_period),
            reduction_factor=int(cfg.tune.reduction_factor),
        )
    if cfg.tune.scheduler == "pbt":
        bounds = {k: tuple(float(a) for a in next(iter(d.values()))) for k, d in space.items()}
        from rayexperts.launch.sweep_pbt import LastEpochKept

        return LastEpochKept(
            last_epoch=int(cfg.train.epochs),
            time_attr=TIME_ATTR,
            perturbation_interval=int(cfg.tune.perturbation_interval),
            hyperparam_mutations=to_param_space(space),
            custom_explore_fn=functools.partial(inside_bounds, bounds),
            log_config=False,
            synch=True,
        )
    return FIFOScheduler()


def inside_bounds(bounds: dict[str, tuple[float, float]], config: dict[str, Any]) -> dict[str, Any]:
    """PBT's perturbed config with each searched value clipped into its ``[low, high]`` (PBT multiplies by 0.8 or
    1.2, which can leave the space: a ratio above 1)."""
    for key, (low, high) in bounds.items():
        if key in config:
            config[key] = min(max(float(config[key]), low), high)
    return config
