"""Data that lives on the device (``data.cache``; issue 15): a split decoded once into one ``uint8``
tensor, batches gathered by index and augmented there, a batch at a time (:mod:`rayexperts.data.batched`).

``data.cache``: ``device`` (the tensor on the training device), ``host`` (in host memory, each batch
copied to the device before its augmentation), ``off`` (the per-image DataLoader path) or ``auto``:
``device`` when every image has the same size and the decoded training, validation and test images
fit in ``data.cache_limit_mb``, else ``off``. The sampler (and so every guarantee about which images an
epoch and a worker see) is the per-image path's own :class:`~rayexperts.data.samplers.EpochSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rayexperts.data.batched import BatchPipeline, BatchRng
from rayexperts.data.errors import DataError
from rayexperts.data.lt_dataset import LTDataset
from rayexperts.data.samplers import EpochDraws, EpochSampler
from rayexperts.data.sources import ArraySource, ImageSource

CACHE_MODES = ("auto", "device", "host", "off")


def _image_shape(source: ImageSource) -> tuple[int, int, int]:
    if isinstance(source, ArraySource):
        return tuple(source.images.shape[1:])  # type: ignore[return-value]
    img, _ = source[0]
    if isinstance(img, Tensor):
        return tuple(img.shape)  # type: ignore[return-value]
    return (len(img.getbands()), img.height, img.width)


def decoded(source: ImageSource, where: str) -> np.ndarray:
    """Every image of ``source`` as ``uint8 [N, C, H, W]``; a source of mixed sizes is a :class:`DataError`."""
    if isinstance(source, ArraySource):
        return source.images
    first = _image_shape(source)
    out = np.empty((len(source), *first), dtype=np.uint8)
    for i in range(len(source)):
        img, _ = source[i]
        arr = np.asarray(img.numpy() if isinstance(img, Tensor) else img)
        arr = arr.transpose(2, 0, 1) if arr.ndim == 3 and not isinstance(img, Tensor) else arr
        if arr.shape != first:
            raise DataError(f"{where}: {source.describe(i)} is {arr.shape[1:]}, the first image {first[1:]}: "
                            "images of mixed sizes cannot be cached (data.cache=off)")
        out[i] = arr
    return out


@dataclass(frozen=True)
class CachePlan:
    mode: str  # device | host | off
    why: str
    megabytes: float


def plan_cache(data: LTDataset, mode: str, limit_mb: float) -> CachePlan:
    """What ``data.cache=mode`` means for ``data``: ``auto`` picks by size and says why."""
    if mode not in CACHE_MODES:
        raise DataError(f"unknown data.cache={mode!r}: choose one of {', '.join(CACHE_MODES)}")
    splits = [s for s in (data.train, data.val, data.test) if s is not None]
    shapes = {_image_shape(s) for s in splits}
    images = sum(len(s) for s in splits)
    mb = images * math.prod(next(iter(shapes))) / 2**20
    size = f"{images} images, {mb:.1f} MB decoded"
    if mode == "off":
        return CachePlan("off", "data.cache=off", mb)
    uniform = len(shapes) == 1 and all(isinstance(s, ArraySource) or len(s) < 2 or _same_size(s) for s in splits)
    if mode in ("device", "host"):
        if not uniform:
            raise DataError(f"data.cache={mode}: the images of {data.name} differ in size; use data.cache=off")
        return CachePlan(mode, f"data.cache={mode}", mb)
    if not uniform:
        return CachePlan("off", "images of several sizes", mb)
    if mb > limit_mb:
        return CachePlan("off", f"{size} > data.cache_limit_mb={limit_mb:g}", mb)
    return CachePlan("device", f"{size} <= data.cache_limit_mb={limit_mb:g}", mb)


def _same_size(source: ImageSource, probes: int = 8) -> bool:
    """Spot check: the first and a few evenly spaced images have the first image's size."""
    first = _image_shape(source)
    for i in np.linspace(0, len(source) - 1, probes).astype(int)[1:]:
        img, _ = source[int(i)]
        shape = tuple(img.shape) if isinstance(img, Tensor) else (len(img.getbands()), img.height, img.width)
        if shape != first:
            return False
    return True


class CachedSplit:
    """One split as ``uint8 [N, C, H, W]`` and ``int64 [N]`` labels, in host memory or on ``device``."""

    def __init__(self, source: ImageSource, where: str, device: torch.device, on_device: bool) -> None:
        images = torch.from_numpy(np.ascontiguousarray(decoded(source, where)))
        labels = torch.as_tensor(source.labels, dtype=torch.long)
        target = device if on_device else torch.device("cpu")
        if target.type == "cuda" or (not on_device and device.type == "cuda"):
            images = images.to(target) if on_device else images.pin_memory()
        self.images, self.labels, self.device = images, labels.to(images.device), device

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The images (on the training device) and labels of ``index``."""
        index = index.to(self.images.device)
        images, labels = self.images[index], self.labels[index]
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class DeviceLoader(EpochDraws):
    """Batches of a cached split, augmented on the device: the training split in the order of an
    :class:`EpochSampler` (``drop_last``), or an evaluation shard in order. Yields ``(x, y)``, or
    ``(x_query, x_key, y)`` with a ``key`` pipeline (both views from the same images)."""

    def __init__(self, split: CachedSplit, batch_size: int, transform: BatchPipeline, *,
                 sampler: EpochSampler | None = None, indices: Tensor | None = None,
                 key: BatchPipeline | None = None) -> None:
        if (sampler is None) == (indices is None):
            raise ValueError("give a sampler (training) or the indices of an evaluation shard")
        self.split, self.batch_size, self.transform, self.key = split, batch_size, transform, key
        self.sampler, self.indices = sampler, indices
        self.seed = 0

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.indices) / self.batch_size)  # type: ignore[arg-type]

    def index_batches(self) -> Iterator[Tensor]:
        """The split's indices of each batch of this epoch (the sampler's order, or the shard's)."""
        order = torch.as_tensor(list(self.sampler)) if self.sampler is not None else self.indices
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        rng = BatchRng(self.seed, self.split.device)
        for index in self.index_batches():
            images, labels = self.split.batch(index)
            x = self.transform(images, rng)
            yield (x, self.key(images, rng), labels) if self.key is not None else (x, labels)
