"""The augmentations of the authors' recipes (docs/methods.md "Recipes behind the published numbers"): timm's
RandAugment (NCL ImageNet-LT), CBD's SimCLR-style teachers, the official AutoAugment + Cutout CIFAR view
(NCL, Balanced Softmax), NCL's PIL Gaussian blur on the CIFAR key view, and the AugmentOptions switches. Each
per-image transform is tested against its batched twin: same parameters give the same pixels (exactly: the
twins repeat Pillow's integer and float arithmetic), and the draws follow the same distributions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from timm.data import auto_augment as timm_aa
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from rayexperts.data.augment.batched import autoaugment, core, geometry, pil, pipelines, timm_randaugment
from rayexperts.data.augment.per_image import (
    Cutout,
    PILGaussianBlur,
    PILRandomRotation,
    TimmRandAugment,
    ToUint8,
    build_transform,
    moco_transform,
)
from rayexperts.data.augment.recipes import AUGMENTS, MEAN_STD, AugmentOptions, timm_hparams

CPU = torch.device("cpu")
FILL = (124, 116, 104)  # NCL's img_mean for ImageNet: round(255 * (0.485, 0.456, 0.406))
HPARAMS = {"translate_const": 100, "img_mean": FILL}


def rng(seed: int = 0) -> core.BatchRng:
    return core.BatchRng(seed, CPU)


def array(h: int = 32, w: int = 32, c: int = 3, seed: int = 0, narrow: bool = False) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    if narrow:  # a few grey levels in a narrow range: autocontrast/equalize have work to do
        a = (a // 64 * 23 + 61).astype(np.uint8)
    return a[..., 0] if c == 1 else a


def as_batch(a: np.ndarray) -> torch.Tensor:
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()


def from_pil(img: Image.Image) -> torch.Tensor:
    return as_batch(np.array(img))


def twin_op(x: torch.Tensor, name: str, arg, bicubic: bool, fill=FILL) -> torch.Tensor:
    """The batched twin of timm's op ``name`` with argument ``arg`` on a batch of one."""
    h, w = x.shape[-2:]
    if name == "AutoContrast":
        return pil.pil_autocontrast(x)
    if name == "Equalize":
        return pil.pil_equalize(x)
    if name in timm_randaugment._TIMM_LUT:
        return pil.pil_lut(x, torch.tensor([timm_randaugment.timm_lut(name, arg)], dtype=torch.uint8))
    if name in timm_randaugment._TIMM_ENHANCE:
        enhance = timm_randaugment._PIL_ENHANCE[timm_randaugment._TIMM_ENHANCE.index(name)]
        return enhance(x, torch.tensor([arg], dtype=torch.float64).float())
    matrix = torch.tensor([timm_randaugment.timm_matrix(name, arg, w, h)], dtype=torch.float64)
    return pil.pil_affine(x, matrix, bicubic, fill)


def timm_op(a: np.ndarray, name: str, arg, bicubic: bool, fill=FILL) -> torch.Tensor:
    kwargs = {"fillcolor": fill, "resample": Image.BICUBIC if bicubic else Image.BILINEAR}
    return from_pil(timm_aa.NAME_TO_OP[name](Image.fromarray(a), *(() if arg is None else (arg,)), **kwargs))


# -- AugmentOptions ---------------------------------------------------------------------------------------


def test_augment_options_defaults_and_validation():
    o = AugmentOptions()
    assert (o.autoaugment_fill, o.cutout_fill, o.crop_scale_min, o.normalize) == (0, "mean", 0.08, "mean_std")
    for bad in ({"cutout_fill": "grey"}, {"normalize": "z"}, {"crop_scale_min": 0.0}, {"autoaugment_fill": 256}):
        with pytest.raises(ValueError):
            AugmentOptions(**bad)
    with pytest.raises(Exception):
        o.normalize = "unit"  # frozen


