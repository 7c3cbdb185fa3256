"""A run's loaders: the training loader (its sampler, the ``data.cache`` plan), one evaluation loader per held-out
split, and the test-time steps' batches (``data.cache``: docs/configs.md "Key reference", docs/gpu.md).

Three paths, picked by :class:`Loaders` from ``data.cache`` and ``data.decode``: each split decoded once into a
uint8 tensor and augmented a batch at a time (on the device or in host memory); files read by DataLoader workers
and decoded a batch at a time on the device; or a DataLoader applying the per-image transforms.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from rayexperts.data import EpochSampler, TransformedDataset, TwoView, build_transform, moco_transform
from rayexperts.data.augment.batched.pipelines import batch_moco_transform, batch_transform
from rayexperts.data.augment.recipes import AugmentOptions
from rayexperts.data.device import CachedSplit, DeviceLoader, plan_cache, processes_per_device
from rayexperts.data.encoded import EncodedLoader
from rayexperts.data.lt_dataset import LTDataset
from rayexperts.data.sources import ArraySource
from rayexperts.engine.loop import epoch_seed
from rayexperts.methods.base import Method


def model_mean_std(model_data: dict[str, Any] | None,
                   in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """A timm backbone's own mean and std (``model_data``), where it has one value per channel of the images."""
    if not model_data or len(model_data["mean"]) != in_channels:
        return None
    return tuple(float(v) for v in model_data["mean"]), tuple(float(v) for v in model_data["std"])


def augment_options(cfg: DictConfig, model_data: dict[str, Any] | None, in_channels: int) -> AugmentOptions:
    """The recipe switches of a run's ``data.*`` keys, with a timm backbone's own mean, std, test crop and
    interpolation (``model_data``) where the config leaves them to the model (docs/pretrained.md "Preprocessing").
    Training, evaluation and a loaded run (``rayexperts.inference``) all build their views from this."""
    d, md = cfg.data, model_data or {}
    mean_std = (tuple(d.mean), tuple(d.std)) if d.mean else model_mean_std(md, in_channels) or (None, None)
    crop = float(d.crop_pct) or float(md.get("crop_pct", 224 / 256))
    mode = str(d.interpolation) if d.interpolation != "auto" else str(md.get("interpolation", "bilinear"))
    return AugmentOptions(autoaugment_fill=int(d.autoaugment_fill), cutout_fill=str(d.cutout_fill),
                          crop_scale_min=float(d.crop_scale_min), normalize=str(d.normalize),
                          mean=mean_std[0], std=mean_std[1], crop_pct=crop,
                          interpolation=mode if mode in ("bilinear", "bicubic") else "bilinear")


