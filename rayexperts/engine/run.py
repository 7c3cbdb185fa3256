"""One worker's run in plain PyTorch (no Ray here): data → method → model → optimizer, with the
train and evaluation steps. Benchmarks, tests and the Ray entry points (``engine.worker``) drive it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Subset

from rayexperts.data import EpochSampler, TransformedDataset, TwoView, build_dataset, build_transform, moco_transform
from rayexperts.data.batched import batch_moco_transform, batch_transform
from rayexperts.data.transforms import AugmentOptions
from rayexperts.data.device import CachedSplit, DeviceLoader, plan_cache, processes_per_device
from rayexperts.data.encoded import EncodedLoader
from rayexperts.data.sources import ArraySource
from rayexperts.engine.loop import LoopOptions, evaluate, train_one_epoch
from rayexperts.engine.mixup import Mixup
from rayexperts.engine.schedule import StepSchedule, build_optimizer
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.methods import METHODS, Method
from rayexperts.models.backbones import timm_data_config
from rayexperts.models.finetune import optimizer_groups, parameter_counts
from rayexperts.rundir import identity, unwrap


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
        configure_backends(self.device, bool(cfg.train.deterministic))
        self.data = build_dataset(cfg.data)
        self.groups = self.data.shot_groups(cfg.data.many_threshold, cfg.data.few_threshold)
        counts = torch.as_tensor(self.data.train_counts, dtype=torch.float32)
        self.method: Method = METHODS.get(cfg.method)(cfg, counts, self.data.in_channels)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.method.build_model()
        use_sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else (world > 1 and self.device.type == "cuda")
        if use_sync_bn and world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = self.eval_model = model.to(self.device, memory_format=self.opts.memory_format)
        self.method.setup(self.device, self.opts.memory_format)
        self.optimizer = build_optimizer(optimizer_groups(model, float(cfg.train.backbone_lr_scale)), cfg.train)
        if rank == 0 and cfg.run.verbose:
            trainable, frozen = parameter_counts(model)
            print(f"{cfg.run.name} | parameters: {trainable} trainable, {frozen} frozen "
                  f"(model.finetune={cfg.model.finetune})", flush=True)
        self.model_data = timm_data_config(model)  # a timm backbone's own preprocessing (docs/pretrained.md)
        if self.model_data and rank == 0 and cfg.run.verbose:
            md = self.model_data
            print(f"{cfg.run.name} | {cfg.model.backbone} preprocessing: input {'x'.join(map(str, md['input_size']))}, "
                  f"mean {tuple(round(v, 4) for v in md['mean'])}, std {tuple(round(v, 4) for v in md['std'])}, "
                  f"{md['interpolation']}, crop_pct {md['crop_pct']}; used here: data.image_size={cfg.data.image_size}, "
                  f"mean/std {'data.mean/data.std' if cfg.data.mean else 'the model’s' if self._model_mean_std() else 'the data set’s'}",
                  flush=True)
        self.lr_at = StepSchedule(cfg.train)
        self.views = self.method.view_names()
        self.ident = identity(cfg, self.data.num_classes)
        self._test_caches: dict[int, CachedSplit] = {}
        self._build_loaders()

    # -- data ----------------------------------------------------------------------------
    def _build_loaders(self) -> None:
        cfg, kind, size = self.cfg, self.data.image_kind, int(self.cfg.data.image_size)
        sampler_kind = cfg.data.sampler if cfg.data.sampler != "auto" else self.method.sampler
        self.sampler = EpochSampler(self.data.train.labels, sampler_kind, self.world, self.rank, cfg.seed,
                                    drop_last=bool(cfg.data.drop_last))
        # GPU finding F6: every process on this GPU holds its own cache (a fractional share packs several).
        sharing = processes_per_device(float(cfg.scaling.gpus_per_worker), bool(cfg.scaling.use_gpu),
                                       int(cfg.tune.seeds_per_config))  # a sweep trial trains its seeds in one process
        self.cache = plan_cache(self.data, str(cfg.data.cache), float(cfg.data.cache_limit_mb), device=self.device,
                                sharing=sharing)
        if self.rank == 0 and cfg.run.verbose:
            print(f"{cfg.run.name} | data.cache={cfg.data.cache}: {self.cache.mode} ({self.cache.why})", flush=True)
        decode = str(cfg.data.decode)
        encoded = not isinstance(self.data.train, ArraySource)
        if self.cache.mode == "off" and encoded and (decode == "device" or (decode == "auto" and self.device.type == "cuda")):
            self._build_encoded_loaders(kind, size)
        elif self.cache.mode == "off":
            self._build_image_loaders(kind, size)
        else:
            self._build_device_loaders(kind, size, on_device=self.cache.mode == "device")

    def transforms(self, batched: bool):
        """(train, key view or None, test) transforms of this run's ``data.*`` settings: the batched twins
        (``rayexperts.data.batched``) or the per-image ones (``rayexperts.data.transforms``)."""
        d, kind, size = self.cfg.data, self.data.image_kind, int(self.cfg.data.image_size)
        opts = self.augment_options()
        make, moco = (batch_transform, batch_moco_transform) if batched else (build_transform, moco_transform)
        train = make(kind, str(d.augment), train=True, image_size=size, options=opts)
        key = None
        if self.method.uses_key_view:
            key = train if d.key_augment == "same" else moco(kind, size, blur=d.key_augment == "moco_blur", options=opts)
        return train, key, make(kind, "none", train=False, image_size=size, options=opts)

    def eval_sources(self) -> dict[str, Any]:
        """The held-out splits by metrics prefix: the test split (``""``), the validation split (``val_``) and each
        test distribution of ``eval.test_distributions`` carved from the test split (``forward50_``, ...)."""
        from rayexperts.data.imbalance import test_distribution_indices
        from rayexperts.data.sources import subset

        if getattr(self, "_eval_sources", None) is not None:
            return self._eval_sources
        out = {"": self.data.test}
        if self.data.val is not None:
            out["val_"] = self.data.val
        for name in self.cfg.eval.test_distributions:
            out[f"{name}_"] = subset(self.data.test, test_distribution_indices(self.data.test.labels, str(name)))
        self._eval_sources = out
        return out

    def two_view_test_batches(self, source, augment: str, batch_size: int, number: int):
        """Pass ``number`` of a test-time step over the held-out ``source``: all of it, shuffled the same way on
        every rank, in batches of ``batch_size`` (the last one partial), each ``(view1, view2, labels)`` of
        ``augment``."""
        d, kind, size = self.cfg.data, self.data.image_kind, int(self.cfg.data.image_size)
        seed = epoch_seed(int(self.cfg.seed), 0, 1_000_000 + number)
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
        opts = self.augment_options()
        if self.cache.mode != "off":
            t = batch_transform(kind, augment, train=True, image_size=size, options=opts)
            key = id(source)
            if key not in self._test_caches:
                self._test_caches[key] = CachedSplit(source, f"a test split of {self.data.name}", self.device,
                                                     self.cache.mode == "device")
            loader = DeviceLoader(self._test_caches[key], batch_size, t, indices=order, key=t)
            loader.set_epoch(number, seed)
            return loader
        t = build_transform(kind, augment, train=True, image_size=size, options=opts)
        torch.manual_seed(seed)
        return DataLoader(Subset(TransformedDataset(source, TwoView(t, t)), order.tolist()),
                          batch_size=batch_size, num_workers=int(d.num_workers))

    def augment_options(self) -> AugmentOptions:
        d = self.cfg.data
        mean_std = (tuple(d.mean), tuple(d.std)) if d.mean else self._model_mean_std() or (None, None)
        md = getattr(self, "model_data", None) or {}  # a timm backbone's own test crop and interpolation
        crop = float(d.crop_pct) or float(md.get("crop_pct", 224 / 256))
        mode = str(d.interpolation) if d.interpolation != "auto" else str(md.get("interpolation", "bilinear"))
        return AugmentOptions(autoaugment_fill=int(d.autoaugment_fill), cutout_fill=str(d.cutout_fill),
                              crop_scale_min=float(d.crop_scale_min), normalize=str(d.normalize),
                              mean=mean_std[0], std=mean_std[1], crop_pct=crop,
                              interpolation=mode if mode in ("bilinear", "bicubic") else "bilinear")

    def _model_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """A timm backbone's own mean and std, where it has one value per channel of these images."""
        md = getattr(self, "model_data", None)
        if not md or len(md["mean"]) != self.data.in_channels:
            return None
        return tuple(float(v) for v in md["mean"]), tuple(float(v) for v in md["std"])

    def _build_device_loaders(self, kind: str, size: int, on_device: bool) -> None:
        """Each split decoded once into a uint8 tensor (on the device or in host memory); batches are
        gathered in the sampler's order and augmented a batch at a time (``rayexperts.data.batched``)."""
        cfg, data = self.cfg, self.data
        train_t, key, test_t = self.transforms(batched=True)
        split = CachedSplit(data.train, f"the train split of {data.name}", self.device, on_device)
        self.train_loader = DeviceLoader(split, int(cfg.train.batch_size) // self.world, train_t,
                                         sampler=self.sampler, key=key)
        self.eval_loaders = {}
        for prefix, source in self.eval_sources().items():
            cached = CachedSplit(source, f"a held-out split of {data.name}", self.device, on_device)
            shard = torch.arange(self.rank, len(source), self.world)
            self.eval_loaders[prefix] = DeviceLoader(cached, int(cfg.data.test_batch_size), test_t, indices=shard)

    def _build_encoded_loaders(self, kind: str, size: int) -> None:
        """Files read by DataLoader workers, decoded a batch at a time on the device, augmented there."""
        cfg, data, nw = self.cfg, self.data, int(self.cfg.data.num_workers)
        train_t, key, test_t = self.transforms(batched=True)
        self.train_loader = EncodedLoader(data.train, int(cfg.train.batch_size) // self.world, train_t, self.device,
                                          image_size=size, train=True, sampler=self.sampler, key=key, num_workers=nw)
        self.eval_loaders = {
            prefix: EncodedLoader(source, int(cfg.data.test_batch_size), test_t, self.device, image_size=size,
                                  train=False, indices=list(range(self.rank, len(source), self.world)), num_workers=nw,
                                  options=self.augment_options())
            for prefix, source in self.eval_sources().items()
        }

    def _build_image_loaders(self, kind: str, size: int) -> None:
        """The per-image path: a DataLoader applying ``transforms.build_transform`` to one image at a time."""
        cfg = self.cfg
        train_t, key_t, test_t = self.transforms(batched=False)
        if key_t is not None:
            train_t = TwoView(train_t, key_t)
        pin = self.device.type == "cuda"
        nw = int(cfg.data.num_workers)
        self.train_loader = DataLoader(
            TransformedDataset(self.data.train, train_t),
            batch_size=int(cfg.train.batch_size) // self.world,
            sampler=self.sampler,
            num_workers=nw,
            pin_memory=pin,
            drop_last=self.sampler.drop_last,
            persistent_workers=nw > 0,
        )
        self.eval_loaders = {prefix: self._eval_loader(source, test_t) for prefix, source in self.eval_sources().items()}

    def _eval_loader(self, source, transform) -> DataLoader:
        shard = Subset(TransformedDataset(source, transform), range(self.rank, len(source), self.world))
        return DataLoader(
            shard,
            batch_size=int(self.cfg.data.test_batch_size),
            num_workers=int(self.cfg.data.num_workers),
            pin_memory=self.device.type == "cuda",
        )

    def compile(self) -> None:
        """``torch.compile`` the model for training when ``train.compile`` says so (after any DDP wrapper);
        evaluation keeps the plain module (the same parameters), so its other batch shapes recompile nothing."""
        mode = compile_mode(self.cfg, self.device, self.method.uses_key_view)
        if mode is not None:
            self.model = torch.compile(self.model, mode=mode)

    # -- steps ---------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Seed everything random in ``epoch`` from (seed, rank, epoch): the epoch is their whole state."""
        seed = epoch_seed(int(self.cfg.seed), self.rank, epoch)
        torch.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        if isinstance(self.train_loader, (DeviceLoader, EncodedLoader)):
            self.train_loader.set_epoch(epoch, seed)
        alpha = float(self.cfg.train.mixup_alpha)
        self.mixup = Mixup(alpha, seed + 1) if alpha > 0 else None
        self.method.on_epoch(epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.start_epoch(epoch)
        stats = train_one_epoch(self.method, self.model, self.optimizer, self.train_loader, epoch, self.lr_at, self.opts,
                                self.mixup, self._progress(epoch))
        return _mean_over_workers(stats, sum_keys=("images_per_sec",))

    def _progress(self, epoch: int):
        """Rank 0's line inside a long epoch (``run.verbose``): where it is, images/s, the epoch's ETA and the
        whole run's (the epochs left at this rate; evaluation not counted)."""
        if self.rank != 0 or not self.cfg.run.verbose:
            return None
        epochs, name = int(self.cfg.train.epochs), self.cfg.run.name

        def say(step: int, steps: int, rate: float) -> None:
            per_step = int(self.cfg.train.batch_size) // self.world / max(rate, 1e-9)
            left, whole = time_left(step, steps, epoch, epochs, per_step)
            print(f"{name} | epoch {epoch + 1}/{epochs} | step {step}/{steps} | {rate:.0f} img/s | "
                  f"epoch ETA {left:.0f} s | run ETA {duration(whole)}", flush=True)

        return say

    def evaluate(self, last: bool = True) -> dict[str, EvalAccumulator]:
        """Evaluate every view on each held-out split (test, val, test distributions); each sample counts once
        over all workers. The method's test-time steps (``eval.test_time``: at the ``last`` evaluation, at
        ``every`` one, or ``off``) first learn their views on each test split's unlabelled images
        (:mod:`rayexperts.engine.test_time`); those views are transductive."""
        from rayexperts.engine.test_time import learn_views

        sync_buffers(self.model)
        when = str(self.cfg.eval.test_time)
        learn = when == "every" or (when == "last" and last)
        sources = self.eval_sources()
        out = {}
        for prefix, loader in self.eval_loaders.items():
            steps = self.method.test_time_steps() if learn and not prefix.startswith("val_") else {}
            extra = learn_views(self, steps, sources[prefix]) if steps else {}
            out[prefix] = evaluate(self.method, self.eval_model, loader, self.opts, extra)
        return out

    def result_rows(self, epoch: int, accs: dict[str, EvalAccumulator], train_stats: dict[str, float]):
        """One metrics row per view, and the per-class table of this evaluation."""
        now = time.time()
        rows = []
        test = accs[""]
        transductive = [v for v in test.views if v not in self.views]  # learnt on the test images
        primary = self.method.primary_view_for(self.cfg)
        for view in [*self.views, *transductive]:
            row: dict[str, Any] = {"epoch": epoch, "view": view, "transductive": view in transductive}
            for prefix, acc in accs.items():
                if view in acc.views:
                    row.update(acc.summary(view, self.groups, prefix))
                if view == "ensemble":
                    row.update(acc.expert_kl_summary(self.groups, prefix))
                if view == primary:
                    for name in acc.stats:
                        row.update(acc.stat_summary(name, self.groups, prefix))
            row.update(train_stats)
            row.update(timestamp=now, workers=self.world, torch_threads=torch.get_num_threads())
            rows.append(row)
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
                for view in [*self.views, *transductive]
            ],
            ignore_index=True,
        )
        return rows, classes