@pytest.mark.parametrize("augment", [a for a in AUGMENTS if a != "none"])
def test_default_options_are_the_presets_bit_for_bit(augment):
    x = torch.randint(0, 256, (12, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    a = pipelines.batch_transform("cifar", augment, True)(x, rng(3))
    b = pipelines.batch_transform("cifar", augment, True, options=AugmentOptions())(x, rng(3))
    assert torch.equal(a, b)
    torch.manual_seed(4)
    c = build_transform("cifar", augment, True)(x[0])
    torch.manual_seed(4)
    d = build_transform("cifar", augment, True, options=AugmentOptions())(x[0])
    assert torch.equal(c, d)


@pytest.mark.parametrize("kind", ["cifar", "digits", "imagenet"])
def test_unit_normalisation_is_x_over_255_on_both_paths(kind):
    c, side = (1, 8) if kind == "digits" else (3, 32)
    unit = AugmentOptions(normalize="unit")
    x = torch.randint(0, 256, (6, c, side, side), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    batched = pipelines.batch_transform(kind, "none", False, side, options=unit)(x, rng())
    test = build_transform(kind, "standard", False, side, options=unit)
    if kind == "imagenet":  # both test views resize and centre-crop first, on the uint8 values
        resized = torch.stack([v2.Compose(test.transforms[:2])(i) for i in x])
        assert torch.equal(batched, resized.float() / 255)
        pil = [v2.functional.to_pil_image(i) for i in x]
        resized = torch.stack([v2.functional.pil_to_tensor(v2.Compose(test.transforms[:2])(p)) for p in pil])
        assert torch.equal(torch.stack([test(p) for p in pil]), resized.float() / 255)
    else:
        assert torch.equal(batched, x.float() / 255)
    assert torch.equal(torch.stack([test(i) for i in x]), batched)
    trained = pipelines.batch_transform(kind, "data_aug_simclr", True, side, options=unit)(x, rng())
    assert trained.min() >= 0 and trained.max() <= 1


def test_crop_scale_min_reaches_both_imagenet_crops():
    options = AugmentOptions(crop_scale_min=0.05)
    crop = build_transform("imagenet", "standard", True, 32, options=options).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.05, 1.0)
    twin = pipelines.batch_transform("imagenet", "standard", True, 32, options=options).steps[0]
    assert isinstance(twin, geometry.RandomResizedCrop) and twin.scale == (0.05, 1.0)
    boxes = twin.plan((4000, 3, 64, 64), rng(5))["boxes"]
    area = (boxes[:, 2] * boxes[:, 3]).double() / 64**2
    torch.manual_seed(0)
    ref = [crop.make_params([torch.zeros(3, 64, 64)]) for _ in range(4000)]
    ref_area = np.array([p["height"] * p["width"] / 64**2 for p in ref])
    assert stats.ks_2samp(area.numpy(), ref_area).pvalue > 0.001
    assert 0.02 < (area < 0.075).double().mean() < 0.05  # below the default 0.08: about (0.08-0.05)/0.95 of crops
    default = pipelines.batch_transform("imagenet", "standard", True, 32).steps[0]
    assert default.scale == (0.08, 1.0)


# -- timm's RandAugment: the per-image path is timm's with NCL's hparams ------------------------------------


def test_the_per_image_path_is_timms_rand_augment_with_ncls_hparams():
    steps = build_transform("imagenet", "randaugment_timm", True, 224).transforms
    assert isinstance(steps[0], v2.RandomResizedCrop) and steps[0].scale == (0.08, 1.0)
    assert isinstance(steps[1], v2.RandomHorizontalFlip)
    jitter = steps[2]
    assert isinstance(jitter, v2.ColorJitter) and jitter.brightness == (0.6, 1.4) and jitter.hue is None
    ra = steps[3]
    assert isinstance(ra, TimmRandAugment) and ra.config == "rand-n2-m10-mstd0.5"
    # NCL lib/dataset/others.py:87-88: translate_const=int(224 * 0.45), img_mean = the mean as 0-255 ints
    assert ra.hparams == {"translate_const": 100, "img_mean": FILL}
    ops = ra.ra.ops
    assert [op.name for op in ops] == list(timm_randaugment.TIMM_OPS) == list(timm_aa._RAND_TRANSFORMS)
    assert ra.ra.num_layers == 2 and ra.ra.choice_weights is None
    for op in ops:
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (0.5, 10, 0.5, None)
        assert op.kwargs["fillcolor"] == FILL and op.kwargs["resample"] == timm_aa._RANDOM_INTERPOLATION
    assert timm_aa._LEVEL_DENOM == timm_randaugment.TIMM_LEVEL_DENOM
    assert timm_hparams("cifar", 32) == {"translate_const": 14, "img_mean": (125, 123, 114)}
    assert timm_hparams("digits", 8)["img_mean"] == 78


def test_timm_rand_augment_follows_torchs_seed_and_leaves_other_generators_alone():
    img = Image.fromarray(array(32, 32, seed=1))
    t = TimmRandAugment("rand-n2-m10-mstd0.5", HPARAMS)
    random.seed(7)
    np.random.seed(7)
    py_next, np_next = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(3)
    first = [np.asarray(t(img)) for _ in range(6)]
    assert random.random() == py_next and np.random.rand() == np_next
    torch.manual_seed(3)
    assert all(np.array_equal(a, np.asarray(t(img))) for a in first)
    assert len({a.tobytes() for a in first}) > 1


def test_timm_level_arguments_are_timms(monkeypatch):
    magnitudes = [0.0, 0.3, 2.49, 2.5, 5.0, 7.49, 7.5, 9.13, 9.999, 10.0]
    for negate, draw in ((False, 0.25), (True, 0.75)):  # timm negates when random() > 0.5
        monkeypatch.setattr(timm_aa.random, "random", lambda draw=draw: draw)
        for name in timm_randaugment.TIMM_OPS:
            fn = timm_aa.LEVEL_TO_ARG[name]
            for m in magnitudes:
                expected = None if fn is None else fn(m, HPARAMS)[0]
                assert timm_randaugment.timm_level_arg(name, m, negate, HPARAMS) == expected, (name, m, negate)


# -- each timm op: the twin gives timm's pixels ----------------------------------------------------------


@pytest.mark.parametrize("name, bicubic", [(n, False) for n in timm_randaugment.TIMM_OPS]
                         + [(n, True) for n in timm_randaugment._TIMM_GEOMETRIC])
def test_each_timm_op_gives_timms_pixels(name, bicubic):
    """Exact, for every op (geometric ones with either filter): Pillow's blends, filters and tables are float32
    or integer arithmetic, its affine resampling double arithmetic, all repeated step by step."""
    cases = 0
    for seed, (h, w), narrow in ((0, (32, 32), False), (1, (37, 29), True), (2, (24, 40), False)):
        a = array(h, w, seed=seed, narrow=narrow)
        for m in (10.0, 9.61, 8.2, 6.05):
            for negative in (False, True):
                arg = timm_randaugment.timm_level_arg(name, m, negative, HPARAMS)
                out = twin_op(as_batch(a), name, arg, bicubic)
                assert torch.equal(out, timm_op(a, name, arg, bicubic)), (name, seed, m, negative)
                cases += 1
    assert cases == 24


@pytest.mark.parametrize("name", timm_randaugment.TIMM_OPS)
def test_each_timm_op_on_one_channel_images(name):
    a = array(12, 12, c=1, seed=3, narrow=True)
    arg = timm_randaugment.timm_level_arg(name, 9.4, True, HPARAMS)
    assert torch.equal(twin_op(as_batch(a), name, arg, True, fill=(78,)), timm_op(a, name, arg, True, fill=78))


def test_geometric_ops_on_an_imagenet_sized_image():
    a = array(224, 224, seed=4)
    for name, arg, bicubic in (("Rotate", -27.3, True), ("ShearY", 0.281, False), ("TranslateXRel", 0.4117, True)):
        assert torch.equal(twin_op(as_batch(a), name, arg, bicubic), timm_op(a, name, arg, bicubic)), name


def test_the_batched_rand_augment_equals_timms_ops_per_image():
    """A batch through the twin = each image through timm's own ops with the twin's draws, round by round
    (groups sorted, sliced and scattered back; table, blend and affine parameters per image)."""
    ra = timm_randaugment.BatchTimmRandAugment("rand-n2-m10-mstd0.5", HPARAMS)
    x = torch.stack([as_batch(array(32, 32, seed=s, narrow=s % 3 == 0))[0] for s in range(40)])
    out = ra(x, rng(8))
    d = ra.draw(40, 32, 32, rng(8))
    assert d["applied"].sum() > 30 and len(set(d["ops"][d["applied"]].tolist())) >= 12
    for i in range(40):
        a = x[i].permute(1, 2, 0).numpy().astype(np.uint8)
        for k in range(2):
            if d["applied"][k, i]:
                name = timm_randaugment.TIMM_OPS[int(d["ops"][k, i])]
                arg = timm_randaugment.timm_level_arg(name, float(d["magnitude"][k, i]), bool(d["negative"][k, i]),
                                                      HPARAMS)
                a = timm_op(a, name, arg, bool(d["bicubic"][k, i]))[0].permute(1, 2, 0).numpy().astype(np.uint8)
        assert torch.equal(out[i], as_batch(a)[0]), i


# -- timm's RandAugment: the draws ---------------------------------------------------------------------------


def test_rand_augment_draws_ops_uniformly_each_at_p_half_with_clipped_gaussian_magnitudes():
    n = 30_000
    d = timm_randaugment.BatchTimmRandAugment("rand-n2-m10-mstd0.5", HPARAMS).draw(n, 32, 32, rng(9))
    ops, applied = d["ops"].flatten(), d["applied"].flatten()
    counts = torch.bincount(ops, minlength=15).numpy()
    assert len(counts) == 15 and stats.chisquare(counts).pvalue > 0.001, counts  # with replacement, uniform
    assert (d["ops"][0] == d["ops"][1]).double().mean().item() == pytest.approx(1 / 15, abs=0.006)
    assert applied.double().mean().item() == pytest.approx(0.5, abs=0.01)  # p 0.5, not 1.0
    per_op = torch.bincount(ops[applied], minlength=15).numpy() / counts
    assert np.abs(per_op - 0.5).max() < 0.05, per_op
    m = d["magnitude"].flatten().numpy()
    assert m.max() == 10.0 and m.min() >= 0 and np.mean(m == 10.0) == pytest.approx(0.5, abs=0.01)
    below = (10.0 - m[m < 10.0]) / 0.5  # |N(0, 1)| for the half that the clip leaves alone
    assert stats.kstest(below, "halfnorm").pvalue > 0.001
    assert d["negative"].double().mean().item() == pytest.approx(0.5, abs=0.01)
    assert d["bicubic"].double().mean().item() == pytest.approx(0.5, abs=0.01)


def test_rand_augment_draws_match_timms_own(monkeypatch):
    """Which ops timm applies, how often, and the sizes of their arguments, against the twin's, from 3000
    images through timm's RandAugment (recorded by wrapping its ops) and 3000 twin draws."""
    ra = timm_aa.rand_augment_transform("rand-n2-m10-mstd0.5", dict(HPARAMS))
    seen: dict[str, list] = {name: [] for name in timm_randaugment.TIMM_OPS}
    for op in ra.ops:
        def record(img, *args, _name=op.name, **kwargs):
            seen[_name].append(abs(args[0]) if args else 0.0)
            return img

        op.aug_fn = record
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (4, 4))
    for _ in range(3000):
        ra(img)
    d = timm_randaugment.BatchTimmRandAugment("rand-n2-m10-mstd0.5", HPARAMS).draw(3000, 32, 32, rng(10))
    twin: dict[str, list] = {name: [] for name in timm_randaugment.TIMM_OPS}
    for k in range(2):
        for i in torch.nonzero(d["applied"][k]).flatten().tolist():
            name = timm_randaugment.TIMM_OPS[int(d["ops"][k, i])]
            arg = timm_randaugment.timm_level_arg(name, float(d["magnitude"][k, i]), bool(d["negative"][k, i]), HPARAMS)
            twin[name].append(abs(arg) if arg is not None else 0.0)
    table = np.array([[len(seen[n]) for n in timm_randaugment.TIMM_OPS],
                      [len(twin[n]) for n in timm_randaugment.TIMM_OPS]])
    assert stats.chi2_contingency(table).pvalue > 0.001, table
    assert table.sum(1) / 6000 == pytest.approx([0.5, 0.5], abs=0.02)
    for name in ("Rotate", "Color", "TranslateXRel"):
        assert stats.ks_2samp(seen[name], twin[name]).pvalue > 0.001, name


# -- the PIL Gaussian blur of NCL's CIFAR key view ------------------------------------------------------------


def test_pillow_box_blur_weights_and_passes_give_pillows_gaussian_blur():
    radii = list(np.linspace(0.1, 2.0, 39)) + [0.1000001, 0.5, 1.0, 1.5, 1.9999999]
    for k, radius in enumerate(radii):
        a = array(32, 32, seed=k % 4)
        whole, ww, fw = pil.pil_box_blur_weights(radius)
        weights = torch.zeros(1, 2 * whole + 3, dtype=torch.long)
        weights[0, 1:-1], weights[0, 0], weights[0, -1] = ww, fw, fw
        v = as_batch(a).long()
        for _ in range(3):
            v = pil._box_blur_pass(v, weights)
        v = v.transpose(-1, -2)
        for _ in range(3):
            v = pil._box_blur_pass(v, weights)
        ref = from_pil(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=float(radius))))
        assert torch.equal(v.transpose(-1, -2).float(), ref), radius


