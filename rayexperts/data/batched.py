"""Batched augmentation with per-sample randomness, on whatever device holds the batch (issue 15).

Every named augmentation of :mod:`rayexperts.data.transforms` (the per-image path) has a batched twin
here: each image of a batch gets its own operations and parameters, drawn from the same
distribution as the per-image transform draws them, and an operation with given parameters gives the
per-image transform's pixels (to 1/255: a resize may round the other way). Images enter as ``uint8``
``[B, C, H, W]`` and leave as normalised ``float32``.

How each is done, and why not kornia: torchvision's per-image transforms define the pixels this
project trains on (the papers' code uses torchvision), and kornia's operations are not the same
functions (its colour jitter, random resized crop sampling and auto-augment policies differ), so
they would not reproduce them.

* **RandAugment and AutoAugment** (finite sets of operations with fixed magnitudes): images are
  grouped by (operation, magnitude, sign) and each group goes through torchvision's own operation
  at once. Exactly torchvision's pixels, at about 2 × 14 × 2 batched calls per batch; the batch is
  sorted by key once per round, so a group is a slice and the results go back in one scatter. (The
  geometric ops, Sharpness and AutoContrast run through copies of torchvision's kernels that take
  their matrices from the shipped parameters and their constants from the cache.)
* **Continuous parameters** (crop offsets, flips, colour jitter factors and order, grayscale, random
  resized crops, affine digits jitter, Gaussian blur, noise, Cutout): own vectorised torch code that
  repeats torchvision's arithmetic per sample (including its rounding back to ``uint8`` after every
  colour operation), with one parameter tensor per batch.
* **timm's RandAugment** (``randaugment_timm``) and **Pillow's Gaussian blur** (the CIFAR MoCo key view
  with ``blur``, SADE's test-time view): Pillow's own arithmetic in torch (its affine resampling in float64, its
  integer box blur, its float32 blends and filters), grouped by operation as above; docs/methods.md "Recipes behind
  the published numbers", NCL. **Pillow's NEAREST rotation** (``standard_rotation``): its 16.16 fixed-point
  affine in int64, exact on any device.

Randomness comes from a :class:`BatchRng` seeded per (seed, rank, epoch): parameters from a CPU
generator, per-pixel noise from one on the device, so an epoch is the same whatever the device.

No host synchronisation (GPU finding F2, docs/gpu.md): a pipeline call first *plans* (every step draws its per-sample
parameters on the CPU, from the batch's shape only, and works out on the CPU which images go through
which operation), then ships all parameters to the device in **one** copy (from pinned memory,
``non_blocking``; none on the CPU), then *applies* the steps with no ``.item()``, no boolean-mask
indexing and no further host-to-device copy: groups of images are contiguous slices whose bounds the
CPU already knows. Constants (mean/std, colour-op tables, sampling grids) are built once per device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.data.transforms import NATIVE_SIZE, AugmentOptions, mean_std

Plan = dict[str, Any]  # one step's parameters: CPU tensors (shipped to the device) and Python values (group bounds)


class BatchRng:
    """Per-sample parameters from a CPU generator; per-pixel noise from a generator on ``device`` (a bare
    ``"cuda"`` becomes the current CUDA device, explicitly: GPU finding F15 (docs/gpu.md))."""

    def __init__(self, seed: int, device: torch.device) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.cpu = torch.Generator().manual_seed(seed)
        self.device = device
        self.pixels = torch.Generator(device=device).manual_seed(seed + 1)

    def uniform64(self, n: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        """``U(low, high)`` draws in float64 on the CPU (factors whose complements must be exact)."""
        return torch.rand(n, generator=self.cpu, dtype=torch.float64) * (high - low) + low

    def uniform_cpu(self, n: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        """The draws of :meth:`uniform`, as float32 on the CPU (the pipelines ship them with the rest)."""
        return self.uniform64(n, low, high).to(torch.float32)

    def randint_cpu(self, n: int, high: int) -> Tensor:
        return torch.randint(high, (n,), generator=self.cpu)

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        """:meth:`uniform_cpu` on the device (one copy per call: for tests and one-off use, not pipelines)."""
        return self.uniform_cpu(n, low, high).to(self.device)

    def randint(self, n: int, high: int) -> Tensor:
        return self.randint_cpu(n, high).to(self.device)

    def rand_cpu(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.cpu)

    def randn_like(self, x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=self.pixels, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- one copy per call, constants


_ALIGN = 8
_FORCE_PACK = False  # tests: pack and ship on the CPU too (``.to`` of the CPU buffer is a no-op there)


def ship(plans: Sequence[Plan], device: torch.device) -> list[Plan]:
    """``plans`` with every CPU tensor moved to ``device`` in one copy: the tensors' bytes are packed into one
    (pinned, on CUDA) buffer, copied with ``non_blocking=True`` and unpacked as views. On the CPU: unchanged."""
    device = torch.device(device)
    if device.type == "cpu" and not _FORCE_PACK:
        return list(plans)
    slots, pieces, offset = [], [], 0
    for i, plan in enumerate(plans):
        for key, value in plan.items():
            if isinstance(value, Tensor):
                flat = value.detach().contiguous().view(-1)
                raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
                slots.append((i, key, offset, raw.numel(), value.dtype, tuple(value.shape)))
                pieces.append(raw)
                pad = -raw.numel() % _ALIGN
                if pad:
                    pieces.append(torch.zeros(pad, dtype=torch.uint8))
                offset += raw.numel() + pad
    out = [dict(plan) for plan in plans]
    if not slots:
        return out
    buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=device.type == "cuda")
    torch.cat(pieces, out=buffer)
    on_device = buffer.to(device, non_blocking=True)
    for i, key, start, size, dtype, shape in slots:
        out[i][key] = on_device[start:start + size].view(dtype).view(shape)
    return out


_CONSTANTS: dict[tuple, Tensor] = {}


def constant(name: tuple, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    """The tensor ``build()`` on ``device``, built and copied there once per (name, device)."""
    key = (name, torch.device(device))
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = build().to(device)
    return value


class Step:
    """One batched operation in two halves: :meth:`plan` draws its per-sample parameters on the CPU from the
    batch's shape alone; :meth:`apply` runs it on the device with those parameters (shipped). Calling a step
    with ``(x, rng)`` does both, with its own copy."""

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> Plan:
        return {}

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, rng: BatchRng) -> Tensor:
        return self.apply(x, ship([self.plan(tuple(x.shape), rng)], x.device)[0], rng)


def _rows_by_group(groups: Tensor, count: int) -> tuple[Tensor, list[int]]:
    """CPU: the images sorted by group (stably; group ``count`` and above = untouched, left out) and the
    bounds of each group's slice, ``count + 1`` Python ints."""
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups.clamp(max=count), minlength=count + 1)[:count].tolist()
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return order[:bounds[-1]], bounds


