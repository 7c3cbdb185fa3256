"""A config's prerequisite runs (CBD's teachers, RIDE-EA's stage 1) and the method's own run after them.

A method with runs that must finish first returns them from ``Method.prerequisites(cfg)`` and its own run's
config from ``Method.after_prerequisites(cfg, run_dirs)`` (docs/methods.md "CBD"). :func:`train_prerequisites`
is the one way every caller goes from one to the other: ``rayexperts train``/``cbd`` (:mod:`.ensemble`), a sweep
(:mod:`.tune`), ``rayexperts reproduce`` (which trains every setting's prerequisites in one first wave and then
asks :func:`main_stage`) and the tests that train them in-process (their own ``train``).

By default the prerequisites train in parallel (:func:`train_in_parallel`): each from its own Ray actor
(:mod:`rayexperts.launch.actor`: in the actor for one worker, a Ray Train run for more), so all start at once and
Ray packs them onto the cluster. A finished run (its latest checkpoint at the last epoch) is not retrained. One
run failing does not stop the others: all are waited for, then :class:`PrerequisiteFailed` names each failed run
and its log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from rayexperts.errors import RunError
from rayexperts.launch.actor import start_run
from rayexperts.launch.cluster import dashboard_wanted, ensure_ray
from rayexperts.launch.torch_trainer import uses_ray_train
from rayexperts.methods import METHODS
from rayexperts.rundir import IDENTITY_KEYS, RunDir


class PrerequisiteFailed(RunError):
    """One or more prerequisite runs (CBD: teachers) failed; the message names each, its run directory
    and its error log."""


@dataclass
class Outcome:
    """How one run ended: ``finished``, ``skipped`` (already done) or ``failed``."""

    name: str
    cfg: DictConfig
    path: str
    status: str
    error: str = ""


def reuse_keys(cfg: DictConfig) -> tuple[str, ...]:
    """What a finished run directory must agree on to be reused: the identity keys, the seed and the
    augmentation (a teacher), and the method's path keys (CBD's student: the same teachers)."""
    return (*IDENTITY_KEYS, "seed", "data.augment", *METHODS.get(cfg.method).path_keys)


def is_finished(cfg: DictConfig) -> bool:
    """True when ``cfg``'s run directory holds the checkpoint and the evaluation of its last epoch.
    A directory holding another configuration (:func:`reuse_keys`) is refused."""
    return RunDir.for_config(cfg).holds_finished_run(cfg, reuse_keys(cfg))


def _describe(cfg: DictConfig) -> str:
    return f"{cfg.method}, {cfg.data.augment}, seed {cfg.seed}"


def train_in_parallel(cfgs: list[DictConfig], tag: str, ray_train_later: bool = False,
                      on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Train every unfinished run concurrently, each from its own actor; wait for all, report each.
    ``ray_train_later``: the job goes on with a multi-worker run (the local instance's dashboard);
    ``on_done`` is told of every run as it ends (a skipped one at once)."""
    import ray

    outcomes: dict[int, Outcome] = {}
    pending: dict[Any, tuple[int, Any]] = {}
    ray_train = ray_train_later or uses_ray_train(*cfgs)
    for i, cfg in enumerate(cfgs):
        rundir = RunDir.for_config(cfg)
        name, path = cfg.run.name, rundir.uri
        if is_finished(cfg):
            print(f"[{tag}] {name}: finished checkpoint found in {path}: reused (not retrained)", flush=True)
            outcomes[i] = Outcome(name, cfg, path, "skipped")
            if on_done is not None:
                on_done(outcomes[i])
            continue
        ensure_ray(dashboard=dashboard_wanted(cfg.run.dashboard, ray_train))  # only when something is left to train
        rundir.write_config(cfg)  # is_finished checked the directory
        actor, ref = start_run(cfg)
        pending[ref] = (i, actor)
        print(f"[{tag}] {name} ({_describe(cfg)}) launched: {path}", flush=True)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        i, _actor = pending.pop(ref)
        cfg = cfgs[i]
        name, path = cfg.run.name, RunDir.for_config(cfg).uri
        try:
            ray.get(ref)
            outcomes[i] = Outcome(name, cfg, path, "finished")
            print(f"[{tag}] {name} finished: {path}", flush=True)
        except Exception as e:  # RayTaskError / ActorDiedError: keep waiting for the others
            outcomes[i] = Outcome(name, cfg, path, "failed", _root_cause(e))
            print(f"[{tag}] {name} FAILED: {outcomes[i].error}", flush=True)
        if on_done is not None:
            on_done(outcomes[i])
    return [outcomes[i] for i in range(len(cfgs))]


def _root_cause(e: BaseException) -> str:
    """The last line of the innermost error (Ray wraps the worker's exception twice)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def raise_failed(failed: list[Outcome], where: str) -> None:
    """:class:`PrerequisiteFailed` naming every failed run, its directory and its log; nothing when none failed."""
    if failed:
        raise PrerequisiteFailed("; ".join(
            f"{t.name} failed ({t.error}); run directory {t.path}, traceback in {t.path}/error.log" for t in failed
        ) + f". {where}; re-run to retry.")


def main_stage(cfg: DictConfig, first: list[DictConfig]) -> DictConfig:
    """The method's own run once ``first`` (its prerequisites) are in their run directories; ``cfg`` itself when
    there are none."""
    if not first:
        return cfg
    return METHODS.get(cfg.method).after_prerequisites(cfg, [RunDir.for_config(c).uri for c in first])


Train = Callable[[list[DictConfig]], list[Outcome]]


def train_prerequisites(cfg: DictConfig, tag: str, where: str, train: Train | None = None,
                        on_outcomes: Callable[[list[Outcome]], None] | None = None
                        ) -> tuple[DictConfig, list[Outcome]]:
    """Train ``cfg``'s prerequisites, then return the method's own run (:func:`main_stage`) and how each
    prerequisite ended (none: ``cfg`` itself and ``[]``). ``train`` trains them (default: :func:`train_in_parallel`
    under ``tag``); ``on_outcomes`` sees every outcome before a failure is raised (:func:`raise_failed`, ``where``
    says what was kept or did not start)."""
    first = METHODS.get(cfg.method).prerequisites(cfg)
    if not first:
        return cfg, []
    if train is None:
        outcomes = train_in_parallel(first, tag, ray_train_later=uses_ray_train(cfg))
    else:
        outcomes = train(first)
    if on_outcomes is not None:
        on_outcomes(outcomes)
    raise_failed([o for o in outcomes if o.status == "failed"], where)
    return main_stage(cfg, [o.cfg for o in outcomes]), outcomes