def test_the_batched_pil_blur_equals_the_per_image_filter():
    x = torch.stack([as_batch(array(32, 32, seed=s))[0] for s in range(16)])
    blur = pil.pil_gaussian_blur((0.1, 2.0), p=0.5)
    out = blur(x, rng(11))
    r = rng(11)
    chosen = r.uniform_cpu(16) < 0.5
    radii = r.uniform64(16, 0.1, 2.0)
    assert 0 < chosen.sum() < 16
    for i in range(16):
        a = x[i].permute(1, 2, 0).numpy().astype(np.uint8)
        ref = from_pil(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=float(radii[i]))))[0]
        assert torch.equal(out[i], ref if chosen[i] else x[i]), i


def test_the_per_image_pil_blur_draws_its_radius_from_torch():
    t = PILGaussianBlur((0.1, 2.0))
    a = array(32, 32, seed=5)
    tensor = torch.from_numpy(a).permute(2, 0, 1)
    torch.manual_seed(12)
    out = t(tensor)
    torch.manual_seed(12)
    radius = float(torch.empty(()).uniform_(0.1, 2.0))
    assert torch.equal(out.float()[None], from_pil(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius))))
    assert isinstance(t(Image.fromarray(a)), Image.Image)


def test_blur_distribution_half_of_the_images_with_uniform_radii():
    n = 4000
    plan = pil.pil_gaussian_blur((0.1, 2.0), p=0.5).plan((n, 3, 32, 32), rng(13))
    weights = plan["weights"]
    reach = weights.shape[1] // 2
    identity = (weights[:, reach] == 1 << 24)
    assert identity.double().mean().item() == pytest.approx(0.5, abs=0.02)
    r = rng(13)
    r.uniform_cpu(n)
    radii = r.uniform64(n, 0.1, 2.0).numpy()
    assert stats.kstest((radii - 0.1) / 1.9, "uniform").pvalue > 0.001
    # the weights are those of each chosen image's radius
    for i in torch.nonzero(~identity).flatten()[:50].tolist():
        whole, ww, fw = pil.pil_box_blur_weights(float(radii[i]))
        assert weights[i, reach] == ww and weights[i, reach - whole - 1] == fw


def test_moco_key_view_with_blur_on_cifar_only():
    steps = moco_transform("cifar", 32, blur=True).transforms
    blur = steps[-2]  # NCL's cui_cifar.py: the blur is the last op before ToTensor
    assert isinstance(blur, v2.RandomApply) and blur.p == 0.5 and isinstance(blur.transforms[0], PILGaussianBlur)
    assert blur.transforms[0].sigma == (0.1, 2.0)
    assert not any(isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], PILGaussianBlur)
                   for t in moco_transform("cifar", 32).transforms)
    imagenet = moco_transform("imagenet", 32, blur=True).transforms
    assert [type(t) for t in imagenet] == [type(t) for t in moco_transform("imagenet", 32).transforms]
    twin = pipelines.batch_moco_transform("cifar", 32, blur=True).steps
    assert len(twin) == len(pipelines.batch_moco_transform("cifar", 32).steps) + 1
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    key = pipelines.batch_moco_transform("cifar", 32, blur=True)(x, rng(14))
    assert key.shape == (8, 3, 32, 32) and torch.isfinite(key).all()
    assert moco_transform("cifar", 32, blur=True)(x[0]).shape == (3, 32, 32)


# -- CBD's data-augmentation teachers (data_aug_simclr) --------------------------------------------------------


def test_data_aug_simclr_is_strength_1_jitter_at_p_08_then_grayscale_02_without_noise():
    steps = build_transform("imagenet", "data_aug_simclr", True, 32).transforms
    jitter = steps[2]
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    for bounds in (cj.brightness, cj.contrast, cj.saturation):
        assert bounds == pytest.approx((0.2, 1.8))
    assert cj.hue == pytest.approx((-0.2, 0.2))
    assert isinstance(steps[3], v2.RandomGrayscale) and steps[3].p == 0.2
    assert not any(isinstance(t, v2.GaussianNoise) for t in steps)
    cifar = build_transform("cifar", "data_aug_simclr", True).transforms
    assert type(cifar[0]).__name__ == "PadCropFlip"
    twin = pipelines.batch_transform("cifar", "data_aug_simclr", True)
    # no noise: the same seed gives the same batch whatever the pixel generator's state
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    r1, r2 = rng(15), rng(15)
    r2.pixels.manual_seed(999)
    assert torch.equal(twin(x, r1), twin(x, r2))


