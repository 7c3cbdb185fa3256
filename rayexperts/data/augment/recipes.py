"""Every augmentation recipe once, as data: the ops of each ``data.augment`` name and of the MoCo key views, with
their parameters (docs/methods.md "Recipes behind the published numbers").

A recipe is a tuple of :class:`Op`: an op name, its parameters and the conditions under which it applies (the
image kind, an :class:`AugmentOptions` switch). A parameter may be a :class:`Ref`, a value of the context: the
image side, the crop's smallest area, the fill, the mean and std. :func:`recipe` and :func:`key_recipe` resolve a
recipe for one image kind, size and set of options into a :class:`Recipe`: the ops on the uint8 image, the
normalisation, the ops on the normalised image. The two back ends, ``augment.per_image`` (torchvision, one image at
a time) and ``augment.batched`` (a batch on its device, per-sample randomness), each map every op name to their
implementation; neither holds a recipe name.

Geometry and colour ops run on uint8 images; the normalisation gives ``(x/255 - mean)/std`` (the CBD ``data_aug``
teachers add Gaussian noise, σ = 0.01, clipped to [0, 1], before it); Cutout runs last, on the normalised image
(zero = the mean, as in DeVries & Taylor 2017), or with ``cutout_fill="black"`` on the uint8 image before the
normalisation. ``image_size`` sets the ImageNet crop only: CIFAR and digits images keep their native 32x32 and 8x8,
except in the ``lift_crop`` recipe, which crops and resizes every kind to ``image_size`` (CIFAR's 32 px up-sampled).

This module imports nothing of torch: the config's checks may read :data:`AUGMENTS` cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

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


def check_kind(image_kind: str) -> None:
    if image_kind not in MEAN_STD:
        raise ValueError(f"unknown image kind {image_kind!r}: choose one of {', '.join(MEAN_STD)}")


# ----------------------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class Ref:
    """A parameter taken from the context of :func:`recipe` (one of :func:`context`'s keys)."""

    key: str


SIDE = Ref("side")  # the training image's side: 32 CIFAR, 8 digits, data.image_size otherwise
HALF_SIDE = Ref("half_side")  # Cutout's square: half the side (16 px on CIFAR)
CROP_SCALE_MIN = Ref("crop_scale_min")  # data.crop_scale_min
AUTOAUGMENT_FILL = Ref("autoaugment_fill")  # data.autoaugment_fill; 0 = torchvision's default (None: zeros)
TIMM_HPARAMS = Ref("timm_hparams")  # :func:`timm_hparams` of the kind and size
MEAN, STD = Ref("mean"), Ref("std")  # :func:`mean_std`
EVAL_RESIZE = Ref("eval_resize")  # :func:`eval_resize_side`
INTERPOLATION = Ref("interpolation")  # data.interpolation of the ImageNet-like test view
IMAGE_SIZE = Ref("image_size")  # data.image_size for every kind (the lift_crop recipe up-samples CIFAR and digits)
LIFT_RESIZE = Ref("lift_resize")  # data.image_size * 8 // 7: LIFT's test view (Resize(res * 8 // 7))


@dataclass(frozen=True)
class Op:
    """One op of a recipe: its name (a key of each back end's ``OPS``), its parameters (values or :class:`Ref`)
    and ``when``: context key -> the values it applies for (empty: always)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    when: Mapping[str, tuple] = field(default_factory=dict)


def op(name: str, *, kinds: tuple[str, ...] | None = None, cutout_fill: str | None = None, **params: Any) -> Op:
    """An :class:`Op` applied for the image ``kinds`` given (None: all) and the ``cutout_fill`` given (None: any)."""
    when = {**({"image_kind": kinds} if kinds else {}), **({"cutout_fill": (cutout_fill,)} if cutout_fill else {})}
    return Op(name, params, when)


COLOUR = ("cifar", "imagenet")  # the kinds with colour (digits are 1-channel: no jitter, grayscale or flip)
NORMALISE = op("normalise", mean=MEAN, std=STD, noise_sigma=0.0)
# "standard": CIFAR pad-4 crop + flip; ImageNet RandomResizedCrop (area crop_scale_min-1) + flip; digits pad-1 crop
STANDARD = (
    op("pad_crop_flip", size=SIDE, padding=1, flip=False, kinds=("digits",)),
    op("pad_crop_flip", size=SIDE, padding=4, flip=True, kinds=("cifar",)),
    op("random_resized_crop", size=SIDE, scale=(CROP_SCALE_MIN, 1.0), kinds=("imagenet",)),
    op("horizontal_flip", kinds=("imagenet",)),
)
JITTER = op("color_jitter", strengths=(0.4, 0.4, 0.4), p=1.0, kinds=COLOUR)
AUTOAUGMENT = op("autoaugment", policy="cifar10", fill=AUTOAUGMENT_FILL)
TEST_VIEW = (op("resize_centre_crop", resize=EVAL_RESIZE, size=SIDE, interpolation=INTERPOLATION, kinds=("imagenet",)),
             NORMALISE)
# SADE's test-time view (Vanint/SADE-AgnosticLT@cba11b8 test_training_cifar.py:179-189, test_training_imagenet.py:
# 177-187): crop, RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p 0.8), RandomGrayscale(0.2), RandomApply(PIL
# GaussianBlur, radius ~ U[0.1, 2], p 0.2 CIFAR / 0.5 ImageNet; its ``GaussianBlur`` class, lines 116-125, is
# MoCo's PIL blur), RandomHorizontalFlip. Digits: the pad-1 crop and the blur (p 0.2) only.
SADE_TTA = (
    op("pad_crop_flip", size=SIDE, padding=1, flip=False, kinds=("digits",)),
    op("pad_crop_flip", size=SIDE, padding=4, flip=False, kinds=("cifar",)),
    op("random_resized_crop", size=SIDE, scale=(0.2, 1.0), kinds=("imagenet",)),
    op("color_jitter", strengths=(0.4, 0.4, 0.4, 0.1), p=0.8, kinds=COLOUR),
    op("random_grayscale", p=0.2, kinds=COLOUR),
    op("pil_gaussian_blur", sigma=(0.1, 2.0), p=0.2, kinds=("cifar", "digits")),
    op("pil_gaussian_blur", sigma=(0.1, 2.0), p=0.5, kinds=("imagenet",)),
    op("horizontal_flip", kinds=COLOUR),
    NORMALISE,
)

# The ``data.augment`` training views. "none" is the test view (of every view without one in TEST_VIEWS):
# ImageNet-like images resized to image_size / crop_pct and centre-cropped, then normalised.
TRAIN_VIEWS: dict[str, tuple[Op, ...]] = {
    "standard": (*STANDARD, NORMALISE),
    # + ColorJitter(0.4, 0.4, 0.4) (not for 1-channel digits) + noise: CBD's data-augmentation teachers (text)
    "data_aug": (*STANDARD, JITTER, op("normalise", mean=MEAN, std=STD, noise_sigma=0.01)),
    # + RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p 0.8) + RandomGrayscale(0.2), no noise: CBD's teachers as
    # their code has them (digits: standard only)
    "data_aug_simclr": (*STANDARD, op("color_jitter", strengths=(0.8, 0.8, 0.8, 0.2), p=0.8, kinds=COLOUR),
                        op("random_grayscale", p=0.2, kinds=COLOUR), NORMALISE),
    "randaugment": (*STANDARD, op("randaugment", num_ops=2, magnitude=9, fill=AUTOAUGMENT_FILL), NORMALISE),
    # + ColorJitter(0.4, 0.4, 0.4, 0) + timm's rand-n2-m10-mstd0.5 with NCL's hparams: NCL ImageNet-LT train view
    "randaugment_timm": (*STANDARD, JITTER, op("timm_randaugment", config=TIMM_RANDAUGMENT, hparams=TIMM_HPARAMS),
                         NORMALISE),
    # + AutoAugment (CIFAR-10 policy) + Cutout of half the side; with cutout_fill="black" the Cutout zeroes the
    # [0, 1] image before the normalisation (NCL/BSCE CIFAR query view)
    "autoaugment_cutout": (*STANDARD, AUTOAUGMENT, op("cutout", size=HALF_SIDE, on="uint8", cutout_fill="black"),
                           NORMALISE, op("cutout", size=HALF_SIDE, on="normalised", cutout_fill="mean")),
    "none": TEST_VIEW,
    # + RandomRotation(15) on PIL (RIDE@ab8be5c data_loader/cifar_data_loaders.py:99-105: the CIFAR view of RIDE,
    # SADE and BalPoE; digits too)
    "standard_rotation": (*STANDARD, op("pil_rotation", degrees=ROTATION_DEGREES), NORMALISE),
    # + ColorJitter(0.4, 0.4, 0.4, 0) always (RIDE@ab8be5c data_loader/imagenet_lt_data_loaders.py:76-82)
    "standard_jitter": (*STANDARD, JITTER, NORMALISE),
    # autoaugment_cutout without the Cutout (BalPoE emasa/BalPoE-CalibratedLT@ca607ae dataset/others.py:165-177,
    # whose CIFAR10Policy fills with 128: data.autoaugment_fill)
    "autoaugment": (*STANDARD, AUTOAUGMENT, NORMALISE),
    # a training-style view that the engine applies twice to each test image
    "sade_tta": SADE_TTA,
    # LIFT's code (docs/methods.md "LIFT"): RandomResizedCrop(image_size) (area crop_scale_min-1, bilinear) + flip,
    # nothing else, for every kind: CIFAR's 32 px (and the digits' 8 px) are up-sampled by the crop; no flip for
    # 1-channel digits, as everywhere here. Its test view: TEST_VIEWS["lift_crop"].
    "lift_crop": (op("random_resized_crop", size=IMAGE_SIZE, scale=(CROP_SCALE_MIN, 1.0)),
             op("horizontal_flip", kinds=COLOUR), NORMALISE),
}
AUGMENTS = tuple(TRAIN_VIEWS)
# The test views of the training views that have their own (the others: "none"). LIFT's code: Resize(image_size *
# 8 // 7) + CenterCrop(image_size) for every kind (CIFAR up-sampled), data.interpolation (its presets: bilinear).
TEST_VIEWS: dict[str, tuple[Op, ...]] = {
    "lift_crop": (op("resize_centre_crop", resize=LIFT_RESIZE, size=IMAGE_SIZE, interpolation=INTERPOLATION),
                  NORMALISE),
}
# LIFT's plain view of the training images for the classifier's class means (its code's transform_plain):
# Resize(image_size) + CenterCrop(image_size) for every kind, data.interpolation.
PLAIN_VIEW = (op("resize_centre_crop", resize=IMAGE_SIZE, size=IMAGE_SIZE, interpolation=INTERPOLATION), NORMALISE)

# MoCo v2 key view: RandomResizedCrop(scale 0.2-1), RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p 0.8),
# RandomGrayscale(0.2), flip (+ torchvision's GaussianBlur(23), p 0.5, for ImageNet, as MoCo v2). Digits: a random
# shift (±1 px) and scale (0.8-1.2) only. "moco_blur" appends on CIFAR RandomApply(PIL GaussianBlur, radius ~
# U[0.1, 2.0], p 0.5), as NCL's CIFAR key view has it (docs/methods.md "Recipes behind the published numbers", NCL
# CIFAR, MoCo key view: its flip comes before the colour ops, which commute with it).
MOCO = (
    op("random_affine", translate=0.125, scale=(0.8, 1.2), kinds=("digits",)),
    op("random_resized_crop", size=SIDE, scale=(0.2, 1.0), kinds=COLOUR),
    op("color_jitter", strengths=(0.4, 0.4, 0.4, 0.1), p=0.8, kinds=COLOUR),
    op("random_grayscale", p=0.2, kinds=COLOUR),
    op("gaussian_blur", kernel=23, sigma=(0.1, 2.0), p=0.5, kinds=("imagenet",)),
    op("horizontal_flip", kinds=COLOUR),
)
KEY_VIEWS: dict[str, tuple[Op, ...]] = {
    "moco": (*MOCO, NORMALISE),
    "moco_blur": (*MOCO, op("pil_gaussian_blur", sigma=(0.1, 2.0), p=0.5, kinds=("cifar",)), NORMALISE),
}


def op_names() -> set[str]:
    """Every op name some recipe uses: each back end maps exactly these."""
    return {o.name for ops in (*TRAIN_VIEWS.values(), *TEST_VIEWS.values(), *KEY_VIEWS.values(), PLAIN_VIEW)
            for o in ops}


# ----------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class Recipe:
    """A recipe resolved for one image kind, size and set of options: ``steps`` on the uint8 image, then
    ``norm``, then ``after`` on the normalised image; every parameter a value."""

    name: str
    steps: tuple[Op, ...]
    norm: Op
    after: tuple[Op, ...]


def context(image_kind: str, image_size: int, options: AugmentOptions) -> dict[str, Any]:
    """The values of the :class:`Ref` parameters and of the ``when`` conditions."""
    side = NATIVE_SIZE.get(image_kind, image_size)
    mean, std = mean_std(image_kind, options)
    return {"image_kind": image_kind, "cutout_fill": options.cutout_fill, "side": side, "half_side": side // 2,
            "crop_scale_min": options.crop_scale_min, "autoaugment_fill": options.autoaugment_fill or None,
            "timm_hparams": timm_hparams(image_kind, image_size), "mean": mean, "std": std,
            "eval_resize": eval_resize_side(image_size, options), "interpolation": options.interpolation,
            "image_size": image_size, "lift_resize": image_size * 8 // 7}


def _value(v: Any, ctx: Mapping[str, Any]) -> Any:
    if isinstance(v, Ref):
        return ctx[v.key]
    if isinstance(v, tuple):
        return tuple(_value(x, ctx) for x in v)
    return v


def resolve(name: str, ops: tuple[Op, ...], image_kind: str, image_size: int = 32,
            options: AugmentOptions | None = None) -> Recipe:
    """``ops`` for this kind, size and options: the ops whose conditions hold, their parameters as values."""
    check_kind(image_kind)
    ctx = context(image_kind, image_size, options or AugmentOptions())
    kept = [replace(o, params={k: _value(v, ctx) for k, v in o.params.items()}, when={}) for o in ops
            if all(ctx[key] in values for key, values in o.when.items())]
    cut = [o.name for o in kept].index("normalise")
    return Recipe(name, tuple(kept[:cut]), kept[cut], tuple(kept[cut + 1:]))


SIZING_OPS = ("pad_crop_flip", "random_resized_crop", "resize_centre_crop")  # the ops that set the image's side


def view_side(resolved: Recipe, image_kind: str, image_size: int) -> int:
    """The side of the images a resolved recipe gives: its last sizing op's ``size``, else the input's (CIFAR 32,
    digits 8, ImageNet-like ``image_size``: the device caches and the file decoder hold them at that size)."""
    sizes = [o.params["size"] for o in resolved.steps if o.name in SIZING_OPS]
    return sizes[-1] if sizes else NATIVE_SIZE.get(image_kind, image_size)


def recipe(image_kind: str, augment: str, train: bool, image_size: int = 32,
           options: AugmentOptions | None = None) -> Recipe:
    """The ``data.augment`` view for training (``train=True``), else its test view (:data:`TEST_VIEWS`, by default
    "none")."""
    check_kind(image_kind)
    if augment not in TRAIN_VIEWS:
        raise ValueError(f"unknown data.augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if train:
        return resolve(augment, TRAIN_VIEWS[augment], image_kind, image_size, options)
    if augment in TEST_VIEWS:
        return resolve(f"{augment}_test", TEST_VIEWS[augment], image_kind, image_size, options)
    return resolve("none", TRAIN_VIEWS["none"], image_kind, image_size, options)


def plain_recipe(image_kind: str, image_size: int, options: AugmentOptions | None = None) -> Recipe:
    """LIFT's plain view (:data:`PLAIN_VIEW`): Resize(image_size) + CenterCrop(image_size), normalised."""
    return resolve("plain", PLAIN_VIEW, image_kind, image_size, options)


def key_recipe(image_kind: str, image_size: int = 32, blur: bool = False,
               options: AugmentOptions | None = None) -> Recipe:
    """The MoCo key view (``blur``: NCL's PIL blur on CIFAR)."""
    name = "moco_blur" if blur else "moco"
    return resolve(name, KEY_VIEWS[name], image_kind, image_size, options)
