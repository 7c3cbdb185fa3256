"""Batched pipelines: each op of :mod:`rayexperts.data.augment.recipes` as batched steps (:data:`OPS`), the
normalisation, and :class:`BatchPipeline`, which plans every step on the CPU, ships the parameters in one copy
and applies the steps on the device. A recipe's ops with given parameters give the per-image back end's pixels
(to 1/255: a resize may round the other way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rayexperts.data.augment.batched.autoaugment import BatchAutoAugment, BatchRandAugment
from rayexperts.data.augment.batched.colour import color_jitter, gaussian_blur, random_grayscale
from rayexperts.data.augment.batched.core import BatchRng, FnStep, Plan, Step, constant, ship
from rayexperts.data.augment.batched.geometry import (
    cutout,
    horizontal_flip,
    pad_crop_flip,
    random_affine,
    random_resized_crop,
)
from rayexperts.data.augment.batched.pil import pil_gaussian_blur, pil_random_rotation
from rayexperts.data.augment.batched.timm_randaugment import BatchTimmRandAugment
from rayexperts.data.augment.recipes import AugmentOptions, Op, Recipe, key_recipe, mean_std, recipe


def normalised(mean: Sequence[float], std: Sequence[float], noise_sigma: float = 0.0) -> Step:
    """uint8 values → ``(x/255 − mean) / std`` (``per_image.ToNormalised``); with ``noise_sigma``, as the CBD
    ``data_aug`` teachers: ``x/255`` plus Gaussian noise, clipped to [0, 1], before the normalisation. Mean and std are
    constants on the device."""
    mean_t, std_t = tuple(mean), tuple(std)

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        mean = constant(("mean", mean_t), x.device, lambda: torch.tensor(mean_t).view(1, -1, 1, 1))
        std = constant(("std", std_t), x.device, lambda: torch.tensor(std_t).view(1, -1, 1, 1))
        if noise_sigma > 0:
            x = x.mul(1.0 / 255)
            x = (x + rng.randn_like(x) * noise_sigma).clamp_(0, 1)
            return x.sub_(mean).div_(std)
        return x.div(255).sub_(mean).div_(std)

    return FnStep(lambda shape, rng: {}, apply)


def normalise(image_kind: str, noise_sigma: float = 0.0, options: AugmentOptions | None = None) -> Step:
    """:func:`normalised` with the kind's mean and std (``options.normalize="unit"``: mean 0, std 1, i.e.
    ``x/255``; ``options.mean``/``options.std`` when set)."""
    return normalised(*mean_std(image_kind, options), noise_sigma)


def _autoaugment(policy: str, fill: int | None) -> list[Step]:
    if policy != "cifar10":
        raise ValueError(f"the batched AutoAugment has the CIFAR-10 policy only, not {policy!r}")
    return [BatchAutoAugment(fill=fill)]


class ResizeCentreCrop(Step):
    """The ImageNet-like test view of a device cache: the short side resized to ``resize`` (``interpolation``,
    antialiased, on the uint8 values as the per-image view does), then the centre ``size`` x ``size`` crop, so that
    the test images have ``data.image_size`` (a timm model's input size, docs/pretrained.md "Preprocessing").
    The per-image view's semantics for every input, whatever its size (at 8 px, LIFT's Resize(9) + CenterCrop(8)
    is not the identity); the file decoder (``data/encoded.py``) applies this step as it decodes each image and
    drops it from the batch pipeline."""

    def __init__(self, resize: int, size: int, interpolation: str) -> None:
        self.resize, self.size, self.interpolation = resize, size, interpolation

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:2], self.size, self.size)

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        mode = getattr(TF.InterpolationMode, self.interpolation.upper())
        u8 = TF.resize(x.round().to(torch.uint8), [self.resize], interpolation=mode, antialias=True)
        return TF.center_crop(u8, [self.size, self.size]).to(torch.float32)


def _resize_centre_crop(resize: int, size: int, interpolation: str) -> list[Step]:
    return [ResizeCentreCrop(resize, size, interpolation)]


def _color_jitter(strengths: Sequence[float], p: float) -> list[Step]:
    """A hue strength of 0 is no hue operation, as torchvision's ``ColorJitter`` has it."""
    strengths = tuple(strengths)
    return [color_jitter(strengths[:3] if len(strengths) > 3 and not strengths[3] else strengths, p=p)]