def test_data_aug_simclr_twins_have_the_same_distribution():
    """Per-channel means of one colourful image after the colour ops, 800 times per image and 800 times
    in batches: the same distributions (jitter at p 0.8, grayscale at p 0.2 included)."""
    torch.manual_seed(16)
    per_image = v2.Compose(build_transform("cifar", "data_aug_simclr", True).transforms[1:-1])
    img = torch.from_numpy(array(8, 8, seed=6)).permute(2, 0, 1)
    img[0] = img[0] // 2 + 120  # a red cast
    a = torch.stack([per_image(img).float() for _ in range(800)])
    twin_steps = pipelines.batch_transform("cifar", "data_aug_simclr", True).steps[1:]
    b = img.float().expand(800, -1, -1, -1)
    r = rng(17)
    for step in twin_steps:
        b = step(b, r)
    for c in range(3):
        assert stats.ks_2samp(a[:, c].mean((1, 2)), b[:, c].mean((1, 2))).pvalue > 0.001, c
    grey_a = (a[:, 0] == a[:, 1]).all(-1).all(-1) & (a[:, 1] == a[:, 2]).all(-1).all(-1)
    grey_b = (b[:, 0] == b[:, 1]).all(-1).all(-1) & (b[:, 1] == b[:, 2]).all(-1).all(-1)
    assert grey_a.double().mean().item() == pytest.approx(0.2, abs=0.045)
    assert grey_b.double().mean().item() == pytest.approx(0.2, abs=0.045)


# -- the official AutoAugment + Cutout CIFAR view (NCL, Balanced Softmax) -------------------------------------


OFFICIAL = AugmentOptions(autoaugment_fill=128, cutout_fill="black")


def test_official_autoaugment_cutout_pipeline_structure():
    steps = build_transform("cifar", "autoaugment_cutout", True, options=OFFICIAL).transforms
    names = [type(t).__name__ for t in steps]
    assert names == ["PadCropFlip", "AutoAugment", "ToUint8", "Cutout", "ToNormalised"]
    assert steps[1].policy == v2.AutoAugmentPolicy.CIFAR10 and steps[1].fill == 128 and steps[3].size == 16
    default = [type(t).__name__ for t in build_transform("cifar", "autoaugment_cutout", True).transforms]
    assert default == ["PadCropFlip", "AutoAugment", "ToNormalised", "Cutout"]
    twin = pipelines.batch_transform("cifar", "autoaugment_cutout", True, options=OFFICIAL)
    assert isinstance(twin.steps[1], autoaugment.BatchAutoAugment) and twin.steps[1].t.fill == 128 and not twin.after
    assert pipelines.batch_transform("cifar", "randaugment", True, options=OFFICIAL).steps[1].t.fill == 128
    assert any(isinstance(t, v2.RandAugment) and t.fill == 128
               for t in build_transform("cifar", "randaugment", True, options=OFFICIAL).transforms)


def test_black_cutout_zeroes_the_unit_image_before_normalising_on_both_paths():
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in MEAN_STD["cifar"])
    black = (0 - mean) / std
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    twin = pipelines.batch_transform("cifar", "autoaugment_cutout", True, options=OFFICIAL)
    # the Cutout step (no crop padding)
    out = pipelines.BatchPipeline(twin.steps[-1:], twin.norm, twin.after)(x, rng(18))
    # the hole: exactly (0 - mean)/std in every channel, one clipped square of at most 16 x 16 per image
    hole = (out == black).all(1)
    sizes = hole.sum((1, 2))
    assert (sizes > 0).all() and (sizes <= 256).all()
    rows, cols = hole.any(2), hole.any(1)
    assert torch.equal(sizes, rows.sum(1) * cols.sum(1))
    # per image, the same arithmetic: Cutout on the uint8 image, then ToNormalised
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    t = v2.Compose([ToUint8(), Cutout(16), build_transform("cifar", "none", False).transforms[-1]])
    torch.manual_seed(19)
    per_image = t(img)
    torch.manual_seed(19)
    cy, cx = int(torch.randint(32, ())), int(torch.randint(32, ()))
    twin_steps = pipelines.batch_transform("cifar", "autoaugment_cutout", True, options=OFFICIAL)
    plan = {"cy": torch.tensor([cy]), "cx": torch.tensor([cx])}
    batched = twin_steps.norm.apply(twin_steps.steps[-1].apply(img[None].float(), plan, rng()), {}, rng())
    assert torch.equal(per_image, batched[0])


def test_autoaugment_fill_128_reaches_the_geometric_ops():
    """A shear on a white image: the uncovered corner is 128 with the official fill, 0 by default."""
    aa = autoaugment.BatchAutoAugment(fill=128)
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    plan = {"rows": torch.tensor([0]), "thetas": autoaugment._tv_geometry("ShearX", 0.3, 32, 32)[1],
            "rounds": [[(("ShearX", 0.3), 0, 1, "grid", 0)]]}
    out = aa.apply(white.float(), plan, rng())
    assert set(out.unique().tolist()) == {128.0, 255.0}
    ref = aa.t._apply_image_or_video_transform(white[0], "ShearX", 0.3, interpolation=aa.t.interpolation,
                                               fill=aa.t._fill)
    assert torch.equal(out[0].to(torch.uint8), ref)


# -- the RIDE / SADE / BalPoE views: standard_rotation, standard_jitter, autoaugment, sade_tta ----------------
#
# Each twin is checked step by step against the per-image operations (torchvision's kernels on the uint8 tensor,
# Pillow's on a PIL image) with the twin's own draws, re-drawn from a BatchRng of the same seed in the order the
# steps plan them. Exact: the crops and flips, Pillow's NEAREST rotation (16.16 fixed point), Pillow's Gaussian
# blur, AutoAugment. Within 1/255 per operation (the existing twins' tolerance): saturation and grayscale, whose
# luma torchvision computes as ``r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)`` (a fused multiply-add on
# the CPU) and the twin as three float32 products, so a luma on a rounding edge floors the other way; inside one
# ColorJitter such an off-by-one passes through up to three more ops of factor <= 1.4: within 3/255 per jitter
# (3000 noise images: 73% exact, max 3). ImageNet's resized crop: the existing twin's 1/255 when the crop is not
# larger than the output (no antialias; the tests keep crops that small).

