"""A trained run as a ``torch.nn.Module``: ``rayexperts.load(run_dir, view=None, checkpoint="last")``.

The module maps a batch of preprocessed images to one view's logits, computing the view exactly as the
run's evaluation did (``rayexperts.engine.loop.evaluate``): the method's :meth:`~rayexperts.methods.base.Method.infer`
on the trained model, then the view's function of its output (an expert, the ensemble mean, PC softmax, a
prior adjustment, RIDE's router, CBD's student), in float32, in the run's memory format, averaged with the
mirror image under ``eval.tta_flip``. Views learnt on the unlabelled test set at evaluation (SADE's
``tta_aggregate``, docs/methods.md §3.4) are not in the checkpoint: they are refused here, and
``rayexperts eval`` re-learns them.

Nothing here needs the training data: the class names and training counts come from the run's
``classes.parquet`` (the PC views and the shot groups need the counts), the image kind from the data set's
name (only ``imagefolder`` and ``parquet`` read their data to learn it).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rayexperts.config import is_uri
from rayexperts.errors import ConfigError
from rayexperts.rundir import CHECKPOINT_FILE, RunDir

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from rayexperts.methods.base import Method

SELECTIONS = {"last": "last", "best_test": "best_test (selected on the test set)"}
# The image kind (the test transform's family) of the data sets whose name says it; others read their data.
IMAGE_KINDS = {"digits-lt": "digits", "cifar10-lt": "cifar", "cifar100-lt": "cifar", "imagenet-lt": "imagenet",
               "places-lt": "imagenet", "inat2018": "imagenet"}


@dataclass
class RunSpec:
    """What :func:`load` will build, resolved without building it (the CLI checks bad input with this before
    Ray starts): the run, its config, the view, the checkpoint directory and its label."""

    run: RunDir
    cfg: DictConfig
    view: str
    views: list[str]  # every view the module can compute (the method's, without test-time ones)
    checkpoint: RunDir
    selection: str  # "last", "best_test (selected on the test set)" or the checkpoint directory's name
    classes: list[str]
    train_counts: list[int]
    config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _method(cfg: DictConfig, counts: list[int], in_channels: int) -> Method:
    from rayexperts.methods import METHODS

    return METHODS.get(cfg.method)(cfg, torch.tensor(counts, dtype=torch.float32), in_channels)


def in_channels(cfg: DictConfig) -> int:
    from rayexperts.registry import DATASETS

    return int(DATASETS.get(str(cfg.data.name)).in_channels)


def image_kind(cfg: DictConfig) -> str:
    """digits | cifar | imagenet: the family of the run's test transform."""
    name = str(cfg.data.name)
    if name in IMAGE_KINDS:
        return IMAGE_KINDS[name]
    from rayexperts.data import build_dataset

    return build_dataset(cfg.data).image_kind


def run_classes(run: RunDir) -> tuple[list[str], list[int]]:
    """The run's class names and training counts (``classes.parquet``, in class order)."""
    table = run.read_table("classes.parquet")
    if table is None or table.empty:
        raise ConfigError(f"run directory {run} has no classes.parquet: it was never evaluated (train it first)")
    first = table[table["view"] == table["view"].iloc[0]]
    if "epoch" in first:
        first = first[first["epoch"] == first["epoch"].max()]
    first = first.sort_values("class_id")
    names = [str(c) for c in first["class_name"]] if "class_name" in first else [str(c) for c in first["class_id"]]
    return names, [int(n) for n in first["train_count"]]


def _checkpoints(run: RunDir) -> list[RunDir]:
    import pyarrow.fs as pafs

    if not run.exists():
        return []
    names = sorted(i.base_name for i in run.fs.get_file_info(pafs.FileSelector(run.path))
                   if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory)
    return [run.child(n) for n in names if run.child(n).is_file(CHECKPOINT_FILE)]


def _checkpoint_epoch(ckpt: RunDir) -> int:
    """The number of epochs a checkpoint holds (its ``epoch``)."""
    return int(_read_state(ckpt)["epoch"])