def _scatter(x: Tensor, rows: Tensor, parts: list[Tensor]) -> Tensor:
    """``x`` with ``x[rows] = cat(parts)`` (integer rows: no mask, no sync)."""
    if not parts:
        return x
    return x.index_copy(0, rows, torch.cat(parts).to(x.dtype))


def _to_u8(x: Tensor) -> Tensor:
    """torchvision's float → uint8 after a colour operation: clamp, then truncate."""
    return x.clamp_(0, 255).floor_()


def _gray(x: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` ``[B, 1, H, W]`` (float), as torchvision computes it."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


# ----------------------------------------------------------------------------- geometry


class FnStep(Step):
    """A :class:`Step` from two functions: ``plan(shape, rng) -> Plan`` and ``apply(x, plan, rng) -> Tensor``."""

    def __init__(self, plan: Callable[[tuple[int, ...], BatchRng], Plan],
                 apply: Callable[[Tensor, Plan, BatchRng], Tensor]) -> None:
        self._plan, self._apply = plan, apply

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> Plan:
        return self._plan(shape, rng)

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        return self._apply(x, plan, rng)


def pad_crop_flip(padding: int, flip: bool) -> Step:
    """``RandomCrop(size, padding)`` (zero fill) and, if ``flip``, ``RandomHorizontalFlip``: a crop offset
    in ``[0, 2·padding]²`` and a coin per image."""

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b = shape[0]
        top, left = rng.randint_cpu(b, 2 * padding + 1), rng.randint_cpu(b, 2 * padding + 1)
        return {"top": top, "left": left, "mirrored": rng.uniform_cpu(b) < 0.5 if flip else None}

    def apply(x: Tensor, p: Plan, rng: BatchRng) -> Tensor:
        b, _, h, w = x.shape
        padded = F.pad(x, (padding, padding, padding, padding))
        top, left = p["top"], p["left"]
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        rows = top[:, None] + ar_h
        cols = left[:, None] + ar_w
        if flip:
            cols = torch.where(p["mirrored"][:, None], left[:, None] + (w - 1 - ar_w), cols)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    return FnStep(plan, apply)


def horizontal_flip(p: float = 0.5) -> Step:
    return FnStep(lambda shape, rng: {"mirrored": rng.uniform_cpu(shape[0]) < p},
                  lambda x, plan, rng: torch.where(plan["mirrored"].view(-1, 1, 1, 1), x.flip(-1), x))


def resized_crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                       rng: BatchRng, tries: int = 10) -> Tensor:
    """``[n, 4]`` (top, left, height, width) as ``RandomResizedCrop.make_params`` draws them: up to ten
    (area, aspect ratio) draws per image, the first that fits, else the central fallback crop."""
    area = height * width
    target = area * (rng.rand_cpu(n, tries).double() * (scale[1] - scale[0]) + scale[0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(rng.rand_cpu(n, tries).double() * (log_r[1] - log_r[0]) + log_r[0])
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, w[torch.arange(n), pick], torch.full((n,), fw))
    ch = torch.where(first >= 0, h[torch.arange(n), pick], torch.full((n,), fh))
    top = torch.where(first >= 0, (rng.rand_cpu(n) * (height - ch + 1)).floor().long(), (height - ch) // 2)
    left = torch.where(first >= 0, (rng.rand_cpu(n) * (width - cw + 1)).floor().long(), (width - cw) // 2)
    return torch.stack([top, left, ch, cw], 1)


def crop_resize(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop each image to its box (top, left, height, width) and resize it to ``size``² bilinearly, as
    ``F.resized_crop`` does (half-pixel centres, edges clamped to the crop), rounded to whole values."""
    b, _, h, w = x.shape
    if boxes.device != x.device:
        boxes = boxes.to(x.device)
    top, left, ch, cw = (boxes[:, i].to(x.dtype) for i in range(4))
    steps = torch.arange(size, device=x.device, dtype=x.dtype) + 0.5

    def coords(start: Tensor, extent: Tensor, limit: int) -> tuple[Tensor, Tensor, Tensor]:
        src = (steps[None] * (extent[:, None] / size) - 0.5).clamp(min=0)
        src = torch.minimum(src, extent[:, None] - 1)
        low = src.floor()
        frac = src - low
        low = low + start[:, None]
        high = torch.minimum(low + 1, start[:, None] + extent[:, None] - 1)
        return low.long().clamp(0, limit - 1), high.long().clamp(0, limit - 1), frac

    y0, y1, fy = coords(top, ch, h)
    x0, x1, fx = coords(left, cw, w)
    batch = torch.arange(b, device=x.device)[:, None, None]
    img = x.permute(0, 2, 3, 1)

    def at(rows: Tensor, cols: Tensor) -> Tensor:
        return img[batch, rows[:, :, None], cols[:, None, :]]

    fy, fx = fy[:, :, None, None], fx[:, None, :, None]
    top_row = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom_row = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return (top_row * (1 - fy) + bottom_row * fy).round_().permute(0, 3, 1, 2)


class RandomResizedCrop(Step):
    """``RandomResizedCrop(size, scale, ratio)`` on a batch of equal-sized images (bilinear; no antialias,
    which only matters when a crop is larger than ``size``), or one image at a time with torchvision's
    ``resized_crop`` (:meth:`one`: images of different sizes, decoded from files)."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> Plan:
        return {"boxes": resized_crop_boxes(shape[0], shape[2], shape[3], self.scale, self.ratio, rng)}

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:2], self.size, self.size)

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        return crop_resize(x, plan["boxes"], self.size)

    def one(self, image: Tensor, rng: BatchRng) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w = resized_crop_boxes(1, image.shape[-2], image.shape[-1], self.scale, self.ratio, rng)[0].tolist()
        return TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)


def random_resized_crop(size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> RandomResizedCrop:
    return RandomResizedCrop(size, scale, ratio)


def _affine_grid_base(h: int, w: int, device: torch.device) -> Tensor:
    """torchvision's ``_affine_grid`` base grid ``[1, h·w, 3]`` (pixel centres, then 1), once per device."""

    def build() -> Tensor:
        base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
        base[..., 2].fill_(1)
        return base.view(1, h * w, 3)

    return constant(("affine_grid_base", h, w), device, build)


def _scale_translate_theta(scale: Tensor, tx: Tensor, ty: Tensor, h: int, w: int) -> Tensor:
    """CPU: the rescaled inverse matrices ``[B, 3, 2]`` of ``affine_scale_translate`` (float32)."""
    s, tx, ty = (t.to(torch.float64) for t in (scale, tx, ty))  # torchvision builds the matrix in double
    theta = torch.zeros(len(s), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = -tx / s, -ty / s
    return theta.to(torch.float32).transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32))


def _apply_scale_translate(x: Tensor, scaled: Tensor) -> Tensor:
    b, c, h, w = x.shape
    grid = _affine_grid_base(h, w, x.device).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    with_mask = torch.cat([x.to(torch.float32), x.new_ones(b, 1, h, w, dtype=torch.float32)], 1)
    out = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = out[:, :c], out[:, c:]
    return img.mul_(mask).round_()


def affine_scale_translate(x: Tensor, scale: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """``F.affine(angle=0, translate=(tx, ty), scale, shear=0, bilinear, fill=0)`` per image, as
    torchvision computes it on tensors (inverse matrix, its grid, a coverage mask for the fill)."""
    scaled = _scale_translate_theta(scale.cpu(), tx.cpu(), ty.cpu(), x.shape[2], x.shape[3])
    return _apply_scale_translate(x, scaled.to(x.device))


def random_affine(translate: float, scale: Sequence[float]) -> Step:
    """``RandomAffine(degrees=0, translate=(t, t), scale)`` with bilinear interpolation: whole-pixel
    translations ``round(U(−t·size, t·size))`` and a scale ``U(scale)`` per image."""

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b, _, h, w = shape
        tx = torch.round(rng.uniform64(b, -translate * w, translate * w))
        ty = torch.round(rng.uniform64(b, -translate * h, translate * h))
        return {"theta": _scale_translate_theta(rng.uniform64(b, scale[0], scale[1]), tx, ty, h, w)}

    return FnStep(plan, lambda x, p, rng: _apply_scale_translate(x, p["theta"]))


# ----------------------------------------------------------------------------- colour


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``_blend``: ``f·x + (1 − f)·other`` with both weights rounded to float32 from double."""
    weight = f.to(torch.float64)
    return _to_u8(x * weight.to(x.dtype).view(-1, 1, 1, 1) + other * (1.0 - weight).to(x.dtype).view(-1, 1, 1, 1))


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return _to_u8(x * f.to(torch.float64).to(x.dtype).view(-1, 1, 1, 1))


def contrast(x: Tensor, f: Tensor) -> Tensor:
    gray = _gray(x).floor_() if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x).floor_(), f)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    """torchvision's ``_rgb_to_hsv`` (images in [0, 1])."""
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / divisor).unbind(dim=-3)
    neq_r, eq_g = maxc != r, maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(eq_g & neq_r)
    hr = bc.sub_(gc).mul_(~neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(neq_r.logical_and_(eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(img: Tensor) -> Tensor:
    """torchvision's ``_hsv_to_rgb``."""
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = constant(("hsv_to_rgb",), img.device, lambda: torch.tensor(
        [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long))
    return vpqt.gather(-3, select[:, i].moveaxis(0, -3))


def hue(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x.mul(1.0 / 255))
    h, s, v = hsv.unbind(dim=-3)
    h = (h + f.to(torch.float64).to(h.dtype).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3)).mul_(255.0 + 1.0 - 1e-3).floor_()


_COLOUR_OPS = (brightness, contrast, saturation, hue)  # ColorJitter's fn_idx order


def color_jitter(strengths: Sequence[float], p: float = 1.0) -> Step:
    """``ColorJitter(brightness, contrast, saturation[, hue])`` (applied with probability ``p``, as
    ``RandomApply``): per image its own four factors and its own random order of the four operations.

    At each of the four positions the images are grouped (on the CPU) by the operation they get there, each
    group a contiguous slice of one gather, and scattered back: the pixels of ``out[chosen] = op(out[chosen])``
    without its mask and sync."""
    bounds = [(max(0.0, 1 - s), 1 + s) for s in strengths[:3]] + ([(-strengths[3], strengths[3])] if len(strengths) > 3
                                                                  else [])
    n_ops = len(bounds)

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b = shape[0]
        applied = rng.uniform_cpu(b) < p
        order = rng.rand_cpu(b, 4).argsort(1)  # a uniform random permutation per image
        factors = torch.stack([rng.uniform64(b, lo, hi) for lo, hi in bounds])  # [ops, B]
        rows, values, bounds_at = [], [], []
        for position in range(4):
            op = torch.where(applied, order[:, position], torch.full_like(order[:, position], n_ops))
            r, cuts = _rows_by_group(op, n_ops)
            rows.append(r)
            values.append(factors[op[r], r])
            bounds_at.append(cuts)
        return {"rows": torch.cat(rows), "factors": torch.cat(values), "bounds": bounds_at}

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        out, start = x, 0
        for cuts in plan["bounds"]:
            rows, factors = plan["rows"][start:start + cuts[-1]], plan["factors"][start:start + cuts[-1]]
            start += cuts[-1]
            if not cuts[-1]:
                continue
            chosen = out.index_select(0, rows)
            parts = [_COLOUR_OPS[op](chosen[cuts[op]:cuts[op + 1]], factors[cuts[op]:cuts[op + 1]])
                     for op in range(n_ops) if cuts[op + 1] > cuts[op]]
            out = _scatter(out, rows, parts)
        return out

    return FnStep(plan, apply)


def random_grayscale(p: float) -> Step:
    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        return {} if shape[1] == 1 else {"chosen": rng.uniform_cpu(shape[0]) < p}

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        if x.shape[1] == 1:
            return x
        return torch.where(plan["chosen"].view(-1, 1, 1, 1), _gray(x).floor_().expand_as(x), x)

    return FnStep(plan, apply)


def gaussian_blur(kernel: int, sigma: Sequence[float], p: float) -> Step:
    """``RandomApply([GaussianBlur(kernel, sigma)], p)``: a sigma per image, reflect padding, rounded. (The
    sigmas are drawn only when some image is chosen, a decision the CPU makes.)"""

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        chosen = rng.uniform_cpu(shape[0]) < p
        if not bool(chosen.any()):  # a CPU tensor: no device sync
            return {"chosen": None}
        return {"chosen": chosen, "sigma": rng.uniform_cpu(shape[0], sigma[0], sigma[1])}

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        if plan["chosen"] is None:
            return x
        b, c, h, w = x.shape
        s = plan["sigma"]
        half = (kernel - 1) * 0.5
        t = torch.linspace(-half, half, steps=kernel, device=x.device)
        k = torch.exp(-0.5 * (t[None] / s[:, None]).pow(2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B·C, K]
        pad = kernel // 2
        flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
        flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
        flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
        blurred = flat.view(b, c, h, w).round_()
        return torch.where(plan["chosen"].view(-1, 1, 1, 1), blurred, x)

    return FnStep(plan, apply)


# ----------------------------------------------------------------------------- auto-augment policies


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


def _fill_image(fill: Sequence[float], channels: int, device: torch.device) -> Tensor:
    values = tuple(float(v) for v in fill)
    values = values * channels if len(values) == 1 else values
    return constant(("fill", values), device, lambda: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))


def _tv_grid(images: Tensor, theta: Tensor, mode: str, fill: Any) -> Tensor:
    """torchvision's ``_affine_grid`` + ``_apply_grid_transform`` on a group of uint8 images sharing ``theta``
    (shipped), with the fill image a cached constant instead of a copy per call."""
    n, c, h, w = images.shape
    grid = _affine_grid_base(h, w, images.device).bmm(theta).view(1, h, w, 2)
    float_img = images.to(torch.float32)
    if n > 1:
        grid = grid.expand(n, -1, -1, -1)
    if fill is not None:
        float_img = torch.cat((float_img, float_img.new_ones(n, 1, h, w)), dim=1)
    float_img = F.grid_sample(float_img, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if fill is not None:
        float_img, mask = torch.tensor_split(float_img, indices=(-1,), dim=-3)
        mask = mask.expand_as(float_img)
        fill_img = _fill_image(fill if isinstance(fill, (tuple, list)) else [fill], c, images.device)
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
            x = _scatter(x, rows, parts)
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


# ----------------------------------------------------------------------------- normalising


def normalise(image_kind: str, noise_sigma: float = 0.0, options: AugmentOptions | None = None) -> Step:
    """uint8 values → ``(x/255 − mean) / std`` (``ToNormalised``; ``options.normalize="unit"``: mean 0, std 1,
    i.e. ``x/255``); with ``noise_sigma``, as the CBD ``data_aug`` teachers: ``x/255`` plus Gaussian noise,
    clipped to [0, 1], before the normalisation. Mean and std are constants on the device."""
    mean_t, std_t = mean_std(image_kind, options)

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        mean = constant(("mean", mean_t), x.device, lambda: torch.tensor(mean_t).view(1, -1, 1, 1))
        std = constant(("std", std_t), x.device, lambda: torch.tensor(std_t).view(1, -1, 1, 1))
        if noise_sigma > 0:
            x = x.mul(1.0 / 255)
            x = (x + rng.randn_like(x) * noise_sigma).clamp_(0, 1)
            return x.sub_(mean).div_(std)
        return x.div(255).sub_(mean).div_(std)

    return FnStep(lambda shape, rng: {}, apply)


def cutout(size: int) -> Step:
    """``Cutout(size)``: a zero square at a uniform random centre, clipped (on the normalised image, or, before
    the normalisation, on the uint8 values: ``cutout_fill="black"``)."""

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b, _, h, w = shape
        return {"cy": rng.randint_cpu(b, h), "cx": rng.randint_cpu(b, w)}

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        b, _, h, w = x.shape
        cy, cx, half = plan["cy"], plan["cx"], size // 2
        rows = torch.arange(h, device=x.device)[None]
        cols = torch.arange(w, device=x.device)[None]
        in_rows = (rows >= (cy[:, None] - half).clamp(min=0)) & (rows < cy[:, None] + half)
        in_cols = (cols >= (cx[:, None] - half).clamp(min=0)) & (cols < cx[:, None] + half)
        hole = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
        return x.masked_fill(hole, 0.0)

    return FnStep(plan, apply)


# ----------------------------------------------------------------------------- Pillow's arithmetic
# docs/methods.md "Recipes behind the published numbers", NCL: timm's RandAugment and the PIL Gaussian blur of the
# key view run on PIL images in the authors' code. These are Pillow's own formulas (Blend.c, Convert.c rgb2l,
# Filter.c 3x3, ImageOps, Geometry.c affine bilinear/bicubic, BoxBlur.c), on uint8-valued float batches.


def pil_blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """``Image.blend(degenerate, x, factor)`` (every ``ImageEnhance`` op): ``d + f·(x − d)`` in float32 with the
    factor a C float, clipped to [0, 255] and truncated."""
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp_(0, 255).floor_()


def pil_luma(x: Tensor) -> Tensor:
    """``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16`` ``[B, 1, H, W]`` (exact in float32)."""
    r, g, b = x.unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) * (1.0 / 65536)).floor_().unsqueeze(1)


def pil_color(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Color``: blend with the image's luma (an L image is its own degenerate)."""
    return x if x.shape[1] == 1 else pil_blend(pil_luma(x), x, factor)


def pil_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Contrast``: blend with the flat grey ``int(mean(luma) + 0.5)``."""
    luma = pil_luma(x) if x.shape[1] == 3 else x
    mean = (luma.sum(dim=(1, 2, 3), dtype=torch.float64) / luma[0].numel() + 0.5).floor_()
    return pil_blend(mean.to(torch.float32).view(-1, 1, 1, 1), x, factor)


def pil_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return pil_blend(x.new_zeros(()), x, factor)


_SMOOTH_A = float(np.float32(1) / np.float32(13))  # ImageFilter.SMOOTH's kernel / 13, as C floats
_SMOOTH_B = float(np.float32(5) / np.float32(13))


def pil_smooth(x: Tensor) -> Tensor:
    """``filter(ImageFilter.SMOOTH)``: Pillow's 3x3 float32 filter (rows below, centre, above, each left to
    right, on top of a 0.5 rounding offset; clipped, truncated); the border pixels are copied."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x

    def row(r: Tensor, k1: float) -> Tensor:
        return (r[..., :-2] * _SMOOTH_A + r[..., 1:-1] * k1) + r[..., 2:] * _SMOOTH_A

    ss = ((row(x[..., 2:, :], _SMOOTH_A) + 0.5) + row(x[..., 1:-1, :], _SMOOTH_B)) + row(x[..., :-2, :], _SMOOTH_A)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp_(0, 255).floor_()
    return out


def pil_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image."""
    return pil_blend(pil_smooth(x), x, factor)


def pil_autocontrast(x: Tensor) -> Tensor:
    """``ImageOps.autocontrast`` (cutoff 0) per channel: ``int(v·scale + offset)`` clipped, with
    ``scale = 255/(hi − lo)``, ``offset = −lo·scale`` in double; a flat channel unchanged."""
    lo = x.amin(dim=(-2, -1), keepdim=True).to(torch.float64)
    hi = x.amax(dim=(-2, -1), keepdim=True).to(torch.float64)
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    out = (x.to(torch.float64) * scale + offset).trunc_().clamp_(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def pil_equalize(x: Tensor) -> Tensor:
    """``ImageOps.equalize`` per channel: ``lut[i] = (step//2 + Σ_{j<i} h[j]) // step`` with ``step = (N − h[max])
    // 255``, clipped to 255 (``Image.point``); unchanged when ``step`` is 0."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).long()
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, flat, torch.ones_like(flat))
    below = hist.cumsum(2).sub_(hist)
    step = (h * w - hist.gather(2, flat.amax(2, keepdim=True))).div_(255, rounding_mode="floor")
    lut = below.add_(step.div(2, rounding_mode="floor")).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(2, flat).view(n, c, h, w).to(x.dtype)


def pil_lut(x: Tensor, lut: Tensor) -> Tensor:
    """``image.point(lut)`` with one 256-entry table per image (``lut`` ``[B, 256]``, the same for every band)."""
    n = x.shape[0]
    return lut.to(x.dtype).gather(1, x.reshape(n, -1).long()).view_as(x)


def pil_affine(x: Tensor, matrix: Tensor, bicubic: bool, fill: Sequence[float]) -> Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` per image (``matrix`` ``[B, 6]``
    float64): Pillow's ``affine_transform`` of each output pixel centre, its bilinear or bicubic filter in double
    (neighbours clamped to the image, the result truncated to uint8), ``fill`` where the centre maps outside."""
    n, c, h, w = x.shape
    dev = x.device
    a = matrix.to(torch.float64).view(n, 6, 1, 1).unbind(1)
    xs = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    xin = (a[0] * xs + a[1] * ys) + a[2]  # [B, H, W]
    yin = (a[3] * xs + a[4] * ys) + a[5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    img = x.to(torch.float64).reshape(n, c, h * w)

    def at(rows: Tensor, cols: Tensor) -> Tensor:
        index = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
        return img.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    if not bicubic:
        def lerp(y: Tensor) -> Tensor:
            left = at(y, x0)
            return left + (at(y, x0 + 1) - left) * dx

        top = lerp(y0)
        value = top + (lerp(y0 + 1) - top) * dy
    else:
        def cubic(v1: Tensor, v2: Tensor, v3: Tensor, v4: Tensor, d: Tensor) -> Tensor:
            p2 = -v1 + v3
            p3 = 2 * (v1 - v2) + v3 - v4
            p4 = -v1 + v2 - v3 + v4
            return v2 + d * (p2 + d * (p3 + d * p4))

        rows = [cubic(*(at(y0 + k - 1, x0 + j - 1) for j in range(4)), dx) for k in range(4)]
        value = cubic(*rows, dy)
    out = value.clamp_(0, 255).floor_().to(x.dtype)
    return torch.where(inside.unsqueeze(1), out, _fill_image(fill, c, dev).to(x.dtype))


def pil_rotate_coefficients(angle: float, w: int, h: int) -> list[int]:
    """The 16.16 fixed-point coefficients ``(a0, a1, a2, a3, a4, a5)`` of ``Image.rotate(angle, NEAREST)`` on a
    ``w``×``h`` image: its matrix (:func:`timm_matrix`, as ``Image.rotate`` computes it; |angle| < 90, where the
    only fast path is angle 0, the identity) through Geometry.c ``affine_fixed``'s ``FIX(v) = floor(v·65536 + 0.5)``,
    offsets moved to the first pixel centre. (Pillow takes that path whenever the image's corners map within
    ±32768, i.e. for any image under some 16000 px: checked.)"""
    a = timm_matrix("Rotate", angle, w, h)
    for x, y in ((0, 0), (w, h), (0, h), (w, 0)):
        if not (abs(x * a[0] + y * a[1] + a[2]) < 32768.0 and abs(x * a[3] + y * a[4] + a[5]) < 32768.0):
            raise NotImplementedError(f"a {w}x{h} image is beyond Pillow's fixed-point NEAREST affine")

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    return [fix(a[0]), fix(a[1]), fix(a[2] + a[0] * 0.5 + a[1] * 0.5),
            fix(a[3]), fix(a[4]), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)]


def pil_affine_nearest(x: Tensor, coefficients: Tensor, fill: Sequence[float]) -> Tensor:
    """Pillow's NEAREST affine transform in 16.16 fixed point (Geometry.c ``affine_fixed``) per image
    (``coefficients`` ``[B, 6]`` int64 from :func:`pil_rotate_coefficients`): output pixel (x, y) takes input pixel
    ``((a2 + x·a0 + y·a1) >> 16, (a5 + x·a3 + y·a4) >> 16)``, ``fill`` where that is outside. Integer arithmetic:
    exactly Pillow's pixels, on any device."""
    n, c, h, w = x.shape
    dev = x.device
    a = coefficients.view(n, 6, 1, 1).unbind(1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xin = (a[2] + xs * a[0] + ys * a[1]).bitwise_right_shift_(16)  # arithmetic shift: floor, as C's on int
    yin = (a[5] + xs * a[3] + ys * a[4]).bitwise_right_shift_(16)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    index = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), out, _fill_image(fill, c, dev).to(x.dtype))