NEW_VIEWS = ("standard_rotation", "standard_jitter", "autoaugment", "sade_tta")
_JITTER_REF = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def u8_images(n: int, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def pil_rotate(img: torch.Tensor, angle: float, fill: int = 0) -> torch.Tensor:
    """torchvision's RandomRotation kernel on a PIL image (what the authors' code ran): Image.rotate."""
    return TF.pil_to_tensor(TF.rotate(TF.to_pil_image(img), angle, v2.InterpolationMode.NEAREST, fill=fill))


def pil_blur(img: torch.Tensor, radius: float) -> torch.Tensor:
    return TF.pil_to_tensor(TF.to_pil_image(img).filter(ImageFilter.GaussianBlur(radius=radius)))


def run_steps(pipeline: pipelines.BatchPipeline, x: torch.Tensor, plans: list, upto: int,
              r: core.BatchRng) -> torch.Tensor:
    for step, plan in zip(pipeline.steps[:upto], plans):
        x = step.apply(x, plan, r)
    return x


def max_step(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.float() - b.float()).abs().max())


def jitter_reference(img: torch.Tensor, order: list[int], factors: list[float]) -> torch.Tensor:
    """ColorJitter.transform: the ops in the drawn order, those with a factor (hue 0 = none)."""
    for k in order:
        if k < len(factors):
            img = _JITTER_REF[k](img, factors[k])
    return img


def test_pillows_rotation_has_a_bit_exact_twin():
    """pil_affine_nearest with pil_rotate_coefficients = Image.rotate(angle, NEAREST, fillcolor): every size the
    views meet (CIFAR, digits, ImageNet crops, odd sizes), the extreme and tiny angles, float32 draws, a fill."""
    g = torch.Generator().manual_seed(0)
    angles = [0.0, 15.0, -15.0, 1e-6, -1e-6, 7.5, -0.3] + (torch.rand(40, generator=g) * 30 - 15).tolist()
    cases = 0
    for (c, h, w) in ((3, 32, 32), (1, 8, 8), (3, 24, 40), (3, 37, 29), (3, 224, 224)):
        x = torch.randint(0, 256, (1, c, h, w), generator=g, dtype=torch.uint8)
        for k, angle in enumerate(angles if h < 200 else angles[:8]):
            fill = 128 if k % 5 == 4 else 0
            coefficients = torch.tensor([pil.pil_rotate_coefficients(angle, w, h)])
            out = pil.pil_affine_nearest(x.float(), coefficients, (fill,))
            assert torch.equal(out[0].to(torch.uint8), pil_rotate(x[0], angle, fill)), (c, h, w, angle, fill)
            cases += 1
    assert cases == 4 * 47 + 8
    with pytest.raises(ValueError, match="degrees < 90"):
        pil.pil_random_rotation(90.0)


def test_the_per_image_rotation_is_pillows_with_torchvisions_angle_draw():
    """PILRandomRotation: torchvision's RandomRotation(15) (angle = torch.empty(1).uniform_(-15, 15)) on PIL, a
    tensor in and a tensor out, a PIL image in and out; torchvision's tensor kernel would give other pixels."""
    t = PILRandomRotation(15)
    assert isinstance(t.rotation, v2.RandomRotation) and list(t.rotation.degrees) == [-15.0, 15.0]
    assert v2.InterpolationMode(t.rotation.interpolation) == v2.InterpolationMode.NEAREST and not t.rotation.expand
    assert t.rotation.center is None and t.rotation.fill == 0
    x = u8_images(1, seed=3)[0]
    differs = 0
    for seed in range(100):
        torch.manual_seed(seed)
        out = t(x)
        torch.manual_seed(seed)
        angle = torch.empty(1).uniform_(-15, 15).item()
        assert type(out) is torch.Tensor and torch.equal(out, pil_rotate(x, angle)), seed
        differs += not torch.equal(out, TF.rotate(x, angle, v2.InterpolationMode.NEAREST))
    # torchvision's tensor kernel (its own grid) differs from Pillow at some angles in a few pixels (about 1 angle
    # in 7, 0.02% of the pixels): Pillow's rotation, which the authors' code ran, defines them
    assert 3 <= differs < 50, differs
    assert isinstance(t(TF.to_pil_image(x)), Image.Image)


def test_rotation_angles_are_uniform_on_both_paths(monkeypatch):
    """3000 draws per path: the angles Pillow's rotate receives from the per-image transform, and those the twin's
    shipped fixed-point coefficients encode (atan2 of Pillow's cos/sin, to 1/65536 rad), are both U[-15, 15]
    (Kolmogorov-Smirnov) and agree with each other; the twin's pixels are Pillow's for its angles (above)."""
    received = []
    rotate = Image.Image.rotate

    def recording(img, angle, *args, **kwargs):
        received.append(angle)
        return rotate(img, angle, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "rotate", recording)
    torch.manual_seed(20)
    t, tiny = PILRandomRotation(15), torch.zeros(3, 2, 2, dtype=torch.uint8)
    for _ in range(3000):
        t(tiny)
    monkeypatch.undo()
    per_image = np.array(received)
    coefficients = pil.pil_random_rotation(15).plan((3000, 3, 32, 32), rng(21))["coefficients"].double()
    batched = -np.degrees(np.arctan2(coefficients[:, 1].numpy(), coefficients[:, 0].numpy()))
    r = rng(21)
    drawn = r.uniform_cpu(3000, -15, 15).double().numpy()
    assert np.abs(batched - drawn).max() < 0.002
    for sample in (per_image, batched):
        assert stats.kstest((sample + 15) / 30, "uniform").pvalue > 0.001
        assert sample.min() < -14.9 and sample.max() > 14.9 and np.abs(sample).max() <= 15
    assert stats.ks_2samp(per_image, batched).pvalue > 0.001
    assert np.mean(batched > 0) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("kind", ["cifar", "digits"])
