"""Batched augmentation (rayexperts.data.augment.batched; issue 15): for each augmentation, the parameters differ
across the images of one batch, their distribution is that of the per-image transform, and an operation
with given parameters gives the per-image (torchvision) pixels to 1/255."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from rayexperts.data.augment.batched import autoaugment, colour, core, geometry, pipelines
from rayexperts.data.augment.per_image import Cutout, ToNormalised, build_transform, moco_transform
from rayexperts.data.augment.recipes import AUGMENTS

CPU = torch.device("cpu")


def rng(seed: int = 0) -> core.BatchRng:
    return core.BatchRng(seed, CPU)


def images(n: int, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def close_u8(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= 1, f"max |diff| {diff.max()} (in uint8 steps)"


# -- every augmentation: per-image parameters -----------------------------------------------------


@pytest.mark.parametrize("kind, augment", [("cifar", a) for a in AUGMENTS if a != "none"] + [("digits", "standard")]
                         + [("digits", a) for a in ("standard_rotation", "standard_jitter", "autoaugment", "sade_tta")])
def test_every_augmentation_gives_each_image_its_own_parameters(kind, augment):
    c, size = (1, 8) if kind == "digits" else (3, 32)
    one = images(1, c, size).expand(64, -1, -1, -1).contiguous()
    out = pipelines.batch_transform(kind, augment, train=True, image_size=size)(one, rng())
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    possible = 9 if kind == "digits" else 17  # digits: a 1-pixel shift, 3 × 3 windows, no flip
    assert len(distinct) >= possible, f"{augment}: {len(distinct)} distinct images out of 64 copies"
    assert out.dtype == torch.float32 and out.shape == (64, c, size, size)


@pytest.mark.parametrize("kind", ["cifar", "digits"])
def test_the_moco_key_view_gives_each_image_its_own_parameters(kind):
    c, size = (1, 8) if kind == "digits" else (3, 32)
    one = images(1, c, size).expand(64, -1, -1, -1).contiguous()
    out = pipelines.batch_moco_transform(kind, size)(one, rng())
    assert len({tuple(o.flatten().round(decimals=4).tolist()) for o in out}) > 16


# -- distributions ----------------------------------------------------------------------------------


def _positions(size: int = 32) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1 (0 marks the zero padding)."""
    r = torch.arange(size).view(-1, 1).expand(size, size) + 1
    return torch.stack([r, r.t(), torch.zeros_like(r)]).to(torch.uint8)


def test_crop_offsets_cover_all_81_windows_uniformly_and_flip_half():
    n = 81 * 60
    x = _positions().expand(n, -1, -1, -1).float()
    out = geometry.pad_crop_flip(4, flip=True)(x, rng(1))
    top = out[:, 0, 4, 4].long() - 1  # output (4, 4) shows image row `top` whatever the offset
    flipped = out[:, 1, 4, 5] < out[:, 1, 4, 4]
    left = torch.where(flipped, out[:, 1, 4, 27], out[:, 1, 4, 4]).long() - 1
    counts = torch.bincount(top * 9 + left, minlength=81).numpy()
    assert (counts > 0).all() and stats.chisquare(counts).pvalue > 0.001, counts
    assert abs(flipped.float().mean().item() - 0.5) < 0.03


def test_randaugment_ops_are_uniform_and_signs_fair():
    ra = autoaugment.BatchRandAugment()
    rounds = ra.draw(20_000, 32, 32, rng(2))
    assert len(rounds) == 2
    names = [k[0] for keys in rounds for k in keys]
    counts = np.array([names.count(op) for op in ra.names])
    assert len(ra.names) == 14 and stats.chisquare(counts).pvalue > 0.001, dict(zip(ra.names, counts))
    signed = [k[1] for keys in rounds for k in keys if k[0] == "Rotate"]
    assert set(np.round(np.abs(signed), 6)) == {9.0} and abs(np.mean(np.array(signed) > 0) - 0.5) < 0.03
    # the magnitudes are torchvision's: bin 9 of 31
    assert {k for keys in rounds for k in keys if k[0] == "Posterize"} == {("Posterize", 7.0)}


