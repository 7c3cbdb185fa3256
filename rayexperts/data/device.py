"""Data that lives on the device (``data.cache``; issue 15): a split decoded once into one ``uint8``
tensor, batches gathered by index and augmented there, a batch at a time (:mod:`rayexperts.data.augment.batched`).

``data.cache``: ``device`` (the tensor on the training device), ``host`` (in host memory, each batch
copied to the device before its augmentation), ``off`` (the per-image DataLoader path) or ``auto``:
``device`` when every image has the same size and the decoded training, validation and test images
fit in ``data.cache_limit_mb``, else ``off``; on CUDA, ``auto`` also checks the GPU's free memory for
every process that shares the GPU (GPU finding F6): ``device`` when that fits, else ``host`` when the
host has the room, else ``off``. The sampler (and so every guarantee about which images an
epoch and a worker see) is the per-image path's own :class:`~rayexperts.data.samplers.EpochSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rayexperts.data.augment.batched.core import BatchRng
from rayexperts.data.augment.batched.pipelines import BatchPipeline
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
    import time

    first = _image_shape(source)
    out = np.empty((len(source), *first), dtype=np.uint8)
    start = shown = time.perf_counter()
    for i in range(len(source)):
        if time.perf_counter() - shown >= 30:  # decoding a large split takes minutes: say where it is
            shown = time.perf_counter()
            rate = i / (shown - start)
            print(f"[data] {where}: decoded {i}/{len(source)} images, {rate:.0f}/s, ETA "
                  f"{(len(source) - i) / max(rate, 1e-9):.0f} s", flush=True)
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


# GPU finding F6: the decoded caches of every process on one GPU together may take this share of its free
# memory (the rest is the models', the activations', the compile workspace's and the CUDA contexts').
DEVICE_SHARE = 0.5


def processes_per_device(gpus_per_worker: float, use_gpu: bool = True, runs_per_process: int = 1) -> int:
    """How many caches share one GPU (GPU finding F6): ``floor(1 / scaling.gpus_per_worker)`` processes for a
    fraction (Tune trials, CBD teachers, one-worker runs packed onto one GPU), else one (each Ray Train
    worker has a GPU of its own), times ``runs_per_process`` (a sweep trial's ``tune.seeds_per_config`` runs,
    each with its own cache)."""
    g = float(gpus_per_worker)
    if not use_gpu:
        return 1
    return (max(1, math.floor(1 / g + 1e-9)) if 0 < g < 1 else 1) * max(1, int(runs_per_process))


def _mb(x: float) -> str:
    return f"{x:,.0f} MB" if x >= 100 else f"{x:.1f} MB"


def _host_available_mb() -> float:
    """The host memory available to new allocations (MB)."""
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:  # pragma: no cover - psutil comes with Ray
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def _device_room(mb: float, sharing: int, device: torch.device) -> tuple[bool, str]:
    """Whether ``sharing`` processes' caches of ``mb`` fit in :data:`DEVICE_SHARE` of ``device``'s free
    memory (``torch.cuda.mem_get_info``), and the sentence that says so."""
    free, _ = torch.cuda.mem_get_info(device)
    free_mb = free / 2**20
    need = mb * sharing
    share = f"{DEVICE_SHARE:.0%} of {_mb(free_mb)} free on {device}"
    who = f"{_mb(mb)} decoded × {sharing} process{'es' if sharing != 1 else ''}"
    if need <= DEVICE_SHARE * free_mb:
        return True, f"{who} fits in {share}"
    return False, f"{who} = {_mb(need)} > {share}"


def plan_cache(data: LTDataset, mode: str, limit_mb: float, *, device: torch.device | None = None,
               sharing: int = 1) -> CachePlan:
    """What ``data.cache=mode`` means for ``data``: ``auto`` picks by size and says why.

    On a CUDA ``device`` (GPU finding F6), ``sharing`` is the number of processes that hold a cache on
    that GPU (:func:`processes_per_device`): ``auto`` picks ``device`` when ``sharing`` caches fit in
    :data:`DEVICE_SHARE` of the free memory, else ``host`` when they fit in that share of the host's
    available memory, else ``off``; an explicit ``device`` that does not fit is a :class:`DataError`
    naming the sizes. Processes that start later see what earlier ones took: a plan is made at start.
    On a CPU the plan is the size rule alone."""
    if mode not in CACHE_MODES:
        raise DataError(f"unknown data.cache={mode!r}: choose one of {', '.join(CACHE_MODES)}")
    splits = [s for s in (data.train, data.val, data.test) if s is not None]
    shapes = {_image_shape(s) for s in splits}
    images = sum(len(s) for s in splits)
    mb = images * math.prod(next(iter(shapes))) / 2**20
    size = f"{images} images, {mb:.1f} MB decoded"
    if mode == "off":
        return CachePlan("off", "data.cache=off", mb)
    cuda = device is not None and torch.device(device).type == "cuda"
    sharing = max(1, int(sharing))
    uniform = len(shapes) == 1 and all(isinstance(s, ArraySource) or len(s) < 2 or _same_size(s) for s in splits)
    if mode in ("device", "host"):
        if not uniform:
            raise DataError(f"data.cache={mode}: the images of {data.name} differ in size; use data.cache=off")
        if mode == "device" and cuda:
            fits, room = _device_room(mb, sharing, torch.device(device))  # type: ignore[arg-type]
            if not fits:
                raise DataError(f"data.cache=device: {data.name}'s {size}; {room}: use data.cache=host or "
                                "data.cache=off, or fewer processes per GPU (scaling.gpus_per_worker)")
            return CachePlan(mode, f"data.cache={mode}: {room}", mb)
        return CachePlan(mode, f"data.cache={mode}", mb)
    if not uniform:
        return CachePlan("off", "images of several sizes", mb)
    if mb > limit_mb:
        return CachePlan("off", f"{size} > data.cache_limit_mb={limit_mb:g}", mb)
    if not cuda:
        return CachePlan("device", f"{size} <= data.cache_limit_mb={limit_mb:g}", mb)
    fits, room = _device_room(mb, sharing, torch.device(device))  # type: ignore[arg-type]
    if fits:
        return CachePlan("device", f"device: {room}", mb)
    host_mb = _host_available_mb()
    if mb * sharing <= DEVICE_SHARE * host_mb:
        return CachePlan("host", f"host: {room}; {_mb(mb * sharing)} fits in {DEVICE_SHARE:.0%} of "
                                 f"{_mb(host_mb)} available host memory", mb)
    return CachePlan("off", f"off: {room}, and > {DEVICE_SHARE:.0%} of {_mb(host_mb)} available host memory", mb)


def _same_size(source: ImageSource, probes: int = 8) -> bool:
    """Spot check: the first and a few evenly spaced images have the first image's size."""
    first = _image_shape(source)
    for i in np.linspace(0, len(source) - 1, probes).astype(int)[1:]:
        img, _ = source[int(i)]
        shape = tuple(img.shape) if isinstance(img, Tensor) else (len(img.getbands()), img.height, img.width)
        if shape != first:
            return False
    return True


