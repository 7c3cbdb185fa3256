"""Short runs in this process, without Ray, for the checks of the GPU path (``tests/gpu``, ``tests/test_gpu_path.py``):
where they run (:class:`Setup`), a method's config on the check's data (:func:`run_config`), its prerequisites
trained for a few steps (:func:`train_here`, through :func:`rayexperts.launch.stages.train_prerequisites`), a
given number of steps (:func:`train_steps`), and what the checks compare (:func:`view_dtypes`, :func:`state_diff`)."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rayexperts.config import list_presets, load_config, with_overrides
from rayexperts.diagnostics.census import Census
from rayexperts.engine.loop import evaluate, seed_epoch, train_one_epoch, train_step
from rayexperts.engine.run import Run
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.launch.stages import Outcome, train_prerequisites
from rayexperts.methods.base import LossOutput
from rayexperts.registry import METHODS
from rayexperts.rundir import RunDir, save_checkpoint, unwrap

TWO_TEACHERS = "cbd.teachers=[{type: standard, seed: 0}, {type: data_aug, seed: 1}]"  # CBD with two of its four


class Steps:
    """The first ``n`` batches of a loader, with a length (the loop needs one for the LR schedule)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n


class Repeat:
    """A loader that yields the same pre-built batch (the step without the data pipeline)."""

    def __init__(self, items: tuple) -> None:
        self.items = items

    def __iter__(self) -> Iterator:
        return itertools.repeat(self.items)


@dataclass
class Setup:
    """Where the checks run: ``device``, the data overrides (``data_name``: ``cifar10-lt-if100`` from a CIFAR-10
    Parquet file, else the embedded ``digits-lt``), the model overrides of runs not built from a preset, the
    folder of their run directories (``root``), ``smoke`` (tiny sizes on a CPU) and ``deadline`` (a
    ``time.perf_counter()`` value; the runner sets it per part)."""

    device: torch.device
    data: list[str]
    data_name: str
    model: list[str]
    root: Path
    smoke: bool = False
    deadline: float = float("inf")
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # the runner's record of the parts so far

    @classmethod
    def create(cls, device: torch.device, parquet: str | Path | None, root: Path, smoke: bool = False) -> Setup:
        """CIFAR-10-LT IF 100 with ResNet-32, batch 128 from ``parquet`` when it exists (and not ``smoke``), else
        digits-lt with the defaults."""
        if parquet is not None and Path(parquet).exists() and not smoke:
            return cls(device, ["data.name=cifar10-lt", f"data.root={parquet}", "data.imbalance_factor=100"],
                       "cifar10-lt-if100", ["model.backbone=resnet32", "train.batch_size=128"], root, smoke)
        return cls(device, ["data.name=digits-lt"], "digits-lt", [], root, smoke)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def steps(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def left(self) -> float:
        """Seconds left to the current part."""
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, result) of ``fn``, the device drained before and after."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def preset_of(method: str, data_name: str) -> str | None:
    """The method's preset on the check's data (CIFAR-10-LT IF 100, or digits), if it has one."""
    data = "digits" if data_name == "digits-lt" else "cifar10_lt_if100"
    names = set(list_presets())
    return next((n for n in (f"{data}_{method}", f"{method}_{data}") if n in names), None)


def run_config(setup: Setup, method: str, *extra: str, preset: bool = False) -> DictConfig:
    """``method`` on the check's data with ``data.cache=device`` (``preset``: with its preset's settings, the
    data location still the check's), eager, quiet, its run directory under ``setup.root``; without a preset, the
    method's ``demo_overrides`` (e.g. LIFT's tiny timm ViT) before ``extra``. A two-stage method gets its first
    stage: CBD two teachers, RIDE-EA a RIDE run on the same data and model."""
    found = preset_of(method, setup.data_name) if preset else None
    model = [] if found else setup.model
    base = [f"method={method}", *setup.data, *model, "data.cache=device", "run.verbose=false", "train.compile=off",
            f"run.storage_path={setup.root / 'runs'}", f"run.name={method}-{uuid.uuid4().hex[:8]}"]
    if method == "cbd" and not found:
        base.append(TWO_TEACHERS)
    if not found:
        base.extend(METHODS.get(method).demo_overrides)
    cfg = load_config(found, [*base, *extra])
    if method == "ride_ea" and not cfg.ride_ea.stage1 and not cfg.ride_ea.experts_run:
        stage1 = preset_of("ride", setup.data_name) if found else None
        if stage1 is None:
            stage1 = str(setup.root / f"ride_stage1_{uuid.uuid4().hex[:8]}.yaml")
            Path(stage1).write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(["method=ride", *setup.data, *model])))
        cfg = load_config(found, [*base, *extra, f"ride_ea.stage1={stage1}"])
    return cfg