def test_autoaugment_subpolicies_uniform_and_ops_at_their_probability():
    aa = autoaugment.BatchAutoAugment()
    n = 25 * 400
    first, second = aa.draw(n, 32, 32, rng(3))
    policies = aa.t._policies
    assert len(policies) == 25
    # ("Invert", 0.1) opens sub-policy 0 only; ("Equalize", 0.8) opens sub-policy 23 (and 0.6, 0.3, 0.2 others)
    inverted = sum(1 for k in first if k and k[0] == "Invert")
    assert abs(inverted / (n / 25) - 0.1) < 0.05
    applied = sum(k is not None for k in first) / n
    expected = np.mean([p[0][1] for p in policies])
    assert abs(applied - expected) < 0.02


def test_color_jitter_factors_uniform_and_order_random():
    n = 4000
    gray = torch.full((n, 3, 2, 2), 100.0)
    out = colour.color_jitter((0.4, 0.0, 0.0))(gray, rng(4))  # brightness only: floor(100 · U(0.6, 1.4))
    values = out[:, 0, 0, 0].numpy()
    assert values.min() >= 60 and values.max() <= 139
    assert stats.kstest((values + 0.5) / 100, "uniform", args=(0.6, 0.8)).pvalue > 0.001
    # order: brightness ×1.4 then contrast ×0 on a two-tone image differs from contrast first
    two = torch.zeros(n, 3, 2, 2)
    two[:, :, 0] = 200.0
    jitter = colour.color_jitter((0.4, 0.4, 0.0))
    results = jitter(two, rng(5))
    assert len({tuple(r.flatten().tolist()) for r in results}) > 100


def test_random_resized_crop_boxes_follow_torchvision():
    torch.manual_seed(0)
    reference = v2.RandomResizedCrop(32, scale=(0.2, 1.0))
    ref = [reference.make_params([torch.zeros(3, 32, 32)]) for _ in range(3000)]
    ours = geometry.resized_crop_boxes(3000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), rng(6))
    for key, col in (("height", 2), ("width", 3), ("top", 0), ("left", 1)):
        assert stats.ks_2samp([p[key] for p in ref], ours[:, col].numpy()).pvalue > 0.001, key
    assert ((ours[:, 0] + ours[:, 2]) <= 32).all() and ((ours[:, 1] + ours[:, 3]) <= 32).all()


def test_digits_key_view_translations_and_scales():
    n = 4000
    r = rng(7)
    tx = torch.round(r.uniform64(n, -1.0, 1.0))  # as random_affine draws them for 8 px: t = 0.125
    share = [(tx == v).float().mean().item() for v in (-1, 0, 1)]
    assert abs(share[0] - 0.25) < 0.03 and abs(share[1] - 0.5) < 0.03
    out = geometry.random_affine(0.125, (0.8, 1.2))(torch.full((256, 1, 8, 8), 200.0), rng(8))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 8


def test_cutout_centres_uniform():
    n = 32 * 32 * 8
    out = geometry.cutout(16)(torch.ones(n, 1, 32, 32), rng(9))
    # the hole's first zero row/column: max(cy − 8, 0); the centre is uniform over 0..31
    holes = out[:, 0] == 0
    rows = holes.any(2).float().argmax(1)
    assert stats.chisquare(torch.bincount(rows, minlength=32)[1:24].numpy()).pvalue > 0.001


def test_gaussian_noise_of_the_data_aug_teachers():
    x = torch.full((64, 3, 32, 32), 128.0)
    noisy = pipelines.normalise("cifar", 0.01)(x, rng(10))
    clean = pipelines.normalise("cifar")(x, rng(10))
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    assert abs(((noisy - clean) * std).std().item() - 0.01) < 0.0005


# -- fixed parameters: the per-image pixels --------------------------------------------------------


def test_pad_crop_flip_pixels():
    x = images(4)
    padded = TF.pad(x, [4, 4, 4, 4])
    r = rng(11)
    out = geometry.pad_crop_flip(4, flip=True)(x.float(), r)
    r = rng(11)  # the same draws again
    top, left = r.randint(4, 9), r.randint(4, 9)
    flips = r.uniform(4) < 0.5
    for i in range(4):
        ref = TF.crop(padded[i], int(top[i]), int(left[i]), 32, 32)
        ref = TF.horizontal_flip(ref) if flips[i] else ref
        assert torch.equal(out[i].to(torch.uint8), ref)