def pil_random_rotation(degrees: float = 15.0, fill: Sequence[float] = (0,)) -> Step:
    """``RandomRotation(degrees)`` (NEAREST, ``expand=False``, the centre, ``fill``) as torchvision applies it to a
    PIL image (``Image.rotate``; ``transforms.PILRandomRotation``): per image an angle ``U(−degrees, degrees)``
    drawn in float32 (as torchvision draws it), its Pillow fixed-point coefficients planned on the CPU,
    :func:`pil_affine_nearest` on the device. Same angle, same pixels, exactly."""
    if not 0 <= degrees < 90:
        raise ValueError(f"pil_random_rotation needs 0 <= degrees < 90 (Pillow's rotate fast paths), got {degrees}")

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b, _, h, w = shape
        angles = rng.uniform_cpu(b, -degrees, degrees).tolist()
        return {"coefficients": torch.tensor([pil_rotate_coefficients(a, w, h) for a in angles],
                                             dtype=torch.long).view(b, 6)}

    return FnStep(plan, lambda x, p, rng: pil_affine_nearest(x, p["coefficients"], fill))


def pil_box_blur_weights(radius: float) -> tuple[int, int, int]:
    """Pillow's ``GaussianBlur(radius)`` as one extended box pass (3 passes per direction): the box's integer
    radius and its 24-bit fixed-point weights ``ww`` (inside) and ``fw`` (the two edge taps), computed in C float
    as ``_gaussian_blur_radius`` and ``ImagingHorizontalBoxBlur`` compute them."""
    f32 = np.float32
    r = f32(radius)
    sigma2 = f32(r * r) / f32(3)
    big_l = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    small_l = f32(math.floor((float(big_l) - 1.0) / 2.0))
    frac = (f32(2) * small_l + f32(1)) * (small_l * (small_l + f32(1)) - f32(3) * sigma2)
    frac = frac / (f32(6) * (sigma2 - (small_l + f32(1)) * (small_l + f32(1))))
    box = f32(small_l + frac)
    whole = int(box)
    ww = int(f32(1 << 24) / (box * f32(2) + f32(1)))
    fw = ((1 << 24) - (whole * 2 + 1) * ww) // 2
    return whole, ww, fw


