"""Named augmentation presets (``data.augment``), the MoCo key view, and dataset wrappers.

Every transform maps an image (uint8 CHW tensor or PIL image) to a normalised float CHW
tensor (a plain ``torch.Tensor``). Geometry and colour ops run on uint8 images; ``ToImage``
+ ``ToDtype`` then give floats in [0, 1], where the CBD ``data_aug`` teachers add Gaussian
noise (σ = 0.01, clipped to [0, 1]) *before* ``Normalize``; Cutout runs last, on the
normalised image (zero = the mean, as in DeVries & Taylor 2017). ``image_size`` sets the
ImageNet crop only: CIFAR and digits images keep their native 32x32 and 8x8.

:class:`AugmentOptions` holds the recipe switches of docs/methods.md "Recipes behind the published numbers"
(``data.autoaugment_fill``, ``data.cutout_fill``, ``data.crop_scale_min``, ``data.normalize``); its
defaults are the presets above, pixel for pixel. ``randaugment_timm`` (NCL ImageNet-LT's train view) runs
timm's own RandAugment on PIL images, ``data_aug_simclr`` is CBD's data-augmentation teachers as their code
has them, and ``moco_transform(..., blur=True)`` adds NCL's PIL Gaussian blur to the CIFAR key view.
``standard_rotation``, ``standard_jitter``, ``autoaugment`` and ``sade_tta`` are the views of RIDE, BalPoE and SADE
(see :func:`build_transform`); the rotation is Pillow's (:class:`PILRandomRotation`), as their code applied it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from rayexperts.data.sources import ImageSource


def _v2():
    """torchvision's transforms v2, imported on first use (seconds that the device path never needs)."""
    from torchvision.transforms import v2

    return v2

AUGMENTS = ("standard", "data_aug", "data_aug_simclr", "randaugment", "randaugment_timm", "autoaugment_cutout",
            "none", "standard_rotation", "standard_jitter", "autoaugment", "sade_tta")
MEAN_STD = {
    "digits": ((0.3053,), (0.3759,)),  # scikit-learn digits scaled to [0, 1]
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # as in the LDAM/RIDE/NCL code
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"digits": 8, "cifar": 32}
TIMM_RANDAUGMENT = "rand-n2-m10-mstd0.5"  # NCL's ImageNet-LT train view (lib/dataset/others.py:110)
ROTATION_DEGREES = 15.0  # standard_rotation: RandomRotation(15) (RIDE@ab8be5c data_loader/cifar_data_loaders.py:102)


@dataclass(frozen=True)
class AugmentOptions:
    """Recipe switches of the augmentation presets (docs/methods.md "Recipes behind the published numbers"); the
    defaults give the presets' own pipelines, bit for bit. The engine builds it from the ``data.*`` keys of
    the same names."""

    autoaugment_fill: int = 0  # AutoAugment/RandAugment (torchvision): fill outside a geometric op (NCL/BSCE: 128)
    cutout_fill: str = "mean"  # "mean": zero on the normalised image; "black": 0 on the [0, 1] image (PaCo/NCL/BSCE)
    crop_scale_min: float = 0.08  # RandomResizedCrop's smallest area, ImageNet-family crops (CBD: 0.05)
    normalize: str = "mean_std"  # "mean_std": (x/255 - mean)/std; "unit": x/255 only (CBD's code)
    # the normalisation's mean and std in place of the data set's (data.mean / data.std, or a pretrained timm
    # model's own: docs/pretrained.md "Preprocessing"); None: the data set's
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # ImageNet-like test view: resize the short side to image_size / crop_pct (224/256: Resize(size·256/224)),
    # with this interpolation, then centre-crop image_size (data.crop_pct, data.interpolation; docs/pretrained.md)
    crop_pct: float = 224 / 256
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1 or self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"data.crop_pct {self.crop_pct} must be in (0, 1] and data.interpolation "
                             f"{self.interpolation!r} bilinear or bicubic")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"data.mean {self.mean} and data.std {self.std} must be given together, one per channel")
        if self.cutout_fill not in ("mean", "black"):
            raise ValueError(f"unknown data.cutout_fill {self.cutout_fill!r}: choose mean or black")
        if self.normalize not in ("mean_std", "unit"):
            raise ValueError(f"unknown data.normalize {self.normalize!r}: choose mean_std or unit")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"data.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.autoaugment_fill <= 255:
            raise ValueError(f"data.autoaugment_fill must be in [0, 255], got {self.autoaugment_fill}")


