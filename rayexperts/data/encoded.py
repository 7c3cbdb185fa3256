"""The per-image path for data sets too large to cache (``data.cache=off``) with the decoding on the
training device (``data.decode=device``; ``auto`` on CUDA): DataLoader workers only read the encoded
files; each batch is decoded at once by ``torchvision.io.decode_jpeg(..., device=<training device>)``
(nvJPEG on a GPU), each image is cropped to the training size with torchvision's ``resized_crop``
(training) or ``resize`` + ``center_crop`` (evaluation), and the rest of the augmentation runs on the
batch (:mod:`rayexperts.data.augment.batched`). Files that are not JPEG are decoded on the CPU
(``torchvision.io.decode_image``), one by one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rayexperts.data.augment.batched.core import BatchRng
from rayexperts.data.augment.batched.geometry import RandomResizedCrop
from rayexperts.data.augment.batched.pipelines import BatchPipeline, ResizeCentreCrop
from rayexperts.data.augment.recipes import AugmentOptions, eval_resize_side
from rayexperts.data.errors import DataError
from rayexperts.data.samplers import EpochDraws
from rayexperts.data.sources import ImageSource

DECODE_MODES = ("auto", "workers", "device")


class EncodedImages(Dataset):
    """``(the file's bytes as a uint8 tensor, label)`` of each image of ``source``."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return torch.frombuffer(bytearray(self.source.encoded(i)), dtype=torch.uint8), int(self.source.labels[i]), i


def _collate(items: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, list[int]]:
    return [b for b, _, _ in items], torch.tensor([y for _, y, _ in items]), [i for _, _, i in items]


def decode_batch(blobs: list[Tensor], device: torch.device, source: ImageSource, index: list[int]) -> list[Tensor]:
    """RGB uint8 CHW images of ``blobs`` on ``device``: JPEGs in one batched call, others on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    jpeg = [i for i, b in enumerate(blobs) if len(b) > 2 and int(b[0]) == 0xFF and int(b[1]) == 0xD8]
    out: list[Tensor | None] = [None] * len(blobs)
    if jpeg:
        if device.type == "cuda":
            # GPU finding F4: CUDA decode_jpeg allocates its outputs on the caller's stream but decodes on a
            # stream that does not wait for it, so it may write into memory that queued kernels (the
            # previous step's backward) still read (pytorch/vision PR #9606). One sync per batch closes that.
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            raise DataError(f"cannot decode a JPEG of the batch with {source.describe(index[jpeg[0]])}: {e}") from e
        for i, img in zip(jpeg, decoded):
            out[i] = img
    for i, blob in enumerate(blobs):
        if out[i] is None:
            try:
                out[i] = decode_image(blob, mode=ImageReadMode.RGB).to(device)
            except RuntimeError as e:
                raise DataError(f"cannot decode image {source.describe(index[i])}: {e}") from e
    return out  # type: ignore[return-value]


class EncodedLoader(EpochDraws):
    """Batches of an encoded split: read by ``num_workers`` DataLoader processes, decoded on the device,
    cropped per image, augmented per batch. Training in an :class:`EpochSampler`'s order (``drop_last``),
    evaluation over a shard in order; yields ``(x, y)`` or ``(x_query, x_key, y)``."""

    def __init__(self, source: ImageSource, batch_size: int, transform: BatchPipeline, device: torch.device, *,
                 image_size: int, train: bool, sampler: Sampler | None = None, indices: list[int] | None = None,
                 key: BatchPipeline | None = None, num_workers: int = 0, options: AugmentOptions | None = None) -> None:
        self.source, self.transform, self.key, self.device = source, transform, key, device
        self.options = options or AugmentOptions()  # the test view's crop_pct and interpolation
        self.image_size, self.train, self.batch_size = image_size, train, batch_size
        self.sampler = sampler
        self.loader = DataLoader(EncodedImages(source), batch_size=batch_size, sampler=sampler if train else indices,
                                 num_workers=num_workers, collate_fn=_collate,
                                 drop_last=train and bool(getattr(sampler, "drop_last", True)),
                                 persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")
        self.seed = 0

    def __len__(self) -> int:
        return len(self.loader)

    def _first_stage(self, pipeline: BatchPipeline, images: list[Tensor], rng: BatchRng) -> tuple[Tensor, BatchPipeline]:
        """The per-image crop to the training size (the pipeline's first step when it is a random resized crop or
        a resize + centre crop: e.g. the lift_crop recipe's Resize(image_size * 8 // 7)); the pipeline's remaining
        steps."""
        from torchvision.transforms.v2 import functional as TF

        steps = list(pipeline.steps)
        if steps and isinstance(steps[0], RandomResizedCrop):
            crop = steps.pop(0)
            batch = torch.stack([crop.one(img, rng) for img in images])
        else:
            short = eval_resize_side(self.image_size, self.options)
            interpolation = self.options.interpolation
            if steps and isinstance(steps[0], ResizeCentreCrop):  # applied here, image by image
                first = steps.pop(0)
                short, interpolation = first.resize, first.interpolation
            mode = getattr(TF.InterpolationMode, interpolation.upper())
            batch = torch.stack([TF.center_crop(TF.resize(img, short, interpolation=mode, antialias=True),
                                                [self.image_size] * 2) for img in images])
        return batch, BatchPipeline(steps, pipeline.norm, pipeline.after)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        rng = BatchRng(self.seed, self.device)
        for blobs, labels, index in self.loader:
            images = decode_batch(blobs, self.device, self.source, index)
            first, rest = self._first_stage(self.transform, images, rng)
            x = rest(first, rng)
            y = labels.to(self.device, non_blocking=True)
            if self.key is not None:
                key_first, key_rest = self._first_stage(self.key, images, rng)
                yield x, key_rest(key_first, rng), y
            else:
                yield x, y