def _box_blur_pass(x: Tensor, weights: Tensor) -> Tensor:
    """One ``ImagingHorizontalBoxBlur`` pass along the last axis (int64 values, taps clamped at the border)."""
    taps, width = weights.shape[1], x.shape[-1]
    reach = taps // 2
    cols = torch.arange(width, device=x.device)
    acc = torch.zeros_like(x)
    for t in range(taps):
        acc += x[..., (cols + (t - reach)).clamp_(0, width - 1)] * weights[:, t].view(-1, 1, 1, 1)
    return acc.add_(1 << 23).bitwise_right_shift_(24)


def pil_gaussian_blur(sigma: Sequence[float] = (0.1, 2.0), p: float = 0.5) -> Step:
    """``RandomApply([GaussianBlur(sigma)], p)`` with NCL's PIL blur: ``filter(ImageFilter.GaussianBlur(r))``,
    ``r ~ U(sigma)`` per image, exactly as Pillow computes it (3 horizontal then 3 vertical extended box passes
    with integer weights, rounded to uint8 after each). Unchosen images get the identity box."""

    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b = shape[0]
        chosen = rng.uniform_cpu(b) < p
        radii = rng.uniform64(b, sigma[0], sigma[1]).tolist()
        boxes = [pil_box_blur_weights(r) if c else (0, 1 << 24, 0) for r, c in zip(radii, chosen.tolist())]
        reach = max(whole for whole, _, _ in boxes) + 1
        weights = torch.zeros(b, 2 * reach + 1, dtype=torch.long)
        for i, (whole, ww, fw) in enumerate(boxes):
            weights[i, reach - whole:reach + whole + 1] = ww
            weights[i, reach - whole - 1] = weights[i, reach + whole + 1] = fw
        return {"weights": weights if bool(chosen.any()) else None}

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        if plan["weights"] is None:
            return x
        v = x.to(torch.long)
        for _ in range(3):
            v = _box_blur_pass(v, plan["weights"])
        v = v.transpose(-1, -2)
        for _ in range(3):
            v = _box_blur_pass(v, plan["weights"])
        return v.transpose(-1, -2).to(x.dtype)

    return FnStep(plan, apply)


