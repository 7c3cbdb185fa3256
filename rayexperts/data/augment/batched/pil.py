"""Pillow's arithmetic on batches: its blends, luma, SMOOTH filter, ImageOps tables, affine resampling (bilinear and
bicubic in float64; NEAREST rotation in 16.16 fixed point, exact on any device) and its integer box blur, for
timm's RandAugment, the PIL Gaussian blur (the CIFAR MoCo key view with ``blur``, SADE's test-time view) and the
PIL rotation of ``standard_rotation``.

docs/methods.md "Recipes behind the published numbers", NCL: timm's RandAugment and the PIL Gaussian blur of the
key view run on PIL images in the authors' code. These are Pillow's own formulas (Blend.c, Convert.c rgb2l,
Filter.c 3x3, ImageOps, Geometry.c affine bilinear/bicubic, BoxBlur.c), on uint8-valued float batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rayexperts.data.augment.batched.core import BatchRng, FnStep, Plan, Step, fill_image


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
    return torch.where(inside.unsqueeze(1), out, fill_image(fill, c, dev).to(x.dtype))


def pil_rotate_matrix(angle: float, w: int, h: int) -> list[float]:
    """The affine matrix ``Image.rotate(angle, resample, expand=False, center=None, translate=None)`` computes
    for a ``w``×``h`` image (the inverse map, output pixel -> input pixel)."""
    angle = angle % 360.0
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


def pil_rotate_coefficients(angle: float, w: int, h: int) -> list[int]:
    """The 16.16 fixed-point coefficients ``(a0, a1, a2, a3, a4, a5)`` of ``Image.rotate(angle, NEAREST)`` on a
    ``w``×``h`` image: its matrix (:func:`pil_rotate_matrix`; |angle| < 90, where the
    only fast path is angle 0, the identity) through Geometry.c ``affine_fixed``'s ``FIX(v) = floor(v·65536 + 0.5)``,
    offsets moved to the first pixel centre. (Pillow takes that path whenever the image's corners map within
    ±32768, i.e. for any image under some 16000 px: checked.)"""
    a = pil_rotate_matrix(angle, w, h)
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
    return torch.where(inside.unsqueeze(1), out, fill_image(fill, c, dev).to(x.dtype))


def pil_random_rotation(degrees: float = 15.0, fill: Sequence[float] = (0,)) -> Step:
    """``RandomRotation(degrees)`` (NEAREST, ``expand=False``, the centre, ``fill``) as torchvision applies it to a
    PIL image (``Image.rotate``; ``per_image.PILRandomRotation``): per image an angle ``U(−degrees, degrees)``
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
