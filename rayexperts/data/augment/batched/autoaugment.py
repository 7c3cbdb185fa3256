"""torchvision's RandAugment and AutoAugment on a batch (finite sets of operations with fixed magnitudes): images
are grouped by (operation, magnitude, sign) and each group goes through torchvision's own operation at once.
Exactly torchvision's pixels, at about 2 × 14 × 2 batched calls per batch; the batch is sorted by key once per
round, so a group is a slice and the results go back in one scatter. (The geometric ops, Sharpness and
AutoContrast run through copies of torchvision's kernels that take their matrices from the shipped parameters
and their constants from the cache.)"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.data.augment.batched.core import BatchRng, Plan, Step, affine_grid_base, constant, fill_image, scatter


_TV_GEOMETRY = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _tv_geometry(name: str, magnitude: float, h: int, w: int) -> tuple[str, Any]:
    """CPU: what torchvision's ``_apply_image_or_video_transform`` does for a geometric operation on an
    ``h``×``w`` tensor image: ``("identity", None)`` or ``("rot90", k)`` (``rotate_image``'s fast paths), else
    ``("grid", theta)`` with the rescaled inverse matrix ``[1, 3, 2]`` that ``_affine_grid`` multiplies its base
    grid by (``affine_image`` / ``rotate_image``, computed here as they compute it)."""
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

    if name == "Rotate":
        angle = magnitude % 360
        if angle == 0:
            return "identity", None
        if angle == 180:
            return "rot90", 2
        if h == w and angle in (90, 270):
            return "rot90", 1 if angle == 90 else 3
        matrix = _get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
    else:
        if name in ("ShearX", "ShearY"):
            shear = math.degrees(math.atan(magnitude))
            shears, center = ([shear, 0.0] if name == "ShearX" else [0.0, shear]), [-w * 0.5, -h * 0.5]
            translate = [0.0, 0.0]
        else:
            shears, center = [0.0, 0.0], [0.0, 0.0]
            translate = [float(int(magnitude)), 0.0] if name == "TranslateX" else [0.0, float(int(magnitude))]
        matrix = _get_inverse_affine_matrix(center, 0.0, translate, 1.0, shears)
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    return "grid", theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32))


def _tv_grid(images: Tensor, theta: Tensor, mode: str, fill: Any) -> Tensor:
    """torchvision's ``_affine_grid`` + ``_apply_grid_transform`` on a group of uint8 images sharing ``theta``
    (shipped), with the fill image a cached constant instead of a copy per call."""
    n, c, h, w = images.shape
    grid = affine_grid_base(h, w, images.device).bmm(theta).view(1, h, w, 2)
    float_img = images.to(torch.float32)
    if n > 1:
        grid = grid.expand(n, -1, -1, -1)
    if fill is not None:
        float_img = torch.cat((float_img, float_img.new_ones(n, 1, h, w)), dim=1)
    float_img = F.grid_sample(float_img, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if fill is not None:
        float_img, mask = torch.tensor_split(float_img, indices=(-1,), dim=-3)
        mask = mask.expand_as(float_img)
        fill_img = fill_image(fill if isinstance(fill, (tuple, list)) else [fill], c, images.device)
        if mode == "nearest":
            float_img = torch.where(mask < 0.5, fill_img.expand_as(float_img), float_img)
        else:
            float_img = float_img.sub_(fill_img).mul_(mask).add_(fill_img)
    return float_img.round_().to(images.dtype)


def _tv_sharpness(image: Tensor, factor: float) -> Tensor:
    """torchvision's ``adjust_sharpness_image`` on uint8 images, its kernel a cached constant."""
    c, h, w = image.shape[-3:]
    if h <= 2 or w <= 2:
        return image
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = constant(("sharpness",), image.device, lambda: torch.tensor([[a, a, a], [a, b, a], [a, a, a]],
                                                                          dtype=torch.float32))
    output = image.to(dtype=torch.float32, copy=True)
    blurred = F.conv2d(output, kernel.expand(c, 1, 3, 3), groups=c).round_()
    view = output[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=(1.0 - factor))
    return output.clamp_(0, 255).to(image.dtype)


def _tv_autocontrast(image: Tensor) -> Tensor:
    """torchvision's ``autocontrast_image`` on uint8 images, with selects for its masked assignments."""
    float_image = image.to(torch.float32)
    minimum = float_image.amin(dim=(-2, -1), keepdim=True)
    maximum = float_image.amax(dim=(-2, -1), keepdim=True)
    eq = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / 255)
    minimum = torch.where(eq, 0.0, minimum)
    inv_scale = torch.where(eq, 1.0, inv_scale)
    return float_image.sub_(minimum).div_(inv_scale).clamp_(0, 255).to(image.dtype)