def _read_state(ckpt: RunDir, ident: dict[str, Any] | None = None) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import pyarrow.fs as pafs

    from rayexperts.rundir import load_checkpoint

    if ckpt.is_local:
        return load_checkpoint(ckpt.path, ident)
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(f"{ckpt.path}/{CHECKPOINT_FILE}", str(Path(tmp) / CHECKPOINT_FILE),
                        source_filesystem=ckpt.fs, destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(tmp, ident)


def select_checkpoint(run: RunDir, view: str, checkpoint: str) -> tuple[RunDir, str]:
    """The checkpoint directory ``checkpoint`` names (``last``; ``best_test``: the epoch of ``view``'s best test
    top-1, the earliest on a tie, as ``rayexperts.analysis.select_epochs``; or a ``checkpoint_*`` directory name)
    and its label."""
    if checkpoint == "last":
        latest = run.latest_checkpoint()
        if latest is None:
            raise ConfigError(f"run directory {run} has no checkpoint (checkpoint_*/{CHECKPOINT_FILE}): train it first")
        return latest, SELECTIONS["last"]
    if checkpoint == "best_test":
        from rayexperts.analysis import select_epochs

        metrics = run.read_table("metrics.parquet")
        if metrics is None or view not in set(metrics["view"]):
            raise ConfigError(f"checkpoint=best_test: run directory {run} has no metrics of view {view}")
        metrics = metrics.assign(run=run.uri)
        epoch = int(select_epochs(metrics[metrics["view"] == view], "best_test")["epoch"].iloc[0])
        kept = {_checkpoint_epoch(c): c for c in _checkpoints(run)}
        if epoch + 1 not in kept:
            have = ", ".join(str(e) for e in sorted(kept)) or "none"
            raise ConfigError(f"checkpoint=best_test: view {view}'s best test epoch is {epoch + 1} but run directory "
                              f"{run} keeps checkpoints of epochs {have} only (run.num_to_keep)")
        return kept[epoch + 1], SELECTIONS["best_test"]
    if checkpoint.startswith("checkpoint_") and run.child(checkpoint).is_file(CHECKPOINT_FILE):
        return run.child(checkpoint), checkpoint
    names = ", ".join(c.uri.rsplit("/", 1)[-1] for c in _checkpoints(run))
    raise ConfigError(f"checkpoint={checkpoint!r}: choose last, best_test or a checkpoint directory of {run} "
                      f"({names or 'none'})")


def resolve(run_dir: str, view: str | None = None, checkpoint: str = "last") -> RunSpec:
    """Check ``run_dir``, ``view`` and ``checkpoint`` (one-line :class:`ConfigError` on bad input) without
    building the model."""
    run = RunDir(str(run_dir))
    if not is_uri(run.uri) and not run.exists():
        raise ConfigError(f"run directory {run_dir} does not exist")
    cfg = run.config()
    if cfg is None:
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); an ensemble job's runs are in its "
                          "teachers/ and student/ folders")
    from rayexperts.methods import METHODS

    method_cls = METHODS.get(cfg.method)
    classes, counts = run_classes(run)
    method = _method(cfg, counts, in_channels(cfg))
    views = [v for v in method.view_names()]
    learnt = list(method.test_time_steps())
    view = view or method_cls.primary_view
    if view in learnt:
        raise ConfigError(f"view {view} of run {run_dir} is learnt on the unlabelled test set at evaluation "
                          "(transductive) and its weights are not saved in the checkpoint: `rayexperts eval RUN_DIR` "
                          f"re-learns and evaluates it; load, predict, export and serve take {', '.join(views)}")
    if view not in views:
        from rayexperts.registry import did_you_mean

        raise ConfigError(f"unknown view {view!r} of run {run_dir} (method {cfg.method}){did_you_mean(view, views)}; "
                          f"views: {', '.join(views)}")
    ckpt, label = select_checkpoint(run, view, checkpoint)
    text = run.read_text("config.yaml")
    return RunSpec(run, cfg, view, views, ckpt, label, classes, counts, hashlib.sha256(text.encode()).hexdigest())


# ----------------------------------------------------------------------------------------------- preprocessing