# Each op of the recipes: its parameters -> the batched steps it adds.
OPS: dict[str, Callable[..., list[Step]]] = {
    "normalise": lambda mean, std, noise_sigma: [normalised(mean, std, noise_sigma)],
    "pad_crop_flip": lambda size, padding, flip: [pad_crop_flip(padding, flip=flip)],  # size: the batch's own
    "random_resized_crop": lambda size, scale: [random_resized_crop(size, scale=scale)],
    "horizontal_flip": lambda: [horizontal_flip()],
    "resize_centre_crop": _resize_centre_crop,
    "random_affine": lambda translate, scale: [random_affine(translate, scale)],
    "color_jitter": _color_jitter,
    "random_grayscale": lambda p: [random_grayscale(p)],
    "gaussian_blur": lambda kernel, sigma, p: [gaussian_blur(kernel, sigma, p=p)],
    "pil_gaussian_blur": lambda sigma, p: [pil_gaussian_blur(sigma, p=p)],
    "pil_rotation": lambda degrees: [pil_random_rotation(degrees)],
    "randaugment": lambda num_ops, magnitude, fill: [BatchRandAugment(num_ops=num_ops, magnitude=magnitude, fill=fill)],
    "autoaugment": _autoaugment,
    "timm_randaugment": lambda config, hparams: [BatchTimmRandAugment(config, hparams)],
    "cutout": lambda size, on: [cutout(size)],  # on: its place in the recipe (before or after the normalisation)
}


class BatchPipeline:
    """uint8 ``[B, C, H, W]`` → normalised float, through ``steps`` on the uint8 values, the normalisation,
    then ``after`` on the normalised image (Cutout). A call plans every step on the CPU (:meth:`plan`), ships
    the parameters in one copy (:func:`.core.ship`) and applies the steps on the device (:meth:`apply`)."""

    def __init__(self, steps: list[Step], norm: Step, after: list[Step] | None = None):
        self.steps, self.norm, self.after = steps, norm, list(after or [])

    def _all(self) -> list:
        return [*self.steps, self.norm, *self.after]

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> list[Plan]:
        """Every step's CPU draws, in order (a step that is a plain ``(x, rng)`` function draws when applied)."""
        plans = []
        for step in self._all():
            if isinstance(step, Step):
                plans.append(step.plan(shape, rng))
                shape = step.out_shape(shape)
            else:
                plans.append({})
        return plans

    def apply(self, images: Tensor, plans: list[Plan], rng: BatchRng) -> Tensor:
        x = images.to(torch.float32)
        for step, plan in zip(self._all(), plans):
            x = step.apply(x, plan, rng) if isinstance(step, Step) else step(x, rng)
        return x

    def __call__(self, images: Tensor, rng: BatchRng) -> Tensor:
        return self.apply(images, ship(self.plan(tuple(images.shape), rng), images.device), rng)


def _build(ops: Sequence[Op]) -> list[Step]:
    return [s for o in ops for s in OPS[o.name](**o.params)]


def compose(resolved: Recipe) -> BatchPipeline:
    """A resolved recipe as one :class:`BatchPipeline`."""
    (norm,) = _build([resolved.norm])
    return BatchPipeline(_build(resolved.steps), norm, _build(resolved.after))


def batch_transform(image_kind: str, augment: str, train: bool, image_size: int = 32, *,
                    options: AugmentOptions | None = None) -> BatchPipeline:
    """The batched twin of ``per_image.build_transform(image_kind, augment, train, image_size, options=...)``."""
    return compose(recipe(image_kind, augment, train, image_size, options))


def batch_moco_transform(image_kind: str, image_size: int = 32, blur: bool = False, *,
                         options: AugmentOptions | None = None) -> BatchPipeline:
    """The batched twin of ``per_image.moco_transform``: the MoCo v2 key view (``blur``: NCL's PIL Gaussian
    blur, p 0.5, last, on CIFAR)."""
    return compose(key_recipe(image_kind, image_size, blur, options))