@pytest.mark.parametrize("op, ref, factor", [
    (colour.brightness, TF.adjust_brightness, 1.3), (colour.brightness, TF.adjust_brightness, 0.7),
    (colour.contrast, TF.adjust_contrast, 1.35), (colour.contrast, TF.adjust_contrast, 0.62),
    (colour.saturation, TF.adjust_saturation, 1.2), (colour.saturation, TF.adjust_saturation, 0.65),
    (colour.hue, TF.adjust_hue, 0.07), (colour.hue, TF.adjust_hue, -0.093),
])
def test_colour_operations_match_torchvision(op, ref, factor):
    x = images(6, seed=3)
    out = op(x.float(), torch.full((6,), factor, dtype=torch.float64))
    expected = torch.stack([ref(img, factor) for img in x])
    close_u8(out, expected)


def test_grayscale_and_normalisation_match():
    x = images(3, seed=4)
    gray = colour.random_grayscale(1.0)(x.float(), rng())
    assert torch.equal(gray.to(torch.uint8), TF.rgb_to_grayscale(x, num_output_channels=3))
    norm = pipelines.normalise("cifar")(x.float(), rng())
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    assert torch.allclose(norm, torch.stack([ToNormalised(mean, std)(img) for img in x]), atol=1e-6)


def test_resized_crop_matches_torchvision():
    x = images(5, seed=5)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 14, 20], [10, 2, 22, 17], [0, 9, 31, 23], [7, 7, 15, 15]])
    out = geometry.crop_resize(x.float(), boxes, 32)
    for img, o, (t, l, h, w) in zip(x, out, boxes.tolist()):
        close_u8(o, TF.resized_crop(img, t, l, h, w, [32, 32], antialias=True))


