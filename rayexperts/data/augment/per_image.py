"""The per-image back end: each op of :mod:`rayexperts.data.augment.recipes` as torchvision (v2) transforms on
one image, the MoCo key view, and the data set wrappers of the per-image path.

Every transform maps an image (uint8 CHW tensor or PIL image) to a normalised float CHW tensor (a plain
``torch.Tensor``). ``randaugment_timm`` (NCL ImageNet-LT's train view) runs timm's own RandAugment on PIL images,
``data_aug_simclr`` is CBD's data-augmentation teachers as their code has them, and the ``moco_blur`` key view adds
NCL's PIL Gaussian blur to the CIFAR key view; the rotation of ``standard_rotation`` is Pillow's
(:class:`PILRandomRotation`), as RIDE's, SADE's and BalPoE's code applied it (docs/methods.md "Recipes behind the
published numbers").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from rayexperts.data.augment.recipes import ROTATION_DEGREES, AugmentOptions, Op, Recipe, key_recipe, recipe
from rayexperts.data.sources import ImageSource


def _v2():
    """torchvision's transforms v2, imported on first use (seconds that the device path never needs)."""
    from torchvision.transforms import v2

    return v2


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


# ----------------------------------------------------------------------------- op name -> transforms


def _normalise(mean: Sequence[float], std: Sequence[float], noise_sigma: float) -> list:
    """:class:`ToNormalised`; with noise (CBD's ``data_aug``): ToImage + ToDtype + GaussianNoise (clipped) +
    Normalize."""
    if not noise_sigma:
        return [ToNormalised(tuple(mean), tuple(std))]
    v2 = _v2()
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=noise_sigma),
            v2.Normalize(mean, std), v2.ToPureTensor()]


def _color_jitter(strengths: Sequence[float], p: float) -> list:
    jitter = _v2().ColorJitter(*strengths)
    return [jitter if p >= 1 else _v2().RandomApply([jitter], p=p)]


def _resize_centre_crop(resize: int, size: int, interpolation: str) -> list:
    v2 = _v2()
    mode = getattr(v2.InterpolationMode, interpolation.upper())
    return [v2.Resize(resize, interpolation=mode), v2.CenterCrop(size)]


def _cutout(size: int, on: str) -> list:
    """``on="uint8"``: before the normalisation, so a PIL image becomes a uint8 tensor first (0 on it = 0 on the
    [0, 1] image); ``on="normalised"``: zero = the mean."""
    return [ToUint8(), Cutout(size)] if on == "uint8" else [Cutout(size)]


def _autoaugment(policy: str, fill: int | None) -> list:
    v2 = _v2()
    return [v2.AutoAugment(getattr(v2.AutoAugmentPolicy, policy.upper()), fill=fill)]


# Each op of the recipes: its parameters -> the transforms it adds.
OPS: dict[str, Callable[..., list]] = {
    "normalise": _normalise,
    "pad_crop_flip": lambda size, padding, flip: [PadCropFlip(size, padding=padding, flip=flip)],
    "random_resized_crop": lambda size, scale: [_v2().RandomResizedCrop(size, scale=scale)],
    "horizontal_flip": lambda: [_v2().RandomHorizontalFlip()],
    "resize_centre_crop": _resize_centre_crop,
    "random_affine": lambda translate, scale: [_v2().RandomAffine(
        degrees=0, translate=(translate, translate), scale=scale, interpolation=_v2().InterpolationMode.BILINEAR)],
    "color_jitter": _color_jitter,
    "random_grayscale": lambda p: [_v2().RandomGrayscale(p=p)],
    "gaussian_blur": lambda kernel, sigma, p: [_v2().RandomApply([_v2().GaussianBlur(kernel, sigma=sigma)], p=p)],
    "pil_gaussian_blur": lambda sigma, p: [_v2().RandomApply([PILGaussianBlur(sigma)], p=p)],
    "pil_rotation": lambda degrees: [PILRandomRotation(degrees)],
    "randaugment": lambda num_ops, magnitude, fill: [_v2().RandAugment(num_ops=num_ops, magnitude=magnitude,
                                                                       fill=fill)],
    "autoaugment": _autoaugment,
    "timm_randaugment": lambda config, hparams: [TimmRandAugment(config, hparams)],
    "cutout": _cutout,
}


def _build(ops: Sequence[Op]) -> list:
    return [t for o in ops for t in OPS[o.name](**o.params)]


def compose(resolved: Recipe) -> Callable:
    """A resolved recipe as one ``v2.Compose``."""
    return _v2().Compose(_build(resolved.steps) + _build([resolved.norm]) + _build(resolved.after))


def build_transform(image_kind: str, augment: str, train: bool, image_size: int = 32, *,
                    options: AugmentOptions | None = None) -> Callable:
    """The ``data.augment`` view (:data:`recipes.TRAIN_VIEWS`) for training (``train=True``), else its test view
    (:data:`recipes.TEST_VIEWS`; by default ImageNet: Resize(image_size / crop_pct) + CenterCrop; all: normalised). ``options`` (None: the defaults) sets
    the AutoAugment/RandAugment fill, the Cutout's fill, the ImageNet crop's smallest area and the normalisation
    (train and test alike). ``sade_tta`` is a training-style view (``train=True``) that the engine applies twice
    to each test image."""
    return compose(recipe(image_kind, augment, train, image_size, options))


def moco_transform(image_kind: str, image_size: int = 32, blur: bool = False, *,
                   options: AugmentOptions | None = None) -> Callable:
    """The MoCo v2 key view (:data:`recipes.KEY_VIEWS`; ``blur``: NCL's PIL blur on CIFAR). ImageNet keeps
    torchvision's GaussianBlur(23) either way; digits get no blur. ``options.normalize`` sets the normalisation."""
    return compose(key_recipe(image_kind, image_size, blur, options))


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