# ----------------------------------------------------------------------------- timm's RandAugment

TIMM_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TIMM_LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM
_TIMM_LUT, _TIMM_ENHANCE = ("Invert", "Posterize", "Solarize", "SolarizeAdd"), ("Color", "Contrast", "Brightness",
                                                                                  "Sharpness")
_TIMM_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# groups of one round, in this order: AutoContrast, Equalize, the table ops, the four blends, affine bilinear/bicubic
_TIMM_GROUP = {"AutoContrast": 0, "Equalize": 1, **{k: 2 for k in _TIMM_LUT},
               **{k: 3 + i for i, k in enumerate(_TIMM_ENHANCE)}}
_PIL_ENHANCE = (pil_color, pil_contrast, pil_brightness, pil_sharpness)


def timm_level_arg(name: str, magnitude: float, negative: bool, hparams: dict) -> float | int | None:
    """timm's ``LEVEL_TO_ARG[name](magnitude, hparams)`` with its random sign given (``negative``: timm's
    ``_randomly_negate`` drew ``random() > 0.5``): the argument of the operation, None for the argument-less ones."""
    level = magnitude / TIMM_LEVEL_DENOM
    if name == "Posterize":
        return int(level * 4)
    if name == "Solarize":
        return min(256, int(level * 256))
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    if name in _TIMM_ENHANCE:
        return level * 1.8 + 0.1
    if name == "Rotate":
        value = level * 30.
    elif name in ("ShearX", "ShearY"):
        value = level * 0.3
    elif name in ("TranslateXRel", "TranslateYRel"):
        value = level * hparams.get("translate_pct", 0.45)
    else:
        return None
    return -value if negative else value


