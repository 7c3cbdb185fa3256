"""The per-worker training function: plain PyTorch set-up and loop, reported through Ray Train.

:class:`Run` holds everything one worker needs (data, method, model, optimizer) and knows
nothing of Ray, so benchmarks and evaluation tools can drive it directly;
:func:`train_loop_per_worker` is what ``TorchTrainer`` runs on every worker: it resumes from
Ray Train's latest checkpoint, trains, evaluates, writes the run directory's tables (rank 0) and
reports every view's metrics plus checkpoints.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Subset

from rayexperts import registry
from rayexperts.config import from_dict
from rayexperts.data import EpochSampler, TransformedDataset, TwoView, build_dataset, build_transform, moco_transform
from rayexperts.engine.loop import LoopOptions, evaluate, train_one_epoch
from rayexperts.engine.results import ResultWriter
from rayexperts.engine.schedule import build_optimizer, lr_schedule
from rayexperts.engine.track import Trackers
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.methods import METHODS, Method
from rayexperts.rundir import RunDir, identity, load_checkpoint, save_checkpoint, unwrap


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**31)


class Run:
    """One worker's training run: data → method → model → optimizer, with train/eval steps."""

    def __init__(self, cfg: DictConfig, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = device or torch.device("cpu")
        self.opts = LoopOptions.from_config(cfg, self.device)
        self.data = build_dataset(cfg.data)
        self.groups = self.data.shot_groups(cfg.data.many_threshold, cfg.data.few_threshold)
        counts = torch.as_tensor(self.data.train_counts, dtype=torch.float32)
        self.method: Method = METHODS.get(cfg.method)(cfg, counts, self.data.in_channels)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.method.build_model()
        use_sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else (world > 1 and self.device.type == "cuda")
        if use_sync_bn and world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device, memory_format=self.opts.memory_format)
        self.method.setup(self.device, self.opts.memory_format)
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
        self.lr_at = lr_schedule(cfg.train)
        self.views = self.method.view_names()
        self.ident = identity(cfg, self.data.num_classes)
        self._build_loaders()

    # -- data ----------------------------------------------------------------------------
    def _build_loaders(self) -> None:
        cfg, kind, size = self.cfg, self.data.image_kind, int(self.cfg.data.image_size)
        train_t = build_transform(kind, cfg.data.augment, train=True, image_size=size)
        if self.method.uses_key_view:
            key_t = moco_transform(kind, size) if cfg.data.key_augment == "moco" else train_t
            train_t = TwoView(train_t, key_t)
        sampler_kind = cfg.data.sampler if cfg.data.sampler != "auto" else self.method.sampler
        self.sampler = EpochSampler(self.data.train.labels, sampler_kind, self.world, self.rank, cfg.seed)
        pin = self.device.type == "cuda"
        nw = int(cfg.data.num_workers)
        self.train_loader = DataLoader(
            TransformedDataset(self.data.train, train_t),
            batch_size=int(cfg.train.batch_size) // self.world,
            sampler=self.sampler,
            num_workers=nw,
            pin_memory=pin,
            drop_last=True,
            persistent_workers=nw > 0,
        )
        test_t = build_transform(kind, "none", train=False, image_size=size)
        self.eval_loaders = {"": self._eval_loader(self.data.test, test_t)}
        if self.data.val is not None:
            self.eval_loaders["val_"] = self._eval_loader(self.data.val, test_t)

    def _eval_loader(self, source, transform) -> DataLoader:
        shard = Subset(TransformedDataset(source, transform), range(self.rank, len(source), self.world))
        return DataLoader(
            shard,
            batch_size=int(self.cfg.data.test_batch_size),
            num_workers=int(self.cfg.data.num_workers),
            pin_memory=self.device.type == "cuda",
        )

    # -- steps ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        torch.manual_seed(epoch_seed(int(self.cfg.seed), self.rank, epoch))
        self.sampler.set_epoch(epoch)
        stats = train_one_epoch(self.method, self.model, self.optimizer, self.train_loader, epoch, self.lr_at, self.opts)
        return _mean_over_workers(stats, sum_keys=("images_per_sec",))

    def evaluate(self) -> dict[str, EvalAccumulator]:
        """Evaluate every view on the test (and val) split; each sample counts once over all workers."""
        sync_buffers(self.model)
        return {prefix: evaluate(self.method, self.model, loader, self.opts) for prefix, loader in self.eval_loaders.items()}

    def result_rows(self, epoch: int, accs: dict[str, EvalAccumulator], train_stats: dict[str, float]):
        """One metrics row per view, and the per-class table of this evaluation."""
        now = time.time()
        rows = []
        for view in self.views:
            row: dict[str, Any] = {"epoch": epoch, "view": view}
            for prefix, acc in accs.items():
                row.update(acc.summary(view, self.groups, prefix))
                if view == "ensemble":
                    row.update(acc.expert_kl_summary(self.groups, prefix))
            row.update(train_stats)
            row["timestamp"] = now
            rows.append(row)
        test = accs[""]
        classes = pd.concat(
            [
                pd.DataFrame(
                    {
                        "epoch": epoch,
                        "view": view,
                        "class_id": np.arange(self.data.num_classes),
                        "class_name": self.data.class_names,
                        "train_count": self.data.train_counts.astype("int64"),
                        "shot_group": self.groups,
                        "accuracy": test.per_class_accuracy(view),
                    }
                )
                for view in self.views
            ],
            ignore_index=True,
        )
        return rows, classes