def mean_std(image_kind: str, options: AugmentOptions | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that the normalisation uses: ``options.mean``/``options.std`` when set, else the data set's;
    (0, 1) for ``normalize="unit"``."""
    mean, std = MEAN_STD[image_kind]
    if options is not None and options.normalize == "unit":
        return (0.0,) * len(mean), (1.0,) * len(std)
    if options is not None and options.mean is not None:
        if len(options.mean) != len(mean):
            raise ValueError(f"data.mean/data.std have {len(options.mean)} channels, the {image_kind} images {len(mean)}")
        return tuple(options.mean), tuple(options.std)  # type: ignore[arg-type]
    return mean, std


def eval_resize_side(image_size: int, options: AugmentOptions | None = None) -> int:
    """The short side an ImageNet-like test image is resized to before the centre crop: ``image_size / crop_pct``."""
    return round(image_size / (options or AugmentOptions()).crop_pct)


def timm_hparams(image_kind: str, image_size: int) -> dict:
    """The hparams NCL passes to timm's ``rand_augment_transform`` (lib/dataset/others.py:87-88):
    ``translate_const = int(size · 0.45)`` and ``img_mean`` = the data set mean as 0-255 ints, the fill of the
    geometric ops (an int for 1-channel digits). No ``interpolation``: timm draws bilinear or bicubic per op."""
    size = NATIVE_SIZE.get(image_kind, image_size)
    fill = tuple(min(255, round(255 * m)) for m in MEAN_STD[image_kind][0])
    return {"translate_const": int(size * 0.45), "img_mean": fill if len(fill) > 1 else fill[0]}


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


def _to_pil(img):
    """A uint8 CHW tensor as a PIL image (RGB or L); a PIL image as it is."""
    if isinstance(img, torch.Tensor):
        return _v2().functional.to_pil_image(img.as_subclass(torch.Tensor))
    return img


def _like(pil, original):
    """``pil`` back in the type of ``original`` (a uint8 CHW tensor, or PIL)."""
    return _v2().functional.pil_to_tensor(pil) if isinstance(original, torch.Tensor) else pil


class TimmRandAugment(torch.nn.Module):
    """timm's RandAugment (``timm.data.auto_augment.rand_augment_transform(config, hparams)``) on a PIL image
    (a tensor is converted to PIL first; the result stays PIL): docs/methods.md "Recipes behind the published
    numbers", NCL ImageNet-LT train view.

    timm draws from Python's ``random`` and NumPy's global generator; each call here seeds both from torch's
    generator and restores their states afterwards, so a ``torch.manual_seed`` fixes the images and other
    users of those generators see no difference."""

    def __init__(self, config: str, hparams: dict):
        super().__init__()
        from timm.data.auto_augment import rand_augment_transform

        self.config, self.hparams = config, dict(hparams)
        self.ra = rand_augment_transform(config, dict(hparams))

    def forward(self, img):
        seed = int(torch.randint(2**31 - 1, ()))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.ra(_to_pil(img))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class PILGaussianBlur(torch.nn.Module):
    """``img.filter(ImageFilter.GaussianBlur(radius))`` with ``radius ~ U(sigma)`` (from torch's generator), as
    MoCo v2's and NCL's ``GaussianBlur`` class: docs/methods.md "Recipes behind the published numbers", NCL
    CIFAR MoCo key view. A uint8 CHW tensor goes through PIL and comes back a tensor."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def forward(self, img):
        from PIL import ImageFilter

        radius = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return _like(_to_pil(img).filter(ImageFilter.GaussianBlur(radius=radius)), img)


class PILRandomRotation(torch.nn.Module):
    """torchvision's ``RandomRotation(degrees)`` (angle ``U[-degrees, degrees]`` from torch's generator, NEAREST,
    ``expand=False``, the image centre, ``fill``) applied to a PIL image, i.e. Pillow's ``Image.rotate``, as the
    authors' code applies it (RIDE@ab8be5c data_loader/cifar_data_loaders.py:99-105: after ``RandomCrop`` and
    ``RandomHorizontalFlip``, on PIL images). torchvision's tensor kernel resamples differently, so a uint8 CHW
    tensor goes through PIL and comes back a tensor."""

    def __init__(self, degrees: float = ROTATION_DEGREES, fill: int = 0):
        super().__init__()
        self.rotation = _v2().RandomRotation(degrees, fill=fill)

    def forward(self, img):
        return _like(self.rotation(_to_pil(img)), img)


class ToUint8(torch.nn.Module):
    """A PIL image as a uint8 CHW tensor; a tensor as a plain tensor (before a Cutout on the [0, 1] image)."""

    def forward(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return img.as_subclass(torch.Tensor)
        return _v2().functional.pil_to_tensor(img)


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


def _to_normalised(image_kind: str, noise: bool = False, options: AugmentOptions | None = None) -> list:
    v2 = _v2()
    mean, std = mean_std(image_kind, options)
    if not noise:
        return [ToNormalised(mean, std)]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=0.01),
            v2.Normalize(mean, std), v2.ToPureTensor()]


def _standard(image_kind: str, image_size: int, options: AugmentOptions | None = None) -> list:
    """CIFAR: pad-4 crop + flip; ImageNet: RandomResizedCrop (area ``crop_scale_min``–1) + flip; digits:
    pad-1 crop, no flip."""
    v2 = _v2()
    if image_kind == "digits":
        return [PadCropFlip(8, padding=1, flip=False)]
    if image_kind == "cifar":
        return [PadCropFlip(32, padding=4)]
    scale_min = (options or AugmentOptions()).crop_scale_min
    return [v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0)), v2.RandomHorizontalFlip()]


