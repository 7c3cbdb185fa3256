"""Batched colour: ColorJitter (its four operations in a random order per image), RandomGrayscale and
torchvision's Gaussian blur, repeating torchvision's arithmetic per sample (including its rounding back to
``uint8`` after every colour operation), with one parameter tensor per batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.data.augment.batched.core import (
    BatchRng,
    FnStep,
    Plan,
    Step,
    constant,
    gray,
    rows_by_group,
    scatter,
    to_u8,
)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``_blend``: ``f·x + (1 − f)·other`` with both weights rounded to float32 from double."""
    weight = f.to(torch.float64)
    return to_u8(x * weight.to(x.dtype).view(-1, 1, 1, 1) + other * (1.0 - weight).to(x.dtype).view(-1, 1, 1, 1))


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return to_u8(x * f.to(torch.float64).to(x.dtype).view(-1, 1, 1, 1))


def contrast(x: Tensor, f: Tensor) -> Tensor:
    grey = gray(x).floor_() if x.shape[1] == 3 else x
    return _blend(x, grey.mean(dim=(1, 2, 3), keepdim=True), f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, gray(x).floor_(), f)


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
            r, cuts = rows_by_group(op, n_ops)
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
            out = scatter(out, rows, parts)
        return out

    return FnStep(plan, apply)


def random_grayscale(p: float) -> Step:
    def plan(shape: tuple[int, ...], rng: BatchRng) -> Plan:
        return {} if shape[1] == 1 else {"chosen": rng.uniform_cpu(shape[0]) < p}

    def apply(x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        if x.shape[1] == 1:
            return x
        return torch.where(plan["chosen"].view(-1, 1, 1, 1), gray(x).floor_().expand_as(x), x)

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