class Preprocess:
    """The run's evaluation transform (``rayexperts.data.build_transform(kind, "none", train=False, ...)``) for
    one image: encoded bytes (JPEG, PNG, ...), a PIL image, a uint8 ``[C, H, W]`` tensor or array → a float
    ``[C, H, W]`` tensor. Encoded images and PIL images are converted to the run's channels (RGB, or L for the
    1-channel digits) as ``rayexperts.data.sources.decode_image`` does. Picklable (Ray tasks carry it)."""

    def __init__(self, image_kind: str, image_size: int, channels: int, options: dict[str, Any],
                 augment: str = "none") -> None:
        self.image_kind, self.image_size, self.channels = image_kind, image_size, channels
        self.options, self.augment = dict(options), augment
        self._transform = None

    @classmethod
    def of(cls, cfg: DictConfig, kind: str | None = None, model_data: dict[str, Any] | None = None) -> Preprocess:
        """The test view the run evaluated with: ``data.augment``'s (``recipes.TEST_VIEWS``, else "none"), with the
        options training used (``engine.loaders.augment_options``: a timm backbone's own mean, std, crop and
        interpolation from ``model_data`` where the config leaves them to the model)."""
        from rayexperts.engine.loaders import augment_options

        opts = augment_options(cfg, model_data, in_channels(cfg))
        options = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(opts).items()}
        return cls(kind or image_kind(cfg), int(cfg.data.image_size), in_channels(cfg), options, str(cfg.data.augment))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None}

    @property
    def transform(self):
        if self._transform is None:
            from rayexperts.data.augment.per_image import build_transform
            from rayexperts.data.augment.recipes import AugmentOptions

            self._transform = build_transform(self.image_kind, self.augment, train=False,
                                              image_size=self.image_size, options=AugmentOptions(**self.options))
        return self._transform

    def describe(self) -> dict[str, Any]:
        """What the transform does, for ``export.json`` (so a consumer without rayexperts can redo it)."""
        from rayexperts.data.augment.recipes import AugmentOptions, recipe, view_side

        resolved = recipe(self.image_kind, self.augment, train=False, image_size=self.image_size,
                          options=AugmentOptions(**self.options))
        mean, std = resolved.norm.params["mean"], resolved.norm.params["std"]
        steps = [f"decode, convert to {'L' if self.channels == 1 else 'RGB'}"]
        for op in resolved.steps:
            if op.name == "resize_centre_crop":
                steps += [f"resize shorter side to {op.params['resize']} ({op.params.get('interpolation', 'bilinear')}"
                          f", antialias)", f"center crop {op.params['size']}"]
            else:
                steps.append(f"{op.name} {dict(op.params)}")
        steps += ["x / 255", "(x - mean) / std per channel"]
        return {"image_kind": self.image_kind, "image_size": view_side(resolved, self.image_kind, self.image_size),
                "channels": self.channels, "mean": list(mean), "std": list(std), "layout": "NCHW float32",
                "steps": steps, "options": self.options}

    def decode(self, data: bytes):
        """Encoded bytes → a PIL image in the run's channels (``OSError``/``ValueError`` when unreadable)."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.convert("L" if self.channels == 1 else "RGB")

    def __call__(self, image: Any) -> Tensor:
        import numpy as np
        import torch

        if isinstance(image, (bytes, bytearray, memoryview)):
            image = self.decode(bytes(image))
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        if hasattr(image, "convert") and not isinstance(image, torch.Tensor):  # a PIL image
            image = image.convert("L" if self.channels == 1 else "RGB")
        return self.transform(image)


# ----------------------------------------------------------------------------------------------- the module


def _held_modules(method: Method) -> list[nn.Module]:
    """Modules the method holds outside the trained model that its views read (CBD's frozen teachers)."""
    from torch import nn

    held: list[nn.Module] = []
    for value in vars(method).values():
        if isinstance(value, nn.Module):
            held.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, nn.Module) for v in value):
            held.extend(value)
    return held