def train_here(setup: Setup, steps: int | None) -> Callable[[list[DictConfig]], list[Outcome]]:
    """A ``train`` for :func:`~rayexperts.launch.stages.train_prerequisites`: each run in this process on the
    check's device for one epoch of at most ``steps`` steps (0: the whole epoch; None: untrained, for
    throughput), then its config and checkpoint written as a finished run leaves them."""

    def train(cfgs: list[DictConfig]) -> list[Outcome]:
        outcomes = []
        for cfg in cfgs:
            cfg = with_overrides(cfg, {"train.epochs": 1, "data.cache": "device", "scaling.use_gpu": setup.cuda,
                                       "scaling.gpus_per_worker": 1}, "diagnostics")
            run = Run(cfg, 0, 1, setup.device)
            if steps is not None:
                train_steps(run, 0, steps)
            rundir = RunDir.for_config(cfg)
            rundir.write_config(cfg)
            local = tempfile.mkdtemp(dir=setup.root)
            save_checkpoint(local, model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
            rundir.put_checkpoint(local, 1, 1)
            outcomes.append(Outcome(str(cfg.run.name), cfg, rundir.uri, "finished"))
        return outcomes

    return train


def with_prerequisites(setup: Setup, cfg: DictConfig, steps: int | None = 20) -> DictConfig:
    """``cfg`` once its prerequisite runs exist (:func:`train_here` with ``steps``)."""
    return train_prerequisites(cfg, "diagnostics", "in-process prerequisites", train=train_here(setup, steps))[0]


def make_run(setup: Setup, method: str, *extra: str, preset: bool = False, teacher_steps: int | None = 20) -> Run:
    """A :class:`Run` of ``method`` on the check's device (:func:`run_config`, :func:`with_prerequisites`)."""
    return Run(with_prerequisites(setup, run_config(setup, method, *extra, preset=preset), teacher_steps),
               0, 1, setup.device)


def train_steps(run: Run, epoch: int, steps: int, loader=None) -> dict[str, float]:
    """``steps`` training steps of ``epoch`` as the loop trains them (seeded, with the run's mixup; 0: the whole
    epoch), from ``loader`` (default: the run's)."""
    seed_epoch(run, epoch)
    loader = loader if loader is not None else run.train_loader
    return train_one_epoch(run.method, run.model, run.optimizer, Steps(loader, steps) if steps else loader, epoch,
                           run.lr_at, run.opts, run.mixup)


def one_step(run: Run, batches: Iterator) -> LossOutput:
    """One training step as the loop takes it, on the next batch of ``batches``."""
    return train_step(run.method, run.model, run.optimizer, run.opts.batch(next(batches)), run.opts)


def census(run: Run, steps: int = 1) -> tuple[Census, Census, torch.Tensor]:
    """``steps`` training steps of epoch 0 (batches from the run's loader; the loss, backward, optimizer step and
    the after-step hook) and one evaluation batch through ``evaluate``, each under its own :class:`Census` on the
    run's device; with the steps' losses."""
    seed_epoch(run, 0)
    batches = iter(run.train_loader)
    train, evaluation = Census(device=run.device), Census(device=run.device)
    with train:
        losses = [one_step(run, batches).total.detach().float() for _ in range(steps)]
    with evaluation:
        evaluate(run.method, run.eval_model, Steps(run.eval_loaders[""], 1), run.opts)
    return train, evaluation, torch.stack(losses)


@contextlib.contextmanager
def view_dtypes(record: dict[str, set]) -> Iterator[dict[str, set]]:
    """Record in ``record`` the dtype of the logits every evaluation view hands ``EvalAccumulator.update``."""
    original = EvalAccumulator.update

    def update(self, view, logits, targets):
        record.setdefault(view, set()).add(str(logits.dtype).removeprefix("torch."))
        return original(self, view, logits, targets)

    EvalAccumulator.update = update  # type: ignore[method-assign]
    try:
        yield record
    finally:
        EvalAccumulator.update = original  # type: ignore[method-assign]


def state_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest absolute difference between two models' state tensors."""
    sa, sb = unwrap(a).state_dict(), unwrap(b).state_dict()
    return max((float((x.double() - sb[k].double()).abs().max()) if x.numel() else 0.0) for k, x in sa.items())