def timm_lut(name: str, arg: int | None) -> list[int]:
    """The table of timm's Invert / Posterize / Solarize / SolarizeAdd (Pillow's ``ImageOps`` tables)."""
    if name == "Invert":
        return [255 - i for i in range(256)]
    if name == "Posterize":
        if arg >= 8:
            return list(range(256))
        mask = ~(2 ** (8 - arg) - 1)
        return [i & mask for i in range(256)]
    if name == "Solarize":
        return [i if i < arg else 255 - i for i in range(256)]
    return [min(255, i + arg) if i < 128 else i for i in range(256)]  # SolarizeAdd, threshold 128


def timm_matrix(name: str, arg: float, w: int, h: int) -> list[float]:
    """The affine matrix Pillow receives from timm's geometric op (``img.rotate`` computes its own, as here)."""
    if name == "ShearX":
        return [1.0, arg, 0.0, 0.0, 1.0, 0.0]
    if name == "ShearY":
        return [1.0, 0.0, 0.0, arg, 1.0, 0.0]
    if name == "TranslateXRel":
        return [1.0, 0.0, arg * w, 0.0, 1.0, 0.0]
    if name == "TranslateYRel":
        return [1.0, 0.0, 0.0, 0.0, 1.0, arg * h]
    angle = arg % 360.0  # Image.rotate(angle, resample, expand=False, center=None, translate=None)
    if angle == 0:
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    center = (w / 2, h / 2)
    angle = -math.radians(angle)
    matrix = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
              round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    a, b, c, d, e, f = matrix
    matrix[2], matrix[5] = a * -center[0] + b * -center[1] + c, d * -center[0] + e * -center[1] + f
    matrix[2] += center[0]
    matrix[5] += center[1]
    return matrix