SADE_TTA_BLUR_P = {"cifar": 0.2, "imagenet": 0.5, "digits": 0.2}


def _sade_tta(image_kind: str, image_size: int) -> list:
    """SADE's test-time view (Vanint/SADE-AgnosticLT@cba11b8 test_training_cifar.py:179-189,
    test_training_imagenet.py:177-187): CIFAR RandomCrop(32, 4) / ImageNet RandomResizedCrop(scale 0.2–1), then
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p 0.8), RandomGrayscale(0.2), RandomApply(PIL GaussianBlur,
    radius ~ U[0.1, 2], p 0.2 CIFAR / 0.5 ImageNet; its ``GaussianBlur`` class, lines 116-125, is MoCo's PIL
    blur), RandomHorizontalFlip. Digits: the pad-1 crop and the blur (p 0.2) only: no colour, no flip."""
    v2 = _v2()
    blur = v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=SADE_TTA_BLUR_P[image_kind])
    if image_kind == "digits":
        return [PadCropFlip(8, padding=1, flip=False), blur]
    crop = (PadCropFlip(32, padding=4, flip=False) if image_kind == "cifar"
            else v2.RandomResizedCrop(image_size, scale=(0.2, 1.0)))
    return [crop, v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2), blur,
            v2.RandomHorizontalFlip()]