class PinnedStaging:
    """The host cache's way to the GPU (GPU finding F5): each batch is gathered into one of ``slots``
    reusable pinned buffers, used in turn, and copied to ``device`` with ``non_blocking=True``, so the
    copy overlaps the host's next work. Before a buffer is gathered into again, the host waits on the
    event recorded after its last copy (that copy may still be reading it). With ``pin=False`` (tests on
    a CPU) the same gathers go into plain buffers, and the result aliases the buffer."""

    def __init__(self, device: torch.device, slots: int = 2, pin: bool = True) -> None:
        self.device, self.pin = device, pin
        self.buffers: list[list[Tensor | None]] = [[] for _ in range(slots)]
        self.events: list[object | None] = [None] * slots
        self.turn = 0

    def _buffer(self, slot: int, k: int, like: Tensor, n: int) -> Tensor:
        bufs = self.buffers[slot]
        while len(bufs) <= k:
            bufs.append(None)
        buf = bufs[k]
        if buf is None or buf.shape[0] < n or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = torch.empty((n, *like.shape[1:]), dtype=like.dtype, pin_memory=self.pin)
            bufs[k] = buf
        return buf[:n]

    def copy(self, sources: tuple[Tensor, ...], index: Tensor) -> tuple[Tensor, ...]:
        """``src[index]`` of every host tensor in ``sources``, on the device."""
        slot = self.turn
        self.turn = (slot + 1) % len(self.buffers)
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # type: ignore[attr-defined]
        out = []
        for k, src in enumerate(sources):
            buf = self._buffer(slot, k, src, len(index))
            torch.index_select(src, 0, index, out=buf)
            out.append(buf.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.events[slot] = event
        return tuple(out)


class CachedSplit:
    """One split as ``uint8 [N, C, H, W]`` and ``int64 [N]`` labels, in host memory or on ``device``.

    In host memory for a CUDA device (``data.cache=host``), the split stays where it was decoded
    (pageable: no second, pinned copy of it) and each batch goes through a :class:`PinnedStaging`
    (GPU finding F5). Every worker holds the whole split: its sampler draws from all of it, in an order
    that changes every epoch (GPU finding F6; :func:`plan_cache` counts the processes on one GPU)."""

    def __init__(self, source: ImageSource, where: str, device: torch.device, on_device: bool) -> None:
        images = torch.from_numpy(np.ascontiguousarray(decoded(source, where)))
        labels = torch.as_tensor(source.labels, dtype=torch.long)
        if on_device and device.type == "cuda":
            images = images.to(device)
        self.staging = PinnedStaging(device) if not on_device and device.type == "cuda" else None
        self.images, self.labels, self.device = images, labels.to(images.device), device

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The images (on the training device) and labels of ``index`` (best on :attr:`images`' device:
        :class:`DeviceLoader` moves an epoch's order there once)."""
        if self.staging is not None:
            images, labels = self.staging.copy((self.images, self.labels), index.cpu())
            return images, labels
        index = index.to(self.images.device)
        images, labels = self.images[index], self.labels[index]
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class DeviceLoader(EpochDraws):
    """Batches of a cached split, augmented on the device: the training split in the order of an
    :class:`EpochSampler` (its ``drop_last``), or an evaluation shard in order. Yields ``(x, y)``, or
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
        """This rank's batches of the epoch (without ``drop_last`` the last may be partial; a rank with no
        image of the last global batch has one fewer: the training loop steps on an empty batch then)."""
        if self.sampler is not None and self.sampler.drop_last:
            return len(self.sampler) // self.batch_size
        n = len(self.sampler) if self.sampler is not None else len(self.indices)  # type: ignore[arg-type]
        return math.ceil(n / self.batch_size)

    def index_batches(self) -> Iterator[Tensor]:
        """The split's indices of each batch of this epoch (the sampler's order, or the shard's)."""
        order = torch.as_tensor(list(self.sampler)) if self.sampler is not None else self.indices
        # GPU finding F2: the epoch's order goes where the split is once, not a pageable copy per batch.
        order = order.to(self.split.images.device)  # type: ignore[union-attr]
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        rng = BatchRng(self.seed, self.split.device)
        for index in self.index_batches():
            images, labels = self.split.batch(index)
            x = self.transform(images, rng)
            yield (x, self.key(images, rng), labels) if self.key is not None else (x, labels)