def test_affine_matches_torchvision_on_digits():
    x = images(4, c=1, size=8, seed=6)
    scale, tx, ty = torch.tensor([0.8, 1.0, 1.13, 1.2]), torch.tensor([-1.0, 0, 1, 1]), torch.tensor([0.0, 1, -1, 0])
    out = geometry.affine_scale_translate(x.float(), scale, tx, ty)
    for i in range(4):
        ref = TF.affine(x[i], angle=0.0, translate=[int(tx[i]), int(ty[i])], scale=float(scale[i]), shear=[0.0, 0.0],
                        interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        close_u8(out[i], ref)


def test_gaussian_blur_matches_torchvision():
    x = images(2, size=40, seed=7)
    r = rng(12)
    out = colour.gaussian_blur(23, (0.1, 2.0), p=1.0)(x.float(), r)
    r = rng(12)
    r.uniform(2)  # the coins
    sigmas = r.uniform(2, 0.1, 2.0)
    for img, o, s in zip(x, out, sigmas.tolist()):
        close_u8(o, TF.gaussian_blur(img, [23, 23], [s, s]))


def test_cutout_matches_the_per_image_transform():
    x = torch.randn(3, 3, 32, 32)
    r = rng(13)
    out = geometry.cutout(16)(x, r)
    r = rng(13)
    cy, cx = r.randint(3, 32), r.randint(3, 32)
    for i in range(3):
        torch.manual_seed(0)
        ref = x[i].clone()
        ref[:, max(int(cy[i]) - 8, 0): int(cy[i]) + 8, max(int(cx[i]) - 8, 0): int(cx[i]) + 8] = 0
        assert torch.equal(out[i], ref)
    assert isinstance(Cutout(16), torch.nn.Module)


@pytest.mark.parametrize("fill", [None, 128])
@pytest.mark.parametrize("policy", [autoaugment.BatchAutoAugment, autoaugment.BatchRandAugment])
def test_auto_augment_groups_equal_the_per_image_operations(policy, fill):
    """Each image of a batch gets exactly torchvision's operation for its own key, in every round, whatever
    group it was computed in (groups are sorted, sliced and scattered back), with the default fill and with
    the official CIFAR recipes' fill of 128 (the geometric ops, Sharpness and AutoContrast run through copies
    of torchvision's kernels there)."""
    aa = policy(fill=fill)
    x = images(48, seed=8)
    r = rng(14)
    out = aa(x.float(), r)
    r = rng(14)
    rounds = aa.draw(48, 32, 32, r)
    assert len({k for keys in rounds for k in keys if k is not None}) > 10  # many groups, in several rounds
    expected = []
    for i in range(48):
        img = x[i]
        for keys in rounds:
            if keys[i] is not None:
                img = aa.t._apply_image_or_video_transform(img, keys[i][0], keys[i][1],
                                                           interpolation=aa.t.interpolation, fill=aa.t._fill)
        expected.append(img)
    assert torch.equal(out.to(torch.uint8), torch.stack(expected))


def test_per_image_and_batched_pipelines_share_their_definitions():
    # the same named augmentations exist on both paths
    for augment in AUGMENTS:
        build_transform("cifar", augment, train=True)
        pipelines.batch_transform("cifar", augment, train=True)
    moco_transform("cifar")
    with pytest.raises(ValueError, match="unknown data.augment"):
        pipelines.batch_transform("cifar", "mixup", train=True)


# -- no host synchronisation, one parameter copy per pipeline call (GPU finding F2, docs/gpu.md) -------------------------


_ATEN = torch.ops.aten
_SYNCING = {_ATEN._local_scalar_dense.default: "item()/bool()/tolist() of a device tensor",
            _ATEN.nonzero.default: "nonzero", _ATEN.is_nonzero.default: "is_nonzero",
            _ATEN.bincount.default: "bincount", _ATEN.masked_select.default: "masked_select"}
_INDEXING = (_ATEN.index, _ATEN.index_put, _ATEN.index_put_, _ATEN._index_put_impl_)
# Syncing ops allowed inside torchvision kernels that the RandAugment/AutoAugment groups still call (op -> count
# per pipeline call, with the reason). None today: the geometric ops, Sharpness and AutoContrast, whose
# torchvision kernels copy their matrices/kernels/fill to the device or assign through a boolean mask, run
# through copies of those kernels (batched._tv_grid, _tv_sharpness, _tv_autocontrast).
_ALLOWED: dict[str, int] = {}


class _SyncCensus(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that would stall a GPU: a device -> host read, or a boolean-mask index (nonzero)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = None
        if func in _SYNCING:
            name = str(func)
        elif func.overloadpacket in _INDEXING and len(args) > 1 and isinstance(args[1], (list, tuple)):
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                name = f"{func}[boolean mask]"
        if name is not None:
            self.hits[name] = self.hits.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _names_a_device(args, kwargs) -> bool:
    first = args[0] if args else None
    return kwargs.get("device") is not None or isinstance(first, (torch.device, str, int, torch.Tensor))


class _CopyCensus:
    """Counts calls that move data to a device (on a GPU: host-to-device copies): ``Tensor.to``/``cuda`` naming
    a device, and ``torch.tensor``/``torch.as_tensor``/``torch.full`` given a device."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        to, cuda = torch.Tensor.to, torch.Tensor.cuda

        def counted_to(t, *args, **kwargs):
            if _names_a_device(args, kwargs):
                self.calls.append("Tensor.to")
            return to(t, *args, **kwargs)

        def counted_cuda(t, *args, **kwargs):
            self.calls.append("Tensor.cuda")
            return cuda(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", counted_to)
        monkeypatch.setattr(torch.Tensor, "cuda", counted_cuda)
        for name in ("tensor", "as_tensor"):
            original = getattr(torch, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                if kwargs.get("device") is not None:
                    self.calls.append(f"torch.{_name}")
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch, name, counted)


def _every_pipeline():
    """(label, pipeline, channels, input side) for every augment x image kind, train and test, both option sets,
    and the MoCo key views with and without blur."""
    from rayexperts.data.augment.recipes import AugmentOptions

    official = AugmentOptions(autoaugment_fill=128, cutout_fill="black", crop_scale_min=0.05, normalize="unit")
    for kind, c, size, side in (("cifar", 3, 32, 32), ("digits", 1, 8, 8), ("imagenet", 3, 24, 40)):
        for label, options in (("default", None), ("official", official)):
            for augment in AUGMENTS:
                pipeline = pipelines.batch_transform(kind, augment, True, size, options=options)
                yield f"{kind}/{augment}/{label}", pipeline, c, side
            test = pipelines.batch_transform(kind, "standard", False, size, options=options)
            yield f"{kind}/test/{label}", test, c, side
            for blur in (False, True):
                pipeline = pipelines.batch_moco_transform(kind, size, blur, options=options)
                yield f"{kind}/moco{'_blur' * blur}/{label}", pipeline, c, side


@pytest.mark.slow
def test_batched_pipelines_never_sync_and_copy_their_parameters_once(monkeypatch):
    """Every batched pipeline: no aten op that reads a device tensor on the host or indexes by a boolean mask
    while it runs on the batch (its CPU draws and grouping come first, from the shape alone), and at most one
    host-to-device transfer per call (the packed parameters; the CPU path is forced to pack and "ship" here),
    once the per-device constants exist (the first call builds them)."""
    monkeypatch.setattr(core, "_FORCE_PACK", True)
    failures = []
    for label, pipeline, c, side in _every_pipeline():
        x = images(48, c, side, seed=21)
        r = rng(22)
        pipeline(x, r)  # builds the constants (mean/std, tables, grids, fills) once
        census = _CopyCensus(monkeypatch)
        out = pipeline(x, r)
        copies = list(census.calls)
        monkeypatch.undo()
        monkeypatch.setattr(core, "_FORCE_PACK", True)
        plans = pipeline.plan(tuple(x.shape), r)
        with _SyncCensus() as mode:
            pipeline.apply(x, core.ship(plans, x.device), r)
        over = {k: v for k, v in mode.hits.items() if v > _ALLOWED.get(k, 0)}
        drawn = any(isinstance(v, torch.Tensor) for plan in plans for v in plan.values())
        if over or len(copies) != int(drawn):
            failures.append(f"{label}: syncs {over}, device copies {copies}")
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), label
    assert not failures, "\n".join(failures)


def test_the_census_covers_the_recipe_views():
    """The census above runs every name of AUGMENTS for every kind, train and test, both option sets: the views of
    RIDE / SADE / BalPoE (Pillow's rotation, the always-on jitter, AutoAugment alone, SADE's test-time view)
    included."""
    labels = {label for label, *_ in _every_pipeline()}
    for kind in ("cifar", "digits", "imagenet"):
        for augment in ("standard_rotation", "standard_jitter", "autoaugment", "sade_tta"):
            assert augment in AUGMENTS and {f"{kind}/{augment}/default", f"{kind}/{augment}/official"} <= labels


def test_the_census_sees_a_masked_assignment_and_an_item():
    x = torch.zeros(4, 3)
    with _SyncCensus() as mode:
        mask = x[:, 0] == 0
        x[mask] = 1.0
        bool(mask.any())
    assert any("boolean mask" in k for k in mode.hits) and str(_ATEN._local_scalar_dense.default) in mode.hits


def test_ship_packs_every_dtype_into_one_buffer_and_unpacks_it(monkeypatch):
    monkeypatch.setattr(core, "_FORCE_PACK", True)
    plans = [{"a": torch.arange(5), "b": torch.tensor([True, False, True]), "n": 3},
             {"c": torch.rand(2, 3, dtype=torch.float64), "d": torch.rand(7).float(), "e": None,
              "f": torch.zeros(0, 6, dtype=torch.float64), "g": torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)}]
    census = _CopyCensus(monkeypatch)
    shipped = core.ship(plans, CPU)
    assert census.calls == ["Tensor.to"]
    for before, after in zip(plans, shipped):
        assert before.keys() == after.keys()
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
            else:
                assert after[key] == value
    monkeypatch.setattr(core, "_FORCE_PACK", False)
    assert core.ship(plans, CPU)[0]["a"] is plans[0]["a"]  # on the CPU: no copy at all


def test_batch_rng_names_the_cuda_device_explicitly(monkeypatch):
    """GPU finding F15 (docs/gpu.md): a bare "cuda" becomes cuda:<current device> for the pixel generator."""
    made = []

    class FakeGenerator:
        def __init__(self, device="cpu"):
            made.append(torch.device(device))

        def manual_seed(self, seed):
            return self

    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    r = core.BatchRng(0, torch.device("cuda"))
    assert r.device == torch.device("cuda", 3) and made[-1] == torch.device("cuda", 3)
    assert core.BatchRng(0, torch.device("cuda", 1)).device == torch.device("cuda", 1)
