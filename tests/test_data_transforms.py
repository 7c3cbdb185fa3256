"""Augmentation presets, the MoCo key view and the dataset wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from rayexperts.data import AUGMENTS, ArraySource, TransformedDataset, TwoView, build_transform, moco_transform
from rayexperts.data.augment.per_image import Cutout
from rayexperts.data.augment.recipes import MEAN_STD, recipe, view_side

INPUTS = {
    "digits": (torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8), (1, 8, 8)),
    "cifar": (torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), (3, 32, 32)),
    "imagenet": (Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)), (3, 40, 40)),
}


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("augment", AUGMENTS)
def test_every_preset_gives_a_normalised_float_chw_tensor(kind, augment):
    img, (c, *_) = INPUTS[kind]
    for train in (True, False):
        x = build_transform(kind, augment, train, image_size=40)(img)
        side = view_side(recipe(kind, augment, train, 40), kind, 40)  # 40 for lift_crop (CIFAR, digits up-sampled)
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and tuple(x.shape) == (c, side, side)
        assert torch.isfinite(x).all()


def test_test_transform_is_deterministic_and_normalises():
    img, _ = INPUTS["cifar"]
    t = build_transform("cifar", "standard", train=False)
    assert torch.equal(t(img), t(img))
    expected = (img.float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]) / torch.tensor(
        [0.2023, 0.1994, 0.2010]
    )[:, None, None]
    assert torch.allclose(t(img), expected, atol=1e-5)


def test_imagenet_test_transform_resizes_then_centre_crops():
    steps = build_transform("imagenet", "standard", train=False, image_size=224).transforms
    assert isinstance(steps[0], v2.Resize) and steps[0].size == [256]
    assert isinstance(steps[1], v2.CenterCrop) and steps[1].size == (224, 224)


def test_data_aug_is_brightness_jitter_and_noise_of_sigma_001_before_normalize():
    """After the pad-crop (the first step), on a uniform grey image (value 128) only ColorJitter's
    brightness acts (contrast and saturation blend grey with itself): each image is grey · b with
    b ~ U[0.6, 1.4] (to uint8 rounding), the same in every channel, plus Gaussian noise of σ = 0.01 on
    [0, 1] added before Normalize."""
    torch.manual_seed(0)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in MEAN_STD["cifar"])
    t = build_transform("cifar", "data_aug", train=True)
    assert type(t.transforms[0]).__name__ == "PadCropFlip"
    after_crop = v2.Compose(t.transforms[1:])
    grey = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    centres = torch.stack([after_crop(grey) * std + mean for _ in range(400)])  # back to [0, 1]
    noise = centres.std((2, 3)).mean(0)
    assert ((noise - 0.01).abs() < 0.0015).all(), noise
    level = centres.mean((2, 3))  # [400, 3]
    assert (level.max(1).values - level.min(1).values).max() < 0.004  # grey stays grey
    b = level.mean(1) / (128 / 255)
    assert 0.6 - 0.02 < b.min() < 0.63 and 1.37 < b.max() < 1.4 + 0.01, (b.min(), b.max())
    digits = build_transform("digits", "data_aug", train=True)
    digits = v2.Compose(digits.transforms[1:])  # after the pad-1 crop
    flat = torch.stack([digits(torch.full((1, 8, 8), 128, dtype=torch.uint8)) for _ in range(50)])
    flat = flat * MEAN_STD["digits"][1][0] + MEAN_STD["digits"][0][0]
    assert (flat.mean((1, 2, 3)) - 128 / 255).abs().max() < 0.01 and 0.007 < flat.std((2, 3)).mean() < 0.013


def test_autoaugment_cutout_and_randaugment_presets():
    steps = build_transform("cifar", "autoaugment_cutout", train=True).transforms
    assert any(isinstance(t, v2.AutoAugment) and t.policy == v2.AutoAugmentPolicy.CIFAR10 for t in steps)
    assert isinstance(steps[-1], Cutout) and steps[-1].size == 16
    assert any(isinstance(t, v2.RandAugment) for t in build_transform("cifar", "randaugment", train=True).transforms)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    for _ in range(20):
        out = Cutout(16)(torch.ones(3, 32, 32))
        rows, cols = torch.nonzero(out[0] == 0, as_tuple=True)
        assert 0 < len(rows) <= 256 and (out[:, rows, cols] == 0).all()
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


@pytest.mark.parametrize("kind", list(INPUTS))
def test_two_views_through_the_dataset_wrapper(kind):
    img, shape = INPUTS[kind]
    t_key = moco_transform(kind, image_size=40)
    q, k = TwoView(build_transform(kind, "standard", True, 40), t_key)(img)
    assert tuple(q.shape) == tuple(k.shape) == shape
    if kind != "imagenet":
        source = ArraySource(img[None].numpy().repeat(3, 0), np.array([0, 1, 2]))
        ds = TransformedDataset(source, TwoView(t_key, t_key))
        views = [ds[2] for _ in range(5)]
        assert all(len(v) == 3 and v[2] == 2 for v in views) and ds.labels.tolist() == [0, 1, 2]
        assert not all(torch.equal(x1, x2) for x1, x2, _ in views)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown data.augment 'mixup'"):
        build_transform("cifar", "mixup", True)
    with pytest.raises(ValueError, match="unknown image kind 'svhn'"):
        moco_transform("svhn")


def test_fast_normalise_equals_the_v2_chain():
    from PIL import Image

    from rayexperts.data.augment.per_image import ToNormalised
    from rayexperts.data.augment.recipes import MEAN_STD

    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    ref = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*MEAN_STD["cifar"])])
    fast = ToNormalised(*MEAN_STD["cifar"])
    torch.testing.assert_close(fast(img), ref(img).as_subclass(torch.Tensor))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    torch.testing.assert_close(fast(pil), ref(pil).as_subclass(torch.Tensor))
    assert img.dtype == torch.uint8 and type(fast(img)) is torch.Tensor


def test_pad_crop_flip_gives_every_window_of_the_padded_image():
    from rayexperts.data.augment.per_image import PadCropFlip

    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    windows = {(i, j, f): padded[:, i : i + 8, j : j + 8].flip(-1) if f else padded[:, i : i + 8, j : j + 8]
               for i in range(5) for j in range(5) for f in (0, 1)}
    seen = set()
    for _ in range(1500):
        out = PadCropFlip(8, padding=2)(img)
        hits = [k for k, w in windows.items() if torch.equal(out, w)]
        assert hits, "not a window of the zero-padded image"
        seen.update(hits)
    assert {k[:2] for k in seen} == {(i, j) for i in range(5) for j in range(5)} and {k[2] for k in seen} == {0, 1}
    no_flip = {k[2] for _ in range(200) for k, w in windows.items() if torch.equal(PadCropFlip(8, 2, flip=False)(img), w)}
    assert 0 in no_flip


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("augment", AUGMENTS)
def test_every_preset_with_the_official_options(kind, augment):
    """docs/methods.md "Recipes behind the published numbers": fill 128, black Cutout, crop area from 0.05, x/255."""
    from rayexperts.data.augment.recipes import AugmentOptions

    options = AugmentOptions(autoaugment_fill=128, cutout_fill="black", crop_scale_min=0.05, normalize="unit")
    img, (c, *_) = INPUTS[kind]
    torch.manual_seed(0)
    for train in (True, False):
        x = build_transform(kind, augment, train, image_size=40, options=options)(img)
        side = view_side(recipe(kind, augment, train, 40, options), kind, 40)
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and tuple(x.shape) == (c, side, side)
        assert 0 <= x.min() and x.max() <= 1  # unit: x/255


@pytest.mark.parametrize("kind", list(INPUTS))
def test_moco_key_view_with_blur_for_every_kind(kind):
    img, shape = INPUTS[kind]
    torch.manual_seed(0)
    views = [moco_transform(kind, image_size=40, blur=True)(img) for _ in range(4)]
    assert all(type(v) is torch.Tensor and tuple(v.shape) == shape for v in views)


def test_the_recipe_views_are_named_augments_and_sade_tta_gives_two_views():
    """standard_rotation, standard_jitter, autoaugment and sade_tta (RIDE / SADE / BalPoE) are data.augment names
    on every kind; sade_tta is a training-style view (train=True) applied twice to each test image."""
    for augment in ("standard_rotation", "standard_jitter", "autoaugment", "sade_tta"):
        assert augment in AUGMENTS
    torch.manual_seed(0)
    for kind, (img, shape) in INPUTS.items():
        t = build_transform(kind, "sade_tta", train=True, image_size=40)
        views = [TwoView(t, t)(img) for _ in range(3)]
        assert all(tuple(v.shape) == shape for pair in views for v in pair)
        assert not all(torch.equal(a, b) for a, b in views), kind
