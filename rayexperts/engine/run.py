"""One worker's run in plain PyTorch (no Ray here): its state, built from the resolved config: data set →
method → model (on this worker's device) → optimizer and schedule → loaders. What is done with it lives beside
it: one epoch and the evaluation in :mod:`rayexperts.engine.loop`, the epoch loop in :mod:`rayexperts.engine.fit`,
the rows in :mod:`rayexperts.engine.results`, the Ray adapters in :mod:`rayexperts.engine.entry`."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from rayexperts.data import build_dataset
from rayexperts.engine.loaders import Loaders, model_mean_std
from rayexperts.engine.loop import LoopOptions
from rayexperts.engine.mixup import Mixup
from rayexperts.engine.schedule import StepSchedule, build_optimizer
from rayexperts.methods import METHODS, Method
from rayexperts.models.backbones import timm_data_config
from rayexperts.models.finetune import optimizer_groups, parameter_counts
from rayexperts.rundir import identity


class Run:
    """One worker's training run (worker ``rank`` of ``world``, on ``device``): ``data``, ``method``, ``model``
    (``eval_model``: the same parameters, never compiled or wrapped), ``optimizer``, ``lr_at`` (the schedule),
    ``loaders`` (``train_loader``, ``eval_loaders``, ``sampler``, ``cache``), ``opts`` (how the loop runs), and
    ``mixup`` (the current epoch's, set by :func:`rayexperts.engine.loop.seed_epoch`)."""

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
        self.model_data = timm_data_config(model)  # a timm backbone's own preprocessing (docs/pretrained.md)
        if rank == 0 and cfg.run.verbose:
            self._describe()
        self.lr_at = StepSchedule(cfg.train)
        self.views = self.method.view_names()
        self.ident = identity(cfg, self.data.num_classes)
        self.mixup: Mixup | None = None
        self.loaders = Loaders(cfg, self.data, self.method, self.device, rank, world, self.model_data)
        self.sampler, self.cache = self.loaders.sampler, self.loaders.cache
        self.train_loader, self.eval_loaders = self.loaders.train, self.loaders.evaluation

    def _describe(self) -> None:
        """Rank 0's lines about the model: its parameters, and a timm backbone's own preprocessing."""
        cfg, model, md = self.cfg, self.model, self.model_data
        trainable, frozen = parameter_counts(model)
        print(f"{cfg.run.name} | parameters: {trainable} trainable, {frozen} frozen "
              f"(model.finetune={cfg.model.finetune})", flush=True)
        if md:
            own = model_mean_std(md, self.data.in_channels)
            print(f"{cfg.run.name} | {cfg.model.backbone} preprocessing: input {'x'.join(map(str, md['input_size']))}, "
                  f"mean {tuple(round(v, 4) for v in md['mean'])}, std {tuple(round(v, 4) for v in md['std'])}, "
                  f"{md['interpolation']}, crop_pct {md['crop_pct']}; used here: data.image_size={cfg.data.image_size}, "
                  f"mean/std {'data.mean/data.std' if cfg.data.mean else 'the model’s' if own else 'the data set’s'}",
                  flush=True)

    def compile(self) -> None:
        """``torch.compile`` the model for training when ``train.compile`` says so (after any DDP wrapper);
        evaluation keeps the plain module (the same parameters), so its other batch shapes recompile nothing."""
        mode = compile_mode(self.cfg, self.device, self.method.uses_key_view)
        if mode is not None:
            self.model = torch.compile(self.model, mode=mode)


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
