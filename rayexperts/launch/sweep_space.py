"""Search spaces (``tune_spaces/*.yaml``): reading and checking them, and the trials Tune is asked to run.

A space maps dotted config keys to one distribution each (:data:`DISTRIBUTIONS`); :func:`load_space` checks every
key and every value it can produce against the config before Ray starts (docs/configs.md "Sweeps").
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from rayexperts.config import ConfigError, valid_keys, with_overrides
from rayexperts.methods import METHODS
from rayexperts.registry import did_you_mean

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "randint")
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
