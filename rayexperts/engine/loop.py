"""One step, one training epoch and one evaluation pass, in plain PyTorch (no Ray here): of one loader
(:func:`train_one_epoch`, :func:`evaluate`) and of a :class:`~rayexperts.engine.run.Run` (:func:`train_epoch`:
seeded from (seed, rank, epoch), averaged over workers; :func:`evaluate_splits`: every held-out split, after the
method's test-time steps). ``run`` is typed ``Any``: ``engine.run`` imports this module."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from rayexperts.data.samplers import EpochDraws, EpochSampler
from rayexperts.engine.mixup import Mixup
from rayexperts.engine.results import step_progress
from rayexperts.engine.schedule import set_lr
from rayexperts.engine.test_time import learn_views
from rayexperts.engine.tta import add_tta_views
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.methods.base import Batch, LossOutput, Method, View
from rayexperts.rundir import unwrap


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs a method on its device; built once per worker by :meth:`from_config`."""

    device: torch.device
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = False
    grad_clip: float = 0.0  # 0: off
    ece_bins: int = 15
    tta_flip: bool = False  # evaluate on the image and its mirror image, averaging the logits

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device) -> LoopOptions:
        """The one place that decides the memory format: channels_last unless ``model.channels_last=off``
        (``auto`` is on: it trained these ResNets 1.2-1.35x faster on CPU, and is the CUDA convention)."""
        return cls(
            device=device,
            amp=bool(cfg.train.amp),
            channels_last=str(cfg.model.channels_last) != "off",
            grad_clip=float(cfg.train.grad_clip),
            ece_bins=int(cfg.eval.ece_bins),
            tta_flip=bool(cfg.eval.tta_flip),
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """bf16 autocast on CUDA; plain fp32 elsewhere."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, items: tuple) -> Batch:
        """(x, y) or (x_query, x_key, y) from a loader → a :class:`Batch` on the device."""

        def move(x: Tensor) -> Tensor:
            x = x.to(self.device, non_blocking=True)
            return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

        if len(items) == 3:
            return Batch(move(items[0]), move(items[2]), key_images=move(items[1]))
        return Batch(move(items[0]), move(items[1]))


def train_step(method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, opts: LoopOptions,
               mixup: Mixup | None = None, weight: float = 1.0) -> LossOutput:
    """One optimizer step on ``batch``: the method's loss (mixed with ``mixup``) under autocast, backward of
    ``weight`` × the loss (a worker's share of a partial batch: :meth:`EpochSampler.loss_weight`), gradient
    clipping (``train.grad_clip``), the step, and the method's after-step hook (MoCo's momentum)."""
    with opts.autocast():
        if mixup is None:
            out = method.training_step(model, batch)
        else:
            out = method.mixed_step(model, batch, *mixup.draw(batch.targets.shape[0], opts.device))
    optimizer.zero_grad(set_to_none=True)
    (out.total if weight == 1.0 else out.total * weight).backward()
    if opts.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
    optimizer.step()
    method.after_step(model)
    return out


def train_one_epoch(
    method: Method,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    epoch: int,
    lr_at: Callable[[int, int, int], float],
    opts: LoopOptions,
    mixup: Mixup | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    progress_every_s: float = 30.0,
) -> dict[str, float]:
    """Train for one epoch; returns mean loss terms, the last lr and images/s of this worker. With ``mixup``,
    each batch is mixed (:mod:`rayexperts.engine.mixup`); ``progress(step, steps, images_per_sec)`` is called
    at most every ``progress_every_s`` seconds (a long epoch shows where it is)."""
    model.train()
    sampler = getattr(loader, "sampler", None)
    sampler = sampler if isinstance(sampler, EpochSampler) else None
    per_rank = int(getattr(loader, "batch_size", 0) or 0)
    # every rank takes the same number of steps (the DDP all-reduce, SyncBN): the sampler's count
    steps = sampler.steps(per_rank) if sampler is not None else len(loader)  # type: ignore[arg-type]
    sums: dict[str, Tensor] = {}
    seen, counted, lr = 0, 0, 0.0
    batches, last = iter(loader), None
    start = shown = time.perf_counter()
    for i in range(steps):
        items = next(batches, None)
        if items is None:  # no image of the epoch's last, partial batch fell to this rank: an empty batch
            if last is None:
                break
            items = tuple(t[:0] for t in last)
        last = items
        lr = lr_at(epoch, i, steps)
        set_lr(optimizer, lr)
        batch = opts.batch(items)
        n = batch.targets.shape[0]
        weight = sampler.loss_weight(i, per_rank, n) if sampler is not None else 1.0
        out = train_step(method, model, optimizer, batch, opts, mixup, weight)
        if n:  # an empty batch's mean loss is 0/0
            counted += 1
            for name, value in {"loss": out.total, **{f"loss_{k}": v for k, v in out.terms.items()}}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        seen += n
        if progress is not None and time.perf_counter() - shown >= progress_every_s:
            shown = time.perf_counter()
            progress(i + 1, steps, seen / (shown - start))
    if opts.device.type == "cuda":  # GPU finding F11: time the work, not its queueing
        torch.cuda.synchronize(opts.device)
    elapsed = time.perf_counter() - start
    metrics = {k: float(v) / max(counted, 1) for k, v in sums.items()}
    metrics.update(lr=lr, images_per_sec=seen / max(elapsed, 1e-9), train_seconds=elapsed)
    return metrics


@torch.no_grad()
def evaluate(method: Method, model: nn.Module, loader: Iterable, opts: LoopOptions,
             extra_views: Mapping[str, View] | None = None) -> EvalAccumulator:
    """Accumulate every view's statistics (the method's, plus ``extra_views``: learnt test-time views) and the
    method's per-sample statistics over this worker's shard, then sum over workers.

    GPU finding F7: in float32, with autocast off (also a caller's), so that every view's logits are
    float32 before any cast: bf16 heads tie and flip the arg-max (ties favour class 0, the head class).
    Evaluation is a small share of the time."""
    model.eval()
    extra = dict(extra_views or {})
    views = [*method.view_names(), *extra]
    acc = EvalAccumulator(views, method.num_classes, opts.ece_bins, opts.device)
    for items in loader:
        batch = opts.batch(items)
        with torch.autocast(opts.device.type, enabled=False):
            logits, out, raw = method.predict(model, batch.images, extra)
            if opts.tta_flip:
                flipped, _, _ = method.predict(model, batch.images.flip(-1), extra)
                logits = {k: (v.float() + flipped[k].float()) / 2 for k, v in logits.items()}
        for name in views:
            acc.update(name, logits[name], batch.targets)  # float32 already (update casts anyway)
        acc.update_expert_kl([z.float() for z in method.expert_logits_for_kl(out)], batch.targets)
        for name, values in method.sample_statistics(raw).items():
            acc.update_stat(name, values, batch.targets)
    acc.all_reduce()
    return acc


# ------------------------------------------------------------------------------------------- one run


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**31)


def seed_epoch(run: Any, epoch: int) -> None:
    """Seed everything random in ``epoch`` from (seed, rank, epoch): the epoch is their whole state. Sets
    ``run.mixup`` (``train.mixup_alpha``) and calls the method's epoch hook."""
    seed = epoch_seed(int(run.cfg.seed), run.rank, epoch)
    torch.manual_seed(seed)
    run.sampler.set_epoch(epoch)
    if isinstance(run.train_loader, EpochDraws):  # the device-cache and encoded loaders: draws per epoch
        run.train_loader.set_epoch(epoch, seed)
    alpha = float(run.cfg.train.mixup_alpha)
    run.mixup = Mixup(alpha, seed + 1) if alpha > 0 else None
    run.method.on_epoch(epoch)


def train_epoch(run: Any, epoch: int) -> dict[str, float]:
    """Train ``run`` for ``epoch`` (seeded by :func:`seed_epoch`); the statistics averaged over workers (their
    images/s summed). Rank 0 prints where a long epoch is (``run.verbose``)."""
    seed_epoch(run, epoch)
    stats = train_one_epoch(run.method, run.model, run.optimizer, run.train_loader, epoch, run.lr_at, run.opts,
                            run.mixup, step_progress(run, epoch))
    return mean_over_workers(stats, sum_keys=("images_per_sec",))


def evaluate_splits(run: Any, last: bool = True) -> dict[str, EvalAccumulator]:
    """Evaluate every view on each held-out split (test, val, test distributions), by metrics prefix; each sample
    counts once over all workers. The method's test-time steps (``eval.test_time``: at the ``last`` evaluation, at
    ``every`` one, or ``off``) first learn their views on each test split's unlabelled images
    (:mod:`rayexperts.engine.test_time`); those views are transductive."""
    sync_buffers(run.model)
    when = str(run.cfg.eval.test_time)
    learn = when == "every" or (when == "last" and last)
    sources = run.loaders.sources()
    out = {}
    for prefix, loader in run.eval_loaders.items():
        steps = run.method.test_time_steps() if learn and not prefix.startswith("val_") else {}
        extra = learn_views(run, steps, sources[prefix]) if steps else {}
        out[prefix] = evaluate(run.method, run.eval_model, loader, run.opts, extra)
    add_tta_views(run, out, last)  # eval.tta: views <view>_<mode>, each image's views ensembled (engine.tta)
    return out


def sync_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm statistics, MoCo queues) before evaluating,
    so N workers evaluate exactly the model that rank 0 checkpoints."""
    if is_distributed():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


def mean_over_workers(stats: dict[str, float], sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Average per-worker training statistics (sum ``sum_keys``: the throughput) across workers."""
    if not is_distributed():
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    world = dist.get_world_size()
    return {k: float(v) if k in sum_keys else float(v) / world for k, v in zip(keys, t.tolist())}