def sync_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm statistics, MoCo queues) before evaluating,
    so N workers evaluate exactly the model that rank 0 checkpoints."""
    if is_distributed():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


def reliability_table(epoch: int, acc: EvalAccumulator, views: list[str]) -> pd.DataFrame:
    """Per view and confidence bin of the test split: count, mean confidence, accuracy (reliability diagrams)."""
    return pd.concat([pd.DataFrame({"epoch": epoch, "view": v, **acc.reliability(v)}) for v in views], ignore_index=True)


def _mean_over_workers(stats: dict[str, float], sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Average per-worker training statistics (sum the throughput) across workers."""
    if not is_distributed():
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    world = dist.get_world_size()
    return {k: float(v) if k in sum_keys else float(v) / world for k, v in zip(keys, t.tolist())}


def progress_line(epoch: int, epochs: int, rows: list[dict[str, Any]], primary: str) -> str:
    r0 = rows[0]
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {r0.get('loss', math.nan):.4f}", f"lr {r0.get('lr', 0):.4g}"]
    parts.append(f"{r0.get('images_per_sec', 0):.0f} img/s")
    shown = [r for r in rows if r["view"] == primary] + [r for r in rows if r["view"] != primary][:3]
    parts += [f"{r['view']} {100 * r['top1']:.2f}%" for r in shown]
    if "val_top1" in r0:
        parts += [f"val {100 * next(r['val_top1'] for r in rows if r['view'] == primary):.2f}%"]
    return " | ".join(parts)


def reported_metrics(epoch: int, stats: dict[str, float], rows: list[dict[str, Any]], primary: str) -> dict[str, Any]:
    """What a worker reports for an epoch: the training statistics, the primary view's metrics at the top
    level (``top1``, ``val_top1``, ...), and every view's as ``<view>/<metric>`` (Tune can tune on any view)."""
    metrics: dict[str, Any] = {"epoch": epoch, **stats}
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        metrics.update({f"{row['view']}/{k}": v for k, v in numbers.items()})
        if row["view"] == primary:
            metrics.update(numbers)
            metrics["view"] = primary
    return metrics


# -------------------------------------------------------------------------------- Ray Train


def _set_ray_train_log_level(level: str) -> None:
    """Ray Train's worker loggers; the per-report one is named by its file path, not ``ray.train``."""
    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(level)
    except ImportError:  # another Ray layout: only the package logger
        pass


def start_worker(loop_config: dict[str, Any]) -> Run:
    """This Ray Train worker's :class:`Run`: the driver's plugins registered, Ray Train's log level,
    the worker's CPU share of torch threads (``loop_config["threads"]``), its device, and DDP when
    there are several."""
    import ray.train
    import ray.train.torch

    registry.add_plugins(loop_config.get("plugins") or {})
    cfg = from_dict(loop_config["config"])
    _set_ray_train_log_level(str(cfg.run.ray_log_level))
    threads = int(loop_config.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    run = Run(cfg, ctx.get_world_rank(), ctx.get_world_size(), device)
    if run.world > 1:
        run.model = ray.train.torch.prepare_model(run.model, move_to_device=False)
    return run


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What ``TorchTrainer`` runs on each worker (Ray Train V2)."""
    import ray.train

    run = start_worker(loop_config)
    cfg, rank = run.cfg, run.rank
    if rank == 0 and cfg.run.verbose:
        import rayexperts

        print(f"{cfg.run.name} | rayexperts {rayexperts.__version__} from {rayexperts.PACKAGE_DIR} | "
              f"{run.world} worker(s) on {run.device.type}", flush=True)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, run.ident)
        unwrap(run.model).load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        if rank == 0:
            print(f"[rayexperts] resuming {cfg.run.name} from checkpoint {checkpoint.path} at epoch {start_epoch}", flush=True)

    rundir = RunDir.of(cfg.run.storage_path, cfg.run.name)
    writer = ResultWriter(rundir, start_epoch) if rank == 0 else None
    trackers = Trackers(cfg, rundir, start_epoch) if rank == 0 else None
    epochs = int(cfg.train.epochs)
    every_eval, every_ckpt = int(cfg.eval.every), int(cfg.run.checkpoint_every)
    primary = run.method.primary_view
    finished = False
    try:
        for epoch in range(start_epoch, epochs):
            stats = run.train_epoch(epoch)
            last = epoch == epochs - 1
            metrics: dict[str, Any] = {"epoch": epoch, **stats}
            if last or (epoch + 1) % every_eval == 0:
                accs = run.evaluate()
                rows, classes = run.result_rows(epoch, accs, stats)
                if writer is not None and trackers is not None:
                    writer.add(rows, classes, reliability_table(epoch, accs[""], run.views))
                    trackers.log(epoch, rows, stats)
                    if cfg.run.verbose:
                        print(f"{cfg.run.name} | {progress_line(epoch, epochs, rows, primary)}", flush=True)
                metrics = reported_metrics(epoch, stats, rows, primary)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if (last or (epoch + 1) % every_ckpt == 0) and rank == 0:
                    save_checkpoint(tmp, model=run.model, optimizer=run.optimizer, epoch=epoch + 1, ident=run.ident)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        finished = True
    finally:
        if trackers is not None:
            trackers.close(finished)
