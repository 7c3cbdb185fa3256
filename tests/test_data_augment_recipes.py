"""The augmentation recipes are data, written once (rayexperts/data/augment/recipes.py; issue 37): both back ends map
exactly the op names the recipes use, bind every op's parameters, and take the same recipe names. The lists here
are derived from the recipes, so a recipe or op added once is covered by both back ends or these tests fail."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from rayexperts.data.augment import per_image, recipes
from rayexperts.data.augment.batched import pipelines
from rayexperts.data.augment.recipes import AUGMENTS, KEY_VIEWS, TRAIN_VIEWS, AugmentOptions

BACK_ENDS = {"per_image": per_image, "batched": pipelines}
OFFICIAL = AugmentOptions(autoaugment_fill=128, cutout_fill="black", crop_scale_min=0.05, normalize="unit")
KINDS = tuple(recipes.MEAN_STD)


def every_resolved_recipe():
    for kind in KINDS:
        for options in (None, OFFICIAL):
            for name in AUGMENTS:
                for train in (True, False):
                    yield recipes.recipe(kind, name, train, 24, options)
            for blur in (False, True):
                yield recipes.key_recipe(kind, 24, blur, options)
            yield recipes.plain_recipe(kind, 24, options)


def test_both_back_ends_map_exactly_the_op_names_the_recipes_use():
    used = recipes.op_names()
    assert {"normalise", "pad_crop_flip", "color_jitter", "cutout", "timm_randaugment"} <= used
    for name, back_end in BACK_ENDS.items():
        assert set(back_end.OPS) == used, name


def test_an_op_added_to_a_recipe_is_an_op_name_both_back_ends_must_map(monkeypatch):
    monkeypatch.setitem(TRAIN_VIEWS, "posterize_demo", (recipes.op("posterize", bits=4), recipes.NORMALISE))
    assert recipes.op_names() - set(per_image.OPS) == recipes.op_names() - set(pipelines.OPS) == {"posterize"}


def test_every_resolved_op_binds_to_both_back_ends_and_both_build_every_recipe():
    seen = set()
    for resolved in every_resolved_recipe():
        ops = (*resolved.steps, resolved.norm, *resolved.after)
        assert not any(isinstance(v, recipes.Ref) for o in ops for v in o.params.values()), resolved.name
        for o in ops:
            seen.add(o.name)
            for back_end in BACK_ENDS.values():
                inspect.signature(back_end.OPS[o.name]).bind(**o.params)  # a TypeError names the mismatch
        per_image.compose(resolved)
        pipelines.compose(resolved)
    assert seen == recipes.op_names()  # every op of the table occurs for some kind and options


def test_both_back_ends_take_the_same_recipe_names():
    assert set(AUGMENTS) == set(TRAIN_VIEWS) and set(KEY_VIEWS) == {"moco", "moco_blur"}
    for augment in AUGMENTS:
        per_image.build_transform("cifar", augment, train=True)
        pipelines.batch_transform("cifar", augment, train=True)
    messages = []
    for make in (per_image.build_transform, pipelines.batch_transform):
        with pytest.raises(ValueError, match="unknown data.augment 'mixup'") as error:
            make("cifar", "mixup", train=True)
        messages.append(str(error.value))
        with pytest.raises(ValueError, match="unknown image kind 'svhn'"):
            make("svhn", "standard", train=True)
    assert messages[0] == messages[1]


def test_resolving_applies_the_kind_the_size_and_the_options_by_hand():
    black = recipes.recipe("cifar", "autoaugment_cutout", True, options=AugmentOptions(cutout_fill="black",
                                                                                       autoaugment_fill=128))
    assert [(o.name, dict(o.params)) for o in black.steps] == [
        ("pad_crop_flip", {"size": 32, "padding": 4, "flip": True}),
        ("autoaugment", {"policy": "cifar10", "fill": 128}),
        ("cutout", {"size": 16, "on": "uint8"})]
    assert black.after == ()
    mean = recipes.recipe("cifar", "autoaugment_cutout", True)
    assert [o.name for o in mean.steps] == ["pad_crop_flip", "autoaugment"]
    assert mean.steps[1].params["fill"] is None  # fill 0: torchvision's default
    assert [(o.name, dict(o.params)) for o in mean.after] == [("cutout", {"size": 16, "on": "normalised"})]
    # ImageNet: the crop at data.image_size from crop_scale_min; Cutout half of it
    imagenet = recipes.recipe("imagenet", "autoaugment_cutout", True, 40, AugmentOptions(crop_scale_min=0.05))
    assert dict(imagenet.steps[0].params) == {"size": 40, "scale": (0.05, 1.0)}
    assert imagenet.steps[1].name == "horizontal_flip" and imagenet.after[0].params["size"] == 20
    # digits: data_aug has no colour op, only the noise; 8 px crop with 1 px padding, no flip
    digits = recipes.recipe("digits", "data_aug", True)
    assert [(o.name, dict(o.params)) for o in digits.steps] == [
        ("pad_crop_flip", {"size": 8, "padding": 1, "flip": False})]
    assert dict(digits.norm.params) == {"mean": (0.3053,), "std": (0.3759,), "noise_sigma": 0.01}
    # the test view: ImageNet resizes to round(24 / 0.8) = 30 and centre-crops 24; unit normalisation
    test = recipes.recipe("imagenet", "randaugment", False, 24, AugmentOptions(crop_pct=0.8, normalize="unit"))
    assert [(o.name, dict(o.params)) for o in test.steps] == [
        ("resize_centre_crop", {"resize": 30, "size": 24, "interpolation": "bilinear"})]
    assert dict(test.norm.params) == {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "noise_sigma": 0.0}
    # SADE's blur: p 0.2 on CIFAR, 0.5 on ImageNet; the CIFAR key view's PIL blur only with blur=True
    assert [o.params["p"] for o in recipes.recipe("cifar", "sade_tta", True).steps if o.name == "pil_gaussian_blur"] \
        == [0.2]
    assert [o.params["p"] for o in recipes.recipe("imagenet", "sade_tta", True, 24).steps
            if o.name == "pil_gaussian_blur"] == [0.5]
    assert [o.name for o in recipes.key_recipe("cifar", blur=True).steps][-1] == "pil_gaussian_blur"
    assert "pil_gaussian_blur" not in [o.name for o in recipes.key_recipe("imagenet", 24, blur=True).steps]


def test_the_lift_recipe_by_hand_for_every_kind():
    """LIFT's code (docs/methods.md "LIFT"): RandomResizedCrop(res, 0.08-1) + flip; test Resize(res * 8 // 7) +
    CenterCrop(res), bilinear; CIFAR's 32 px and the digits' 8 px up-sampled to res; the class-mean view
    Resize(res) + CenterCrop(res)."""
    for kind in KINDS:
        train = recipes.recipe(kind, "lift_crop", True, 224)
        flip = [] if kind == "digits" else [("horizontal_flip", {})]  # 1-channel digits: no flip, as everywhere
        assert [(o.name, dict(o.params)) for o in train.steps] == [
            ("random_resized_crop", {"size": 224, "scale": (0.08, 1.0)}), *flip]
        assert train.after == () and dict(train.norm.params)["mean"] == recipes.MEAN_STD[kind][0]
        test = recipes.recipe(kind, "lift_crop", False, 224)
        assert [(o.name, dict(o.params)) for o in test.steps] == [
            ("resize_centre_crop", {"resize": 256, "size": 224, "interpolation": "bilinear"})]
        assert recipes.view_side(train, kind, 224) == recipes.view_side(test, kind, 224) == 224
        plain = recipes.plain_recipe(kind, 224)
        assert [dict(o.params) for o in plain.steps] == [{"resize": 224, "size": 224, "interpolation": "bilinear"}]
    # 384 * 8 // 7 = 438 (floor of 438.86), where the other views' round(384 / 0.875) would give 439
    assert recipes.recipe("cifar", "lift_crop", False, 384).steps[0].params["resize"] == 438
    assert recipes.recipe("cifar", "none", False, 384).steps == ()  # the other views keep CIFAR's 32 px
    assert recipes.view_side(recipes.recipe("cifar", "standard", False, 384), "cifar", 384) == 32


def test_the_lift_views_up_sample_cifar_on_both_back_ends_alike():
    """A CIFAR batch at data.image_size 40: the test views of both back ends give the same pixels (resize the short
    side to 40 * 8 // 7 = 45, centre-crop 40: rows/columns 2-41 of the resized image); the training views give
    40 x 40 images; a box of the crop gives the same pixels as torchvision's resized_crop (to 1/255)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from rayexperts.data.augment.batched import core, geometry

    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    batched = pipelines.batch_transform("cifar", "lift_crop", False, 40)(x, core.BatchRng(0, torch.device("cpu")))
    per = per_image.build_transform("cifar", "lift_crop", False, 40)
    assert batched.shape == (4, 3, 40, 40) and torch.equal(batched, torch.stack([per(i) for i in x]))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in recipes.MEAN_STD["cifar"])
    by_hand = TF.resize(x[0], [45], antialias=True)[:, 2:42, 2:42]
    assert torch.allclose(per(x[0]), (by_hand.float() / 255 - mean) / std, atol=1e-6)
    train = pipelines.batch_transform("cifar", "lift_crop", True, 40)(x, core.BatchRng(1, torch.device("cpu")))
    torch.manual_seed(1)
    one = per_image.build_transform("cifar", "lift_crop", True, 40)(x[0])
    assert train.shape == (4, 3, 40, 40) and one.shape == (3, 40, 40)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 14, 20], [10, 2, 22, 17], [7, 7, 9, 9]])
    up = geometry.crop_resize(x.float(), boxes, 40)
    for img, o, (t, l, h, w) in zip(x, up, boxes.tolist()):
        assert (o - TF.resized_crop(img, t, l, h, w, [40, 40], antialias=True).float()).abs().max() <= 1


def test_the_recipes_import_no_torch():
    code = "import sys, rayexperts.data.augment.recipes; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