class Loaders:
    """The loaders of one worker (``rank`` of ``world``) of a run of ``cfg`` on ``data``: ``train`` (in
    ``sampler``'s order, ``train.batch_size / world`` a batch) and ``evaluation`` (this worker's shard of each
    held-out split, by metrics prefix: :meth:`sources`). ``model_data`` is a timm backbone's own preprocessing
    (mean, std, crop, interpolation: docs/pretrained.md), or None."""

    def __init__(self, cfg: DictConfig, data: LTDataset, method: Method, device: torch.device, rank: int = 0,
                 world: int = 1, model_data: dict[str, Any] | None = None) -> None:
        self.cfg, self.data, self.method, self.device = cfg, data, method, device
        self.rank, self.world, self.model_data = rank, world, model_data or {}
        self._sources: dict[str, Any] | None = None
        self._test_caches: dict[int, CachedSplit] = {}
        sampler_kind = cfg.data.sampler if cfg.data.sampler != "auto" else method.sampler
        self.sampler = EpochSampler(data.train.labels, sampler_kind, world, rank, cfg.seed,
                                    drop_last=bool(cfg.data.drop_last))
        # GPU finding F6: every process on this GPU holds its own cache (a fractional share packs several).
        sharing = processes_per_device(float(cfg.scaling.gpus_per_worker), bool(cfg.scaling.use_gpu),
                                       int(cfg.tune.seeds_per_config))  # a sweep trial trains its seeds in one process
        self.cache = plan_cache(data, str(cfg.data.cache), float(cfg.data.cache_limit_mb), device=device,
                                sharing=sharing)
        if rank == 0 and cfg.run.verbose:
            print(f"{cfg.run.name} | data.cache={cfg.data.cache}: {self.cache.mode} ({self.cache.why})", flush=True)
        decode = str(cfg.data.decode)
        encoded = not isinstance(data.train, ArraySource)
        if self.cache.mode == "off" and encoded and (decode == "device" or (decode == "auto" and device.type == "cuda")):
            self._encoded_loaders()
        elif self.cache.mode == "off":
            self._image_loaders()
        else:
            self._cached_loaders(on_device=self.cache.mode == "device")

    # -- what the loaders apply ---------------------------------------------------------------
    def transforms(self, batched: bool):
        """(train, key view or None, test) transforms of this run's ``data.*`` settings (the test view: that of
        ``data.augment``, ``recipes.TEST_VIEWS``): the batched twins (``rayexperts.data.augment.batched``) or the
        per-image ones (``rayexperts.data.augment.per_image``)."""
        d, kind, size = self.cfg.data, self.data.image_kind, int(self.cfg.data.image_size)
        opts = self.augment_options()
        make, moco = (batch_transform, batch_moco_transform) if batched else (build_transform, moco_transform)
        train = make(kind, str(d.augment), train=True, image_size=size, options=opts)
        key = None
        if self.method.uses_key_view:
            key = train if d.key_augment == "same" else moco(kind, size, blur=d.key_augment == "moco_blur", options=opts)
        test = make(kind, str(d.augment), train=False, image_size=size, options=opts)
        return train, key, test

    def augment_options(self) -> AugmentOptions:
        return augment_options(self.cfg, self.model_data, self.data.in_channels)

    def model_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return model_mean_std(self.model_data, self.data.in_channels)

    def sources(self) -> dict[str, Any]:
        """The held-out splits by metrics prefix: the test split (``""``), the validation split (``val_``) and each
        test distribution of ``eval.test_distributions`` carved from the test split (``forward50_``, ...)."""
        from rayexperts.data.imbalance import test_distribution_indices
        from rayexperts.data.sources import subset

        if self._sources is None:
            out = {"": self.data.test}
            if self.data.val is not None:
                out["val_"] = self.data.val
            for name in self.cfg.eval.test_distributions:
                out[f"{name}_"] = subset(self.data.test, test_distribution_indices(self.data.test.labels, str(name)))
            self._sources = out
        return self._sources

    # -- the test-time steps' batches ---------------------------------------------------------
    def test_time_batches(self, source, augment: str, batch_size: int, number: int):
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

    # -- the three paths ----------------------------------------------------------------------
    def _cached_loaders(self, on_device: bool) -> None:
        """Each split decoded once into a uint8 tensor (on the device or in host memory); batches are
        gathered in the sampler's order and augmented a batch at a time (``rayexperts.data.augment.batched``)."""
        cfg, data = self.cfg, self.data
        train_t, key, test_t = self.transforms(batched=True)
        split = CachedSplit(data.train, f"the train split of {data.name}", self.device, on_device)
        self.train = DeviceLoader(split, int(cfg.train.batch_size) // self.world, train_t, sampler=self.sampler, key=key)
        self.evaluation = {}
        for prefix, source in self.sources().items():
            cached = CachedSplit(source, f"a held-out split of {data.name}", self.device, on_device)
            shard = torch.arange(self.rank, len(source), self.world)
            self.evaluation[prefix] = DeviceLoader(cached, int(cfg.data.test_batch_size), test_t, indices=shard)

    def _encoded_loaders(self) -> None:
        """Files read by DataLoader workers, decoded a batch at a time on the device, augmented there."""
        cfg, data, nw = self.cfg, self.data, int(self.cfg.data.num_workers)
        size = int(cfg.data.image_size)
        train_t, key, test_t = self.transforms(batched=True)
        self.train = EncodedLoader(data.train, int(cfg.train.batch_size) // self.world, train_t, self.device,
                                   image_size=size, train=True, sampler=self.sampler, key=key, num_workers=nw)
        self.evaluation = {
            prefix: EncodedLoader(source, int(cfg.data.test_batch_size), test_t, self.device, image_size=size,
                                  train=False, indices=list(range(self.rank, len(source), self.world)), num_workers=nw,
                                  options=self.augment_options())
            for prefix, source in self.sources().items()
        }

    def _image_loaders(self) -> None:
        """The per-image path: a DataLoader applying ``per_image.build_transform`` to one image at a time."""
        cfg = self.cfg
        train_t, key_t, test_t = self.transforms(batched=False)
        if key_t is not None:
            train_t = TwoView(train_t, key_t)
        pin = self.device.type == "cuda"
        nw = int(cfg.data.num_workers)
        self.train = DataLoader(
            TransformedDataset(self.data.train, train_t),
            batch_size=int(cfg.train.batch_size) // self.world,
            sampler=self.sampler,
            num_workers=nw,
            pin_memory=pin,
            drop_last=self.sampler.drop_last,
            persistent_workers=nw > 0,
        )
        self.evaluation = {prefix: self._shard_loader(source, test_t) for prefix, source in self.sources().items()}

    def _shard_loader(self, source, transform) -> DataLoader:
        shard = Subset(TransformedDataset(source, transform), range(self.rank, len(source), self.world))
        return DataLoader(
            shard,
            batch_size=int(self.cfg.data.test_batch_size),
            num_workers=int(self.cfg.data.num_workers),
            pin_memory=self.device.type == "cuda",
        )