def build_transform(image_kind: str, augment: str, train: bool, image_size: int = 32, *,
                    options: AugmentOptions | None = None) -> Callable:
    """The ``data.augment`` preset for training (``train=True``), else the test transform
    (ImageNet: Resize(image_size·256/224) + CenterCrop; all: to float + Normalize).

    ``data_aug`` = standard + ColorJitter(0.4, 0.4, 0.4) (not for 1-channel digits) + noise;
    ``data_aug_simclr`` = standard + RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p 0.8) + RandomGrayscale(0.2),
    no noise (docs/methods.md "Recipes behind the published numbers", CBD data-augmentation teachers; digits:
    standard only); ``randaugment`` = standard + RandAugment; ``randaugment_timm`` = standard +
    ColorJitter(0.4, 0.4, 0.4, 0) + timm's ``rand-n2-m10-mstd0.5`` with NCL's hparams (same section, NCL
    ImageNet-LT train view; digits: no jitter); ``autoaugment_cutout`` = standard + AutoAugment (CIFAR-10
    policy) + Cutout of half the image side (16 px on CIFAR); with ``options.cutout_fill="black"`` the
    Cutout zeroes the [0, 1] image before the normalisation (same section, NCL/BSCE CIFAR query view).
    ``options`` (None: the defaults) also sets the AutoAugment/RandAugment fill, the ImageNet crop's
    smallest area and ``normalize`` (train and test alike).

    ``standard_rotation`` = standard + RandomRotation(15) on PIL (:class:`PILRandomRotation`; RIDE@ab8be5c
    data_loader/cifar_data_loaders.py:99-105, the CIFAR view of RIDE, SADE and BalPoE; digits too);
    ``standard_jitter`` = standard + ColorJitter(0.4, 0.4, 0.4, 0) always (RIDE@ab8be5c
    data_loader/imagenet_lt_data_loaders.py:76-82; digits: standard only, as ``data_aug``); ``autoaugment`` =
    ``autoaugment_cutout`` without the Cutout (BalPoE emasa/BalPoE-CalibratedLT@ca607ae dataset/others.py:165-177,
    whose CIFAR10Policy fills with 128: ``options.autoaugment_fill``); ``sade_tta`` = SADE's test-time view
    (:func:`_sade_tta`), a training-style view (``train=True``) that the engine applies twice to each test image.
    """
    v2 = _v2()
    _check_kind(image_kind)
    options = options or AugmentOptions()
    if augment not in AUGMENTS:
        raise ValueError(f"unknown data.augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not train or augment == "none":
        mode = getattr(v2.InterpolationMode, options.interpolation.upper())
        resize = [v2.Resize(eval_resize_side(image_size, options), interpolation=mode), v2.CenterCrop(image_size)]
        return v2.Compose((resize if image_kind == "imagenet" else []) + _to_normalised(image_kind, options=options))
    if augment == "sade_tta":
        return v2.Compose(_sade_tta(image_kind, image_size) + _to_normalised(image_kind, options=options))
    ops = _standard(image_kind, image_size, options)
    fill = options.autoaugment_fill or None  # 0 = torchvision's default (None: zeros)
    colour = image_kind != "digits"
    if augment in ("data_aug", "standard_jitter") and colour:
        ops.append(v2.ColorJitter(0.4, 0.4, 0.4))
    elif augment == "standard_rotation":
        ops.append(PILRandomRotation(ROTATION_DEGREES))
    elif augment == "data_aug_simclr" and colour:
        ops += [v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2)]
    elif augment == "randaugment":
        ops.append(v2.RandAugment(fill=fill))
    elif augment == "randaugment_timm":
        ops += ([v2.ColorJitter(0.4, 0.4, 0.4, 0.0)] if colour else []) + [
            TimmRandAugment(TIMM_RANDAUGMENT, timm_hparams(image_kind, image_size))]
    elif augment in ("autoaugment_cutout", "autoaugment"):
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill))
    cutout = Cutout(NATIVE_SIZE.get(image_kind, image_size) // 2) if augment == "autoaugment_cutout" else None
    if cutout is not None and options.cutout_fill == "black":
        ops += [ToUint8(), cutout]  # 0 on the uint8 image = 0 on the [0, 1] image
        cutout = None
    ops += _to_normalised(image_kind, noise=augment == "data_aug", options=options)
    if cutout is not None:
        ops.append(cutout)
    return v2.Compose(ops)


def moco_transform(image_kind: str, image_size: int = 32, blur: bool = False, *,
                   options: AugmentOptions | None = None) -> Callable:
    """MoCo v2 key view: RandomResizedCrop(scale 0.2–1), ColorJitter(0.4, 0.4, 0.4, 0.1)
    with p = 0.8, grayscale p = 0.2, flip (+ Gaussian blur p = 0.5 for ImageNet, as MoCo v2).
    Digits: a random shift (±1 px) and scale (0.8–1.2) only.

    ``blur=True`` on CIFAR appends RandomApply(PIL GaussianBlur, radius ~ U[0.1, 2.0], p = 0.5) after these
    ops, as NCL's CIFAR key view has it (docs/methods.md "Recipes behind the published numbers", NCL CIFAR, MoCo
    key view: its flip comes before the colour ops, which commute with it). ImageNet keeps torchvision's
    GaussianBlur(23) either way; digits get no blur. ``options.normalize`` sets the normalisation."""
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
        if blur and image_kind == "cifar":
            ops.append(v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5))
    return v2.Compose(ops + _to_normalised(image_kind, options=options))


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