def test_standard_rotation_same_draws_same_pixels(kind):
    """The whole twin (crop, flip, Pillow's rotation, normalisation) = the per-image operations with its draws,
    bit for bit (CIFAR: pad-4 crop + flip; digits: pad-1 crop, no flip)."""
    c, size, pad, flip = (3, 32, 4, True) if kind == "cifar" else (1, 8, 1, False)
    n = 40
    x = u8_images(n, c, size, seed=4)
    pipeline = pipelines.batch_transform(kind, "standard_rotation", True, size)
    out = pipeline(x, rng(22))
    r = rng(22)
    top, left = r.randint_cpu(n, 2 * pad + 1), r.randint_cpu(n, 2 * pad + 1)
    mirrored = (r.uniform_cpu(n) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    angles = r.uniform_cpu(n, -15, 15).tolist()
    normalise = build_transform(kind, "standard", False, size).transforms[-1]
    assert len({round(a, 3) for a in angles}) > n - 3 and bool(mirrored.any()) == flip
    for i in range(n):
        img = TF.crop(TF.pad(x[i], [pad] * 4), int(top[i]), int(left[i]), size, size)
        img = TF.horizontal_flip(img) if mirrored[i] else img
        assert torch.equal(out[i], normalise(pil_rotate(img, angles[i]))), i


def test_standard_rotation_on_imagenet_crops_within_one_level():
    """ImageNet: RandomResizedCrop + flip + the rotation; the crop's bilinear resize is the existing twin's (to
    1/255 of torchvision's; crops no larger than the output), the flip and rotation move pixels without
    arithmetic: the same 1/255 at the end."""
    n, size = 12, 24
    x = u8_images(n, 3, size, seed=5)
    pipeline = pipelines.batch_transform("imagenet", "standard_rotation", True, size)
    r = rng(23)
    plans = pipeline.plan(tuple(x.shape), r)
    out = run_steps(pipeline, x.float(), plans, 3, r)
    boxes, mirrored = plans[0]["boxes"], plans[1]["mirrored"]
    r = rng(23)
    geometry.resized_crop_boxes(n, size, size, (0.08, 1.0), (3 / 4, 4 / 3), r)
    r.uniform_cpu(n)
    angles = r.uniform_cpu(n, -15, 15).tolist()
    for i in range(n):
        t, l, h, w = boxes[i].tolist()
        img = TF.resized_crop(x[i], t, l, h, w, [size, size], antialias=True)
        img = TF.horizontal_flip(img) if mirrored[i] else img
        assert max_step(out[i], pil_rotate(img, angles[i])) <= 1, i
    # the rotation alone, on the twin's own crops: exact
    cropped = run_steps(pipeline, x.float(), plans, 2, r)
    for i in range(n):
        assert torch.equal(out[i].to(torch.uint8), pil_rotate(cropped[i].to(torch.uint8), angles[i]))


def test_standard_rotation_structure():
    names = [type(t).__name__ for t in build_transform("cifar", "standard_rotation", True).transforms]
    assert names == ["PadCropFlip", "PILRandomRotation", "ToNormalised"]
    imagenet = build_transform("imagenet", "standard_rotation", True, 224).transforms
    assert [type(t).__name__ for t in imagenet] == ["RandomResizedCrop", "RandomHorizontalFlip", "PILRandomRotation",
                                                    "ToNormalised"]
    assert imagenet[0].scale == (0.08, 1.0)
    pil = Image.fromarray(array(50, 70, seed=2))
    assert build_transform("imagenet", "standard_rotation", True, 40)(pil).shape == (3, 40, 40)
    assert len(pipelines.batch_transform("cifar", "standard_rotation", True).steps) == 2


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_standard_jitter_same_draws_same_pixels_within_a_level(kind):
    """Crop and flip exact (ImageNet: the resize to 1/255), then ColorJitter(0.4, 0.4, 0.4, 0) on every image (no
    RandomApply), per image in its drawn order: within 3/255 of torchvision's on the same input (1/255 per op,
    compounded; most images exact, a few pixels of the others), and no noise."""
    n, size = 40, (32 if kind == "cifar" else 24)
    side = size
    x = u8_images(n, 3, side, seed=6)
    pipeline = pipelines.batch_transform(kind, "standard_jitter", True, size)
    r = rng(24)
    plans = pipeline.plan(tuple(x.shape), r)
    steps_before = len(pipeline.steps) - 1
    cropped = run_steps(pipeline, x.float(), plans, steps_before, r)
    r = rng(24)
    if kind == "cifar":
        top, left, mirrored = r.randint_cpu(n, 9), r.randint_cpu(n, 9), r.uniform_cpu(n) < 0.5
        for i in range(n):
            img = TF.crop(TF.pad(x[i], [4] * 4), int(top[i]), int(left[i]), 32, 32)
            assert torch.equal(cropped[i].to(torch.uint8), TF.horizontal_flip(img) if mirrored[i] else img)
    else:
        geometry.resized_crop_boxes(n, side, side, (0.08, 1.0), (3 / 4, 4 / 3), r)
        r.uniform_cpu(n)
    applied = r.uniform_cpu(n) < 1.0
    order = r.rand_cpu(n, 4).argsort(1).tolist()
    factors = [r.uniform64(n, 0.6, 1.4).tolist() for _ in range(3)]
    assert applied.all()
    jittered = pipeline.steps[-1].apply(cropped, plans[steps_before], r)
    base = cropped.to(torch.uint8)
    steps = [max_step(jittered[i], jitter_reference(base[i], order[i], [f[i] for f in factors])) for i in range(n)]
    assert max(steps) <= 3 and steps.count(0) > n // 2, steps
    ref = torch.stack([jitter_reference(base[i], order[i], [f[i] for f in factors]) for i in range(n)])
    assert (jittered != ref.float()).double().mean().item() < 1e-3
    assert not torch.equal(jittered, cropped)
    a, b = rng(25), rng(25)
    b.pixels.manual_seed(7)  # no Gaussian noise: the pixel generator plays no part
    assert torch.equal(pipeline(x, a), pipeline(x, b))


def test_standard_jitter_structure_and_distribution():
    """Per image: the standard ops then ColorJitter(0.4, 0.4, 0.4) always, no noise; the channel means of a
    colourful image after the jitter have the same distribution on both paths, and no image escapes it."""
    imagenet = build_transform("imagenet", "standard_jitter", True, 224).transforms
    assert [type(t).__name__ for t in imagenet] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter",
                                                    "ToNormalised"]
    cj = imagenet[2]
    assert cj.brightness == cj.contrast == cj.saturation == pytest.approx((0.6, 1.4)) and cj.hue is None
    cifar = build_transform("cifar", "standard_jitter", True).transforms
    assert [type(t).__name__ for t in cifar] == ["PadCropFlip", "ColorJitter", "ToNormalised"]
    torch.manual_seed(26)
    img = torch.from_numpy(array(8, 8, seed=6)).permute(2, 0, 1)
    img[0] = img[0] // 2 + 120
    a = torch.stack([cifar[1](img).float() for _ in range(800)])
    jitter = pipelines.batch_transform("cifar", "standard_jitter", True).steps[1]
    b = jitter(img.float().expand(800, -1, -1, -1), rng(27))
    for c in range(3):
        assert stats.ks_2samp(a[:, c].mean((1, 2)), b[:, c].mean((1, 2))).pvalue > 0.001, c
    for sample in (a, b):
        assert not (sample == img.float()).all(-1).all(-1).all(-1).any()  # applied always (p = 1)


def test_autoaugment_same_draws_same_pixels_and_is_autoaugment_cutout_without_the_cutout():
    """Crop + flip + AutoAugment(CIFAR10, fill 128): the twin's pixels are torchvision's per image with its draws,
    exactly; and draw for draw the twin equals autoaugment_cutout's everywhere but the hole."""
    n = 48
    x = u8_images(n, seed=8)
    for fill in (0, 128):
        options = AugmentOptions(autoaugment_fill=fill)
        pipeline = pipelines.batch_transform("cifar", "autoaugment", True, options=options)
        assert not pipeline.after and pipeline.steps[1].t.fill == (fill or None)
        out = pipeline(x, rng(28))
        r = rng(28)
        top, left, mirrored = r.randint_cpu(n, 9), r.randint_cpu(n, 9), r.uniform_cpu(n) < 0.5
        aa = pipeline.steps[1]
        rounds = aa.draw(n, 32, 32, r)
        normalise = build_transform("cifar", "standard", False).transforms[-1]
        for i in range(n):
            img = TF.crop(TF.pad(x[i], [4] * 4), int(top[i]), int(left[i]), 32, 32)
            img = TF.horizontal_flip(img) if mirrored[i] else img
            for keys in rounds:
                if keys[i] is not None:
                    img = aa.t._apply_image_or_video_transform(img, keys[i][0], keys[i][1],
                                                               interpolation=aa.t.interpolation, fill=aa.t._fill)
            assert torch.equal(out[i], normalise(img)), (fill, i)
        holed = pipelines.batch_transform("cifar", "autoaugment_cutout", True, options=options)(x, rng(28))
        outside = holed != 0
        assert torch.equal(out[outside], holed[outside]) and (~outside).any()