class BatchTimmRandAugment(Step):
    """timm's ``rand_augment_transform(config, hparams)`` (``rand-n2-m10-mstd0.5``: docs/methods.md "Recipes behind
    the published numbers", NCL ImageNet-LT train view) on a batch: per image and round an operation drawn
    uniformly from timm's 15 (with replacement), applied with probability ``p``, magnitude ``N(m, mstd)``
    clipped to [0, 10], a fair sign for the signed ones, and (as timm leaves ``interpolation`` unset) a fair
    coin between bilinear and bicubic for the geometric ones. Each round's images are grouped by operation
    (table ops share one group: Invert, Posterize, Solarize, SolarizeAdd as per-image tables; geometric ops
    share one per filter: their per-image Pillow matrices) and go through Pillow's arithmetic above."""

    def __init__(self, config: str = "rand-n2-m10-mstd0.5", hparams: dict | None = None) -> None:
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = 2, 10.0, 0.0, 0.5
        parts = config.split("-")
        if parts[0] != "rand":
            raise ValueError(f"not a timm RandAugment config: {config!r}")
        for part in parts[1:]:
            key = part.rstrip("0123456789.")
            key = next((k for k in ("mstd", "m", "n", "p") if part.startswith(k)), key)
            value = part[len(key):]
            if key == "n":
                self.num_ops = int(value)
            elif key == "m":
                self.magnitude = float(int(value))
            elif key == "mstd":
                self.magnitude_std = float(value)
            elif key == "p":
                self.prob = float(value)
            else:
                raise ValueError(f"unsupported timm RandAugment section {part!r} in {config!r}")
        self.hparams = dict(hparams or {})
        fill = self.hparams.get("img_mean", (128, 128, 128))
        self.fill = tuple(fill) if isinstance(fill, (tuple, list)) else (fill,)

    def draw(self, b: int, h: int, w: int, rng: BatchRng) -> dict[str, Tensor]:
        """CPU draws ``[rounds, B]``: op index into :data:`TIMM_OPS`, applied, magnitude (clipped), negative,
        bicubic."""
        ops = torch.randint(len(TIMM_OPS), (self.num_ops, b), generator=rng.cpu)
        applied, magnitude, negative, bicubic = [], [], [], []
        for _ in range(self.num_ops):
            applied.append(rng.rand_cpu(b) <= self.prob)
            noise = torch.randn(b, generator=rng.cpu, dtype=torch.float64)
            magnitude.append((self.magnitude + self.magnitude_std * noise).clamp_(0.0, TIMM_LEVEL_DENOM))
            negative.append(rng.rand_cpu(b) > 0.5)
            bicubic.append(rng.rand_cpu(b) < 0.5)
        return {"ops": ops, "applied": torch.stack(applied), "magnitude": torch.stack(magnitude),
                "negative": torch.stack(negative), "bicubic": torch.stack(bicubic)}

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> Plan:
        b, _, h, w = shape
        d = {key: value.tolist() for key, value in self.draw(b, h, w, rng).items()}
        rows, luts, factors, matrices, bounds = [], [], [], [], []
        for k in range(self.num_ops):
            group, args = [], []
            for i in range(b):
                name = TIMM_OPS[d["ops"][k][i]]
                arg = timm_level_arg(name, d["magnitude"][k][i], d["negative"][k][i], self.hparams)
                if not d["applied"][k][i]:
                    group.append(9)
                elif name in _TIMM_GEOMETRIC:
                    group.append(8 if d["bicubic"][k][i] else 7)
                else:
                    group.append(_TIMM_GROUP[name])
                args.append((name, arg))
            r, cuts = _rows_by_group(torch.tensor(group), 9)
            order = r.tolist()
            luts += [timm_lut(*args[i]) for i in order[cuts[2]:cuts[3]]]
            factors += [args[i][1] for i in order[cuts[3]:cuts[7]]]
            matrices += [timm_matrix(*args[i], w, h) for i in order[cuts[7]:cuts[9]]]
            rows.append(r)
            bounds.append(cuts)
        return {"rows": torch.cat(rows), "bounds": bounds,
                "luts": torch.tensor(luts, dtype=torch.uint8).view(-1, 256),
                "factors": torch.tensor(factors, dtype=torch.float64).to(torch.float32),
                "matrices": torch.tensor(matrices, dtype=torch.float64).view(-1, 6)}

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        start = lut_at = factor_at = matrix_at = 0
        for cuts in plan["bounds"]:
            rows = plan["rows"][start:start + cuts[-1]]
            start += cuts[-1]
            if not cuts[-1]:
                continue
            images, parts = x.index_select(0, rows), []
            for g in range(9):
                lo, hi = cuts[g], cuts[g + 1]
                if hi == lo:
                    continue
                part = images[lo:hi]
                if g == 0:
                    parts.append(pil_autocontrast(part))
                elif g == 1:
                    parts.append(pil_equalize(part))
                elif g == 2:
                    parts.append(pil_lut(part, plan["luts"][lut_at:lut_at + hi - lo]))
                    lut_at += hi - lo
                elif g < 7:
                    parts.append(_PIL_ENHANCE[g - 3](part, plan["factors"][factor_at:factor_at + hi - lo]))
                    factor_at += hi - lo
                else:
                    parts.append(pil_affine(part, plan["matrices"][matrix_at:matrix_at + hi - lo], g == 8, self.fill))
                    matrix_at += hi - lo
            x = _scatter(x, rows, parts)
        return x