class LoadedModel(nn.Module):
    """Preprocessed images ``[B, C, H, W]`` → the view's logits ``[B, num_classes]`` (float32), as the run's
    evaluation computed them (``rayexperts.engine.loop.evaluate``)."""

    def __init__(self, method: Method, model: nn.Module, spec: RunSpec, epoch: int, every_view: bool,
                 preprocess: Preprocess, channels_last: bool, tta_flip: bool) -> None:
        super().__init__()
        self.model = model
        self.held = nn.ModuleList(_held_modules(method))
        self._method = method
        self.spec = spec
        self.view, self.config, self.classes = spec.view, spec.cfg, list(spec.classes)
        self.selection, self.epoch, self.run_dir = spec.selection, epoch, spec.run.uri
        self.checkpoint_dir = spec.checkpoint.uri
        self.preprocess = preprocess
        self.every_view = every_view
        self.channels_last, self.tta_flip = channels_last, tta_flip

    def _apply(self, fn, recurse=True):  # .to(device) also moves what the method holds (class counts, prior)
        super()._apply(fn, recurse)
        p = next(self.model.parameters(), None)
        if p is not None:
            self._method.setup(p.device, self._format())
        return self

    def _format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _views(self, images: Tensor, names: list[str]) -> dict[str, Tensor]:
        with torch.autocast(images.device.type, enabled=False):  # GPU finding F7: evaluation in float32
            x = images.contiguous(memory_format=self._format()) if images.dim() == 4 else images
            views = self._method.views()
            out = self._method.infer(self.model, x)
            logits = {n: views[n](out).float() for n in names}
            if self.tta_flip:  # eval.tta_flip: the mean of the image's and its mirror image's logits
                flipped = self._method.infer(self.model, x.flip(-1))
                logits = {n: (z + views[n](flipped).float()) / 2 for n, z in logits.items()}
        return logits

    def forward(self, images: Tensor) -> Tensor:
        return self._views(images, [self.view])[self.view]

    def all_views(self, images: Tensor) -> dict[str, Tensor]:
        """Every view's logits (not the test-time ones); CBD's teacher views need ``load(..., every_view=True)``."""
        return self._views(images, self.spec.views if self.every_view or self.view != "student" else [self.view])


def load(run_dir: str, view: str | None = None, checkpoint: str = "last", *, device: str | torch.device = "cpu",
         every_view: bool = False) -> LoadedModel:
    """The trained model of ``run_dir`` as a module computing ``view`` (default: the method's primary view) from
    preprocessed images, with ``.preprocess``, ``.classes``, ``.view``, ``.config``, ``.selection`` (``last`` or
    ``best_test (selected on the test set)``), ``.epoch`` (epochs trained, 1-based) and ``.all_views(images)``.
    ``checkpoint``: ``last``, ``best_test`` or a ``checkpoint_*`` directory. In eval mode, without gradients."""
    return build(resolve(run_dir, view, checkpoint), device=device, every_view=every_view)


def build(spec: RunSpec, state: dict[str, Tensor] | None = None, epoch: int = 0, *,
          device: str | torch.device = "cpu", every_view: bool = False, weights: bool = True) -> LoadedModel:
    """:func:`load` from a resolved :class:`RunSpec`; ``state`` (the model's state dict, trained ``epoch`` epochs)
    replaces the checkpoint's; ``weights=False``: the newly built model's (a caller loads them)."""
    from rayexperts.rundir import identity, load_model_state

    cfg = spec.cfg
    channels = in_channels(cfg)
    method = _method(cfg, spec.train_counts, channels)
    with torch.random.fork_rng(devices=[]):
        model = method.build_model()
    if state is None and weights:
        saved = _read_state(spec.checkpoint, identity(cfg, len(spec.classes)))
        state, epoch = saved["model"], int(saved["epoch"])
    if state is not None:
        load_model_state(model, state)
    # CBD's student view is the student alone (methods/cbd.py ``views``): its frozen teachers stay out of the
    # module unless every view is asked for.
    dropped = not every_view and spec.view == "student" and hasattr(method, "_teachers")
    if dropped:
        method._teachers = []
    from rayexperts.engine.loop import LoopOptions

    opts = LoopOptions.from_config(cfg, torch.device(device))
    from rayexperts.models.backbones import timm_data_config

    module = LoadedModel(method, model, spec, epoch, every_view, Preprocess.of(cfg, model_data=timm_data_config(model)),
                         opts.channels_last, opts.tta_flip)
    module.requires_grad_(False)
    module.to(device=torch.device(device), memory_format=opts.memory_format)
    return module.eval()