def test_autoaugment_structure_and_distribution():
    official = AugmentOptions(autoaugment_fill=128)
    steps = build_transform("cifar", "autoaugment", True, options=official).transforms
    assert [type(t).__name__ for t in steps] == ["PadCropFlip", "AutoAugment", "ToNormalised"]
    assert steps[1].policy == v2.AutoAugmentPolicy.CIFAR10 and steps[1].fill == 128
    assert build_transform("cifar", "autoaugment", True).transforms[1].fill is None  # 0: torchvision's default
    torch.manual_seed(29)
    img = torch.from_numpy(array(32, 32, seed=7, narrow=True)).permute(2, 0, 1).contiguous()
    a = torch.stack([steps[1](img).float() for _ in range(500)])
    b = autoaugment.BatchAutoAugment(fill=128)(img.float().expand(500, -1, -1, -1), rng(30))
    assert stats.ks_2samp(a.mean((1, 2, 3)), b.mean((1, 2, 3))).pvalue > 0.001
    assert stats.ks_2samp(a.std((1, 2, 3)), b.std((1, 2, 3))).pvalue > 0.001
    same_a = (a == img.float()).all(-1).all(-1).all(-1).double().mean().item()
    same_b = (b == img.float()).all(-1).all(-1).all(-1).double().mean().item()
    assert abs(same_a - same_b) < 0.07 and 0.05 < same_b < 0.5, (same_a, same_b)


def _sade_reference(kind: str, x: torch.Tensor, seed: int, size: int) -> tuple[list, dict]:
    """The twin's sade_tta draws, re-drawn in its steps' order, and a function per step applying torchvision's /
    Pillow's per-image operation with them."""
    n = len(x)
    r = rng(seed)
    if kind == "cifar":
        top, left = r.randint_cpu(n, 9), r.randint_cpu(n, 9)
        crop = [lambda img, i: TF.crop(TF.pad(img, [4] * 4), int(top[i]), int(left[i]), 32, 32)]
    else:
        boxes = geometry.resized_crop_boxes(n, x.shape[2], x.shape[3], (0.2, 1.0), (3 / 4, 4 / 3), r)
        crop = [lambda img, i: TF.resized_crop(img, *boxes[i].tolist(), [size, size], antialias=True)]
    applied = r.uniform_cpu(n) < 0.8
    order = r.rand_cpu(n, 4).argsort(1).tolist()
    factors = [r.uniform64(n, lo, hi).tolist() for lo, hi in ((0.6, 1.4),) * 3 + ((-0.1, 0.1),)]
    grey = r.uniform_cpu(n) < 0.2
    blurred = r.uniform_cpu(n) < (0.2 if kind == "cifar" else 0.5)
    radii = r.uniform64(n, 0.1, 2.0).tolist()
    mirrored = r.uniform_cpu(n) < 0.5
    ops = crop + [
        lambda img, i: jitter_reference(img, order[i], [f[i] for f in factors]) if applied[i] else img,
        lambda img, i: TF.rgb_to_grayscale(img, num_output_channels=3) if grey[i] else img,
        lambda img, i: pil_blur(img, radii[i]) if blurred[i] else img,
        lambda img, i: TF.horizontal_flip(img) if mirrored[i] else img,
    ]
    return ops, {"applied": applied, "grey": grey, "blurred": blurred, "mirrored": mirrored}


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_sade_tta_same_draws_same_pixels(kind):
    """SADE's test-time view, step by step on the same input: crop exact (ImageNet: to 1/255), the jitter to 3/255
    and grayscale to 1/255, the PIL blur and the flip exact; end to end (CIFAR) exact wherever no colour op ran,
    and within 4/255 (the jitter's 3 and the grayscale's 1) elsewhere, most images exact."""
    n, size = 64, (32 if kind == "cifar" else 24)
    side = size
    x = u8_images(n, 3, side, seed=9)
    pipeline = pipelines.batch_transform(kind, "sade_tta", True, size)
    r = rng(31)
    plans = pipeline.plan(tuple(x.shape), r)
    ops, drawn = _sade_reference(kind, x, 31, size)
    assert 0 < drawn["blurred"].sum() < n and 0 < drawn["grey"].sum() < n and 0 < (~drawn["applied"]).sum()
    tolerance = [0 if kind == "cifar" else 1, 3, 1, 0, 0]
    stage = x
    for k, (step, op) in enumerate(zip(pipeline.steps, ops)):
        twin = step.apply(stage.float(), plans[k], r)
        ref = torch.stack([op(stage[i], i) for i in range(n)])
        assert max_step(twin, ref) <= tolerance[k], (k, max_step(twin, ref))
        stage = ref
    normalise = build_transform(kind, "standard", False, size).transforms[-1]
    out = pipeline(x, rng(31))
    per_image = torch.stack([normalise(img) for img in stage])
    std = torch.tensor(MEAN_STD[kind][1]).view(1, 3, 1, 1)
    levels = ((out - per_image) * std * 255).abs().amax((1, 2, 3))
    untouched = ~drawn["applied"] & ~drawn["grey"]
    if kind == "cifar":  # (ImageNet: the crop's 1/255 in many pixels goes through the jitter: steps only)
        assert torch.equal(out[untouched], per_image[untouched])
        assert (levels < 4.01).all() and (levels < 0.01).double().mean() > 0.5, levels


def test_sade_tta_structure_per_kind():
    """The order and parameters of SADE@cba11b8 test_training_cifar.py:179-189 / test_training_imagenet.py:177-187,
    with its PIL-radius GaussianBlur class; digits: the pad-1 crop and the blur only."""
    cifar = build_transform("cifar", "sade_tta", True).transforms
    assert [type(t).__name__ for t in cifar] == ["PadCropFlip", "RandomApply", "RandomGrayscale", "RandomApply",
                                                 "RandomHorizontalFlip", "ToNormalised"]
    assert (cifar[0].size, cifar[0].padding, cifar[0].flip) == (32, 4, False)
    jitter = cifar[1]
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], v2.ColorJitter)
    cj = jitter.transforms[0]
    assert cj.brightness == cj.contrast == cj.saturation == pytest.approx((0.6, 1.4))
    assert cj.hue == pytest.approx((-0.1, 0.1))
    assert cifar[2].p == 0.2 and cifar[3].p == 0.2 and isinstance(cifar[3].transforms[0], PILGaussianBlur)
    assert cifar[3].transforms[0].sigma == (0.1, 2.0)
    imagenet = build_transform("imagenet", "sade_tta", True, 224).transforms
    assert isinstance(imagenet[0], v2.RandomResizedCrop) and imagenet[0].scale == (0.2, 1.0)
    assert tuple(imagenet[0].size) == (224, 224) and imagenet[3].p == 0.5
    assert [type(t) for t in imagenet[1:]] == [type(t) for t in cifar[1:]]
    digits = build_transform("digits", "sade_tta", True, 8).transforms
    assert [type(t).__name__ for t in digits] == ["PadCropFlip", "RandomApply", "ToNormalised"]
    assert digits[0].flip is False and digits[1].p == 0.2 and isinstance(digits[1].transforms[0], PILGaussianBlur)
    for kind, c, size in (("cifar", 3, 32), ("imagenet", 3, 24), ("digits", 1, 8)):
        twin = pipelines.batch_transform(kind, "sade_tta", True, size)
        per_image = build_transform(kind, "sade_tta", True, size)
        assert len(twin.steps) == len(per_image.transforms) - 1 and not twin.after
    # the options' crop area is the standard view's, not SADE's fixed 0.2
    assert build_transform("imagenet", "sade_tta", True, 224,
                           options=AugmentOptions(crop_scale_min=0.05)).transforms[0].scale == (0.2, 1.0)