# ----------------------------------------------------------------------------- pipelines


class BatchPipeline:
    """uint8 ``[B, C, H, W]`` → normalised float, through ``steps`` on the uint8 values, the normalisation,
    then ``after`` on the normalised image (Cutout). A call plans every step on the CPU (:meth:`plan`), ships
    the parameters in one copy (:func:`ship`) and applies the steps on the device (:meth:`apply`)."""

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


def _standard(image_kind: str, image_size: int, options: AugmentOptions | None = None) -> list[Step]:
    if image_kind == "digits":
        return [pad_crop_flip(1, flip=False)]
    if image_kind == "cifar":
        return [pad_crop_flip(4, flip=True)]
    scale_min = (options or AugmentOptions()).crop_scale_min
    return [random_resized_crop(image_size, scale=(scale_min, 1.0)), horizontal_flip()]


def _sade_tta(image_kind: str, image_size: int) -> list[Step]:
    """The twin of ``transforms._sade_tta`` (SADE's test-time view, Vanint/SADE-AgnosticLT@cba11b8
    test_training_cifar.py:179-189, test_training_imagenet.py:177-187): crop, jitter (p 0.8), grayscale (0.2), PIL
    blur (p 0.2 CIFAR and digits, 0.5 ImageNet), flip; digits: crop and blur only."""
    from rayexperts.data.transforms import SADE_TTA_BLUR_P

    blur = pil_gaussian_blur((0.1, 2.0), p=SADE_TTA_BLUR_P[image_kind])
    if image_kind == "digits":
        return [pad_crop_flip(1, flip=False), blur]
    crop = pad_crop_flip(4, flip=False) if image_kind == "cifar" else random_resized_crop(image_size, scale=(0.2, 1.0))
    return [crop, color_jitter((0.4, 0.4, 0.4, 0.1), p=0.8), random_grayscale(0.2), blur, horizontal_flip()]


def batch_transform(image_kind: str, augment: str, train: bool, image_size: int = 32, *,
                    options: AugmentOptions | None = None) -> BatchPipeline:
    """The batched twin of ``transforms.build_transform(image_kind, augment, train, image_size, options=...)``."""
    from rayexperts.data.transforms import AUGMENTS, ROTATION_DEGREES, TIMM_RANDAUGMENT, _check_kind, timm_hparams

    _check_kind(image_kind)
    options = options or AugmentOptions()
    if augment not in AUGMENTS:
        raise ValueError(f"unknown data.augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not train or augment == "none":
        return BatchPipeline([], normalise(image_kind, options=options))
    if augment == "sade_tta":
        return BatchPipeline(_sade_tta(image_kind, image_size), normalise(image_kind, options=options))
    steps = _standard(image_kind, image_size, options)
    fill = options.autoaugment_fill or None
    colour = image_kind != "digits"
    if augment in ("data_aug", "standard_jitter") and colour:
        steps.append(color_jitter((0.4, 0.4, 0.4)))
    elif augment == "standard_rotation":
        steps.append(pil_random_rotation(ROTATION_DEGREES))
    elif augment == "data_aug_simclr" and colour:
        steps += [color_jitter((0.8, 0.8, 0.8, 0.2), p=0.8), random_grayscale(0.2)]
    elif augment == "randaugment":
        steps.append(BatchRandAugment(fill=fill))
    elif augment == "randaugment_timm":
        steps += ([color_jitter((0.4, 0.4, 0.4))] if colour else []) + [
            BatchTimmRandAugment(TIMM_RANDAUGMENT, timm_hparams(image_kind, image_size))]
    elif augment in ("autoaugment_cutout", "autoaugment"):
        steps.append(BatchAutoAugment(fill=fill))
    noise = 0.01 if augment == "data_aug" else 0.0
    after = []
    if augment == "autoaugment_cutout":
        hole = cutout(NATIVE_SIZE.get(image_kind, image_size) // 2)
        steps, after = (steps + [hole], []) if options.cutout_fill == "black" else (steps, [hole])
    return BatchPipeline(steps, normalise(image_kind, noise, options), after)


def batch_moco_transform(image_kind: str, image_size: int = 32, blur: bool = False, *,
                         options: AugmentOptions | None = None) -> BatchPipeline:
    """The batched twin of ``transforms.moco_transform``: the MoCo v2 key view (``blur``: NCL's PIL Gaussian
    blur, p 0.5, last, on CIFAR)."""
    if image_kind == "digits":
        return BatchPipeline([random_affine(0.125, (0.8, 1.2))], normalise(image_kind, options=options))
    steps = [random_resized_crop(NATIVE_SIZE.get(image_kind, image_size), scale=(0.2, 1.0)),
             color_jitter((0.4, 0.4, 0.4, 0.1), p=0.8), random_grayscale(0.2)]
    if image_kind == "imagenet":
        steps.append(gaussian_blur(23, (0.1, 2.0), p=0.5))
    steps.append(horizontal_flip())
    if blur and image_kind == "cifar":
        steps.append(pil_gaussian_blur((0.1, 2.0), p=0.5))
    return BatchPipeline(steps, normalise(image_kind, options=options))