class AutoAugmentStep(Step):
    """Shared by RandAugment and AutoAugment: per image and round a key (operation, magnitude) or None,
    drawn by :meth:`draw`. :meth:`plan` sorts each round's images by key (on the CPU) and computes each
    geometric group's matrix; :meth:`apply` gathers each round's images once, runs each group (a slice)
    through torchvision's own operation (``_apply_image_or_video_transform`` of the same transform class;
    the geometric ones, Sharpness and AutoContrast through copies of torchvision's kernels without their
    per-call host-to-device copies and masked assignments) and scatters the round back once."""

    rounds = 1

    def __init__(self, transform) -> None:
        self.t = transform
        self._magnitudes: dict[tuple[str, int, int, int], tuple[list[float] | None, bool]] = {}

    def draw(self, b: int, h: int, w: int, rng: BatchRng) -> list[list[tuple[str, float] | None]]:
        raise NotImplementedError

    def _key(self, name: str, index: int | None, bins: int, h: int, w: int, negative: bool) -> tuple[str, float]:
        magnitudes = self._magnitudes.get((name, bins, h, w))
        if magnitudes is None:  # torchvision's magnitude table of this operation, computed once per image size
            magnitudes_fn, signed = self.t._AUGMENTATION_SPACE[name]
            mags = magnitudes_fn(bins, h, w)
            magnitudes = self._magnitudes[(name, bins, h, w)] = (None if mags is None else mags.tolist(), signed)
        mags, signed = magnitudes
        if mags is None:
            return name, 0.0
        mag = float(mags[index])
        return name, -mag if signed and negative else mag

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b, _, h, w = shape
        rows, thetas, rounds, n_theta = [], [], [], 0
        for keys in self.draw(b, h, w, rng):
            order = sorted((i for i, key in enumerate(keys) if key is not None), key=lambda i: keys[i])
            groups, start = [], 0
            while start < len(order):
                key, end = keys[order[start]], start + 1
                while end < len(order) and keys[order[end]] == key:
                    end += 1
                how, arg = _tv_geometry(key[0], key[1], h, w) if key[0] in _TV_GEOMETRY else ("tv", None)
                if how == "grid":
                    thetas.append(arg)
                    arg, n_theta = n_theta, n_theta + 1
                groups.append((key, start, end, how, arg))
                start = end
            rows.append(torch.tensor(order, dtype=torch.long))
            rounds.append(groups)
        return {"rows": torch.cat(rows), "thetas": torch.cat(thetas) if thetas else None, "rounds": rounds}

    def _run(self, images: Tensor, key: tuple, how: str, arg: Any, thetas: Tensor | None) -> Tensor:
        name, magnitude = key
        fill = _fill_arg(self.t)
        if how == "identity":
            return images
        if how == "rot90":
            return torch.rot90(images, k=arg, dims=(-2, -1))
        if how == "grid":
            from torchvision.transforms.v2.functional._geometry import _check_interpolation

            return _tv_grid(images, thetas[arg:arg + 1], _check_interpolation(self.t.interpolation).value, fill)
        if name == "Sharpness":
            return _tv_sharpness(images, 1.0 + magnitude)
        if name == "AutoContrast":
            return _tv_autocontrast(images)
        return self.t._apply_image_or_video_transform(images, name, magnitude, interpolation=self.t.interpolation,
                                                     fill=self.t._fill)

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        start = 0
        for groups in plan["rounds"]:
            n = groups[-1][2] if groups else 0
            rows = plan["rows"][start:start + n]
            start += n
            if not n:
                continue
            sorted_images = x.index_select(0, rows).to(torch.uint8)
            parts = [self._run(sorted_images[lo:hi], key, how, arg, plan["thetas"]) for key, lo, hi, how, arg in groups]
            x = scatter(x, rows, parts)
        return x


def _fill_arg(transform) -> Any:
    from torchvision.transforms.v2._utils import _get_fill

    return _get_fill(transform._fill, torch.Tensor)


class BatchRandAugment(AutoAugmentStep):
    """``RandAugment(num_ops, magnitude, fill=fill)``: per image and round an operation drawn uniformly from its
    14 and, for a signed one, a coin for the sign."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, fill: int | None = None
                 ) -> None:
        from torchvision.transforms import v2

        super().__init__(v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins,
                                        fill=fill))
        self.names = list(self.t._AUGMENTATION_SPACE)

    def draw(self, b: int, h: int, w: int, rng: BatchRng) -> list[list[tuple[str, float] | None]]:
        rounds = []
        for _ in range(self.t.num_ops):
            ops = rng.rand_cpu(b).mul(len(self.names)).floor().long().tolist()
            negative = (rng.rand_cpu(b) <= 0.5).tolist()
            rounds.append([self._key(self.names[op], self.t.magnitude, self.t.num_magnitude_bins, h, w, neg)
                           for op, neg in zip(ops, negative)])
        return rounds


class BatchAutoAugment(AutoAugmentStep):
    """``AutoAugment(AutoAugmentPolicy.CIFAR10, fill=fill)``: per image a sub-policy drawn uniformly from its 25,
    each of its two operations applied with its probability (and a coin for a signed one's sign)."""

    def __init__(self, fill: int | None = None) -> None:
        from torchvision.transforms import v2

        super().__init__(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill))

    def draw(self, b: int, h: int, w: int, rng: BatchRng) -> list[list[tuple[str, float] | None]]:
        policies = self.t._policies
        chosen = rng.rand_cpu(b).mul(len(policies)).floor().long().tolist()
        rounds = []
        for position in range(2):
            applied, negative = rng.rand_cpu(b).tolist(), (rng.rand_cpu(b) <= 0.5).tolist()
            keys: list[tuple[str, float] | None] = []
            for i in range(b):
                name, probability, index = policies[chosen[i]][position]
                keys.append(self._key(name, index, 10, h, w, negative[i]) if applied[i] <= probability else None)
            rounds.append(keys)
        return rounds