@pytest.mark.parametrize("kind, p_blur", [("cifar", 0.2), ("imagenet", 0.5)])
def test_sade_tta_draws_follow_the_per_image_distribution(kind, p_blur, monkeypatch):
    """Over many draws: jitter at 0.8, grayscale at 0.2, blur at 0.2 (CIFAR) / 0.5 (ImageNet), flip at 0.5 in the
    twin's plan; the per-image blur runs as often; the colour and blur ops after the crop give the same
    distributions of channel means and of total variation on both paths."""
    n = 4000
    pipeline = pipelines.batch_transform(kind, "sade_tta", True, 16)
    plans = pipeline.plan((n, 3, 16, 16), rng(32))
    assert plans[1]["bounds"][0][-1] / n == pytest.approx(0.8, abs=0.02)  # jittered images
    assert plans[2]["chosen"].double().mean().item() == pytest.approx(0.2, abs=0.02)
    weights = plans[3]["weights"]
    blurred = weights[:, weights.shape[1] // 2] != 1 << 24
    assert blurred.double().mean().item() == pytest.approx(p_blur, abs=0.025)
    assert plans[4]["mirrored"].double().mean().item() == pytest.approx(0.5, abs=0.025)
    transform = build_transform(kind, "sade_tta", True, 16)
    calls = []
    blur = transform.transforms[3].transforms[0]
    monkeypatch.setattr(blur, "forward", lambda img: calls.append(1) or img)
    torch.manual_seed(33)
    tiny = torch.zeros(3, 2, 2, dtype=torch.uint8)
    for _ in range(2000):
        transform.transforms[3](tiny)
    assert len(calls) / 2000 == pytest.approx(p_blur, abs=0.035)
    monkeypatch.undo()
    img = torch.from_numpy(array(8, 8, seed=6)).permute(2, 0, 1).contiguous()
    img[0] = img[0] // 2 + 120
    torch.manual_seed(34)
    colour = v2.Compose(build_transform(kind, "sade_tta", True, 8).transforms[1:-1])
    a = torch.stack([colour(img).float() for _ in range(800)])
    b = img.float().expand(800, -1, -1, -1)
    r = rng(35)
    for step in pipelines.batch_transform(kind, "sade_tta", True, 8).steps[1:]:
        b = step(b, r)
    for c in range(3):
        assert stats.ks_2samp(a[:, c].mean((1, 2)), b[:, c].mean((1, 2))).pvalue > 0.001, c

    def variation(t: torch.Tensor) -> torch.Tensor:
        return (t[..., 1:] - t[..., :-1]).abs().mean((1, 2, 3)) + (t[..., 1:, :] - t[..., :-1, :]).abs().mean((1, 2, 3))

    assert stats.ks_2samp(variation(a), variation(b)).pvalue > 0.001
    grey_a = (a[:, 0] == a[:, 1]).all(-1).all(-1) & (a[:, 1] == a[:, 2]).all(-1).all(-1)
    grey_b = (b[:, 0] == b[:, 1]).all(-1).all(-1) & (b[:, 1] == b[:, 2]).all(-1).all(-1)
    assert grey_a.double().mean().item() == pytest.approx(0.2, abs=0.045)
    assert grey_b.double().mean().item() == pytest.approx(0.2, abs=0.045)


def test_sade_tta_is_a_training_style_view_for_two_test_time_views():
    """build_transform/batch_transform(kind, "sade_tta", train=True) both work; applied twice to the same images
    (the engine's two views) they give two different views; train=False is the plain test transform."""
    x = u8_images(16, seed=10)
    twin = pipelines.batch_transform("cifar", "sade_tta", train=True)
    r = rng(36)
    v1, v2_ = twin(x, r), twin(x, r)
    assert v1.shape == v2_.shape == (16, 3, 32, 32) and not torch.equal(v1, v2_)
    per_image = build_transform("cifar", "sade_tta", train=True)
    torch.manual_seed(37)
    assert not torch.equal(per_image(x[0]), per_image(x[0]))
    test = build_transform("cifar", "sade_tta", train=False)
    assert torch.equal(test(x[0]), build_transform("cifar", "standard", train=False)(x[0]))
    assert torch.equal(pipelines.batch_transform("cifar", "sade_tta", False)(x, rng()), pipelines.batch_transform(
        "cifar", "none", False)(x, rng()))


def test_the_new_views_on_digits():
    """Digits (1-channel 8x8): standard_rotation rotates (exactly as Pillow on an L image, covered above);
    standard_jitter skips the colour ops as data_aug does (= standard, draw for draw); autoaugment runs the
    CIFAR-10 policy on the grey image; sade_tta is the pad-1 crop and Pillow's blur (p 0.2), exact per image."""
    x = u8_images(32, 1, 8, seed=11)
    standard = pipelines.batch_transform("digits", "standard", True, 8)(x, rng(38))
    assert torch.equal(pipelines.batch_transform("digits", "standard_jitter", True, 8)(x, rng(38)), standard)
    assert [type(t).__name__ for t in build_transform("digits", "standard_jitter", True, 8).transforms] == [
        "PadCropFlip", "ToNormalised"]
    rotated = pipelines.batch_transform("digits", "standard_rotation", True, 8)(x, rng(38))
    assert not torch.equal(rotated, standard)
    aa = pipelines.batch_transform("digits", "autoaugment", True, 8)(x, rng(38))
    assert aa.shape == (32, 1, 8, 8) and torch.isfinite(aa).all()
    pipeline = pipelines.batch_transform("digits", "sade_tta", True, 8)
    out = pipeline(x, rng(39))
    r = rng(39)
    top, left = r.randint_cpu(32, 3), r.randint_cpu(32, 3)
    blurred = r.uniform_cpu(32) < 0.2
    radii = r.uniform64(32, 0.1, 2.0).tolist()
    normalise = build_transform("digits", "standard", False, 8).transforms[-1]
    assert 0 < blurred.sum() < 32
    for i in range(32):
        img = TF.crop(TF.pad(x[i], [1] * 4), int(top[i]), int(left[i]), 8, 8)
        assert torch.equal(out[i], normalise(pil_blur(img, radii[i]) if blurred[i] else img)), i
    for augment in NEW_VIEWS:
        torch.manual_seed(40)
        y = build_transform("digits", augment, True, 8)(x[0])
        assert y.shape == (1, 8, 8) and torch.isfinite(y).all(), augment