def local_device(use_cuda: bool = True) -> torch.device:
    """This process's device: the current CUDA device with its explicit index (GPU finding F15) when ``use_cuda``
    and CUDA is available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda and torch.cuda.is_available() \
        else torch.device("cpu")


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """GPU finding F12. On CUDA: ``cudnn.benchmark`` for the static training shapes (faster kernels, not bit-stable),
    or with ``train.deterministic`` deterministic kernels (``cudnn.deterministic``, ``use_deterministic_algorithms``
    warn-only): exact resume is promised on the CPU, and on a GPU only with that switch."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def compile_mode(cfg: DictConfig, device: torch.device, mutates_buffers: bool) -> str | None:
    """The ``torch.compile`` mode of ``train.compile``/``train.compile_mode``, or None for no compilation:
    auto compiles on CUDA only (on CPU the warm-up outweighed the gain); mode auto uses CUDA graphs
    (``reduce-overhead``) on CUDA unless the forward pass updates buffers (MoCo queues)."""
    on = cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")
    if not on:
        return None
    if cfg.train.compile_mode != "auto":
        return str(cfg.train.compile_mode)
    return "reduce-overhead" if device.type == "cuda" and not mutates_buffers else "default"


def sync_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm statistics, MoCo queues) before evaluating,
    so N workers evaluate exactly the model that rank 0 checkpoints."""
    if is_distributed():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


def time_left(step: int, steps: int, epoch: int, epochs: int, seconds_per_step: float) -> tuple[float, float]:
    """(seconds left in epoch ``epoch``, 0-based, after ``step`` of its ``steps``; seconds left in the run: that
    and every later epoch's ``steps``), at ``seconds_per_step``."""
    epoch_left = (steps - step) * seconds_per_step
    return epoch_left, epoch_left + (epochs - epoch - 1) * steps * seconds_per_step


def duration(seconds: float) -> str:
    """A time left for people: ``45 s``, ``12.5 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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
