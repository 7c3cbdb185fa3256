"""Batched geometry with continuous parameters: pad-crop-flip, flips, random resized crops, the digits' affine
jitter and Cutout; own vectorised torch code that repeats torchvision's arithmetic per sample."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.data.augment.batched.core import BatchRng, FnStep, Plan, Step, affine_grid_base


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


def _scale_translate_theta(scale: Tensor, tx: Tensor, ty: Tensor, h: int, w: int) -> Tensor:
    """CPU: the rescaled inverse matrices ``[B, 3, 2]`` of ``affine_scale_translate`` (float32)."""
    s, tx, ty = (t.to(torch.float64) for t in (scale, tx, ty))  # torchvision builds the matrix in double
    theta = torch.zeros(len(s), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = -tx / s, -ty / s
    return theta.to(torch.float32).transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32))


def _apply_scale_translate(x: Tensor, scaled: Tensor) -> Tensor:
    b, c, h, w = x.shape
    grid = affine_grid_base(h, w, x.device).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
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
