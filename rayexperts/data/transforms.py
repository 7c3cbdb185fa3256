"""Named augmentation presets (``data.augment``), the MoCo key view, and dataset wrappers.

Every transform maps an image (uint8 CHW tensor or PIL image) to a normalised float CHW
tensor (a plain ``torch.Tensor``). Geometry and colour ops run on uint8 images; ``ToImage``
+ ``ToDtype`` then give floats in [0, 1], where the CBD ``data_aug`` teachers add Gaussian
noise (σ = 0.01, clipped to [0, 1]) *before* ``Normalize``; Cutout runs last, on the
normalised image (zero = the mean, as in DeVries & Taylor 2017). ``image_size`` sets the
ImageNet crop only: CIFAR and digits images keep their native 32x32 and 8x8.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from rayexperts.data.sources import ImageSource


def _v2():
    """torchvision's transforms v2, imported on first use (seconds that the device path never needs)."""
    from torchvision.transforms import v2

    return v2

AUGMENTS = ("standard", "data_aug", "randaugment", "autoaugment_cutout", "none")
MEAN_STD = {
    "digits": ((0.3053,), (0.3759,)),  # scikit-learn digits scaled to [0, 1]
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # as in the LDAM/RIDE/NCL code
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"digits": 8, "cifar": 32}


class Cutout(torch.nn.Module):
    """Zero a ``size``×``size`` square at a uniformly random centre, clipped at the border."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx, half = int(torch.randint(h, ())), int(torch.randint(w, ())), self.size // 2
        out = img.clone()
        out[..., max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half] = 0
        return out


class PadCropFlip(torch.nn.Module):
    """``RandomCrop(size, padding, fill=0)`` then ``RandomHorizontalFlip`` (if ``flip``), for a CHW
    tensor by slicing (several times cheaper than the v2 ops per small image); PIL images go
    through the v2 ops."""

    def __init__(self, size: int, padding: int, flip: bool = True):
        super().__init__()
        self.size, self.padding, self.flip = size, padding, flip
        self._fallback = None

    def forward(self, img):
        if not isinstance(img, torch.Tensor) or img.shape[-1] != self.size or img.shape[-2] != self.size:
            if self._fallback is None:
                v2 = _v2()
                flip = [v2.RandomHorizontalFlip()] if self.flip else []
                self._fallback = v2.Compose([v2.RandomCrop(self.size, padding=self.padding), *flip])
            return self._fallback(img)
        p, n = self.padding, self.size
        padded = img.new_zeros((*img.shape[:-2], n + 2 * p, n + 2 * p))
        padded[..., p : p + n, p : p + n] = img
        i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        out = padded[..., i : i + n, j : j + n]
        if self.flip and bool(torch.rand(()) < 0.5):
            out = out.flip(-1)
        return out.contiguous()


def _check_kind(image_kind: str) -> None:
    if image_kind not in MEAN_STD:
        raise ValueError(f"unknown image kind {image_kind!r}: choose one of {', '.join(MEAN_STD)}")


class ToNormalised(torch.nn.Module):
    """uint8 image (CHW tensor or PIL) → float ``(x / 255 − mean) / std``, a plain tensor.

    The same numbers as ``ToImage + ToDtype(scale=True) + Normalize``, at about a sixth of the
    cost per image (it runs once per sample, in the data-loading path)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img) -> torch.Tensor:
        x = img if isinstance(img, torch.Tensor) else _v2().functional.pil_to_tensor(img)
        x = x.as_subclass(torch.Tensor)
        x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        return x.sub_(self.mean).div_(self.std)


def _to_normalised(image_kind: str, noise: bool = False) -> list:
    v2 = _v2()
    mean, std = MEAN_STD[image_kind]
    if not noise:
        return [ToNormalised(mean, std)]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=0.01),
            v2.Normalize(mean, std), v2.ToPureTensor()]


def _standard(image_kind: str, image_size: int) -> list:
    """CIFAR: pad-4 crop + flip; ImageNet: RandomResizedCrop + flip; digits: pad-1 crop, no flip."""
    v2 = _v2()
    if image_kind == "digits":
        return [PadCropFlip(8, padding=1, flip=False)]
    if image_kind == "cifar":
        return [PadCropFlip(32, padding=4)]
    return [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()]


def build_transform(image_kind: str, augment: str, train: bool, image_size: int = 32) -> Callable:
    """The ``data.augment`` preset for training (``train=True``), else the test transform
    (ImageNet: Resize(image_size·256/224) + CenterCrop; all: to float + Normalize).

    ``data_aug`` = standard + ColorJitter(0.4, 0.4, 0.4) (not for 1-channel digits) + noise;
    ``randaugment`` = standard + RandAugment; ``autoaugment_cutout`` = standard +
    AutoAugment (CIFAR-10 policy) + Cutout of half the image side (16 px on CIFAR).
    """
    v2 = _v2()
    _check_kind(image_kind)
    if augment not in AUGMENTS:
        raise ValueError(f"unknown data.augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not train or augment == "none":
        resize = [v2.Resize(round(image_size * 256 / 224)), v2.CenterCrop(image_size)]
        return v2.Compose((resize if image_kind == "imagenet" else []) + _to_normalised(image_kind))
    ops = _standard(image_kind, image_size)
    if augment == "data_aug" and image_kind != "digits":
        ops.append(v2.ColorJitter(0.4, 0.4, 0.4))
    elif augment == "randaugment":
        ops.append(v2.RandAugment())
    elif augment == "autoaugment_cutout":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    ops += _to_normalised(image_kind, noise=augment == "data_aug")
    if augment == "autoaugment_cutout":
        ops.append(Cutout(NATIVE_SIZE.get(image_kind, image_size) // 2))
    return v2.Compose(ops)


def moco_transform(image_kind: str, image_size: int = 32) -> Callable:
    """MoCo v2 key view: RandomResizedCrop(scale 0.2–1), ColorJitter(0.4, 0.4, 0.4, 0.1)
    with p = 0.8, grayscale p = 0.2, flip (+ Gaussian blur p = 0.5 for ImageNet, as MoCo v2).
    Digits: a random shift (±1 px) and scale (0.8–1.2) only."""
    v2 = _v2()
    _check_kind(image_kind)
    if image_kind == "digits":
        ops = [
            v2.RandomAffine(
                degrees=0, translate=(0.125, 0.125), scale=(0.8, 1.2), interpolation=v2.InterpolationMode.BILINEAR
            )
        ]
    else:
        ops = [
            v2.RandomResizedCrop(NATIVE_SIZE.get(image_kind, image_size), scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if image_kind == "imagenet":
            ops.append(v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5))
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _to_normalised(image_kind))


class TwoView:
    """``TwoView(t_query, t_key)(img) -> (t_query(img), t_key(img))`` for the MoCo branches."""

    def __init__(self, t_query: Callable, t_key: Callable):
        self.t_query, self.t_key = t_query, t_key

    def __call__(self, img):
        return self.t_query(img), self.t_key(img)


class TransformedDataset(Dataset):
    """``source`` with ``transform`` applied: items ``(x, y)``, or ``(x1, x2, y)`` when the
    transform returns two views."""

    def __init__(self, source: ImageSource, transform: Callable | None):
        self.source, self.transform = source, transform

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img, y = self.source[i]
        x = self.transform(img) if self.transform is not None else img
        return (*x, y) if isinstance(x, tuple) else (x, y)
