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
  sorted by key once per round, so a group is a slice and the results go back in one scatter.
* **Continuous parameters** (crop offsets, flips, colour jitter factors and order, grayscale, random
  resized crops, affine digits jitter, Gaussian blur, noise, Cutout): own vectorised torch code that
  repeats torchvision's arithmetic per sample (including its rounding back to ``uint8`` after every
  colour operation), with one parameter tensor per batch.

Randomness comes from a :class:`BatchRng` seeded per (seed, rank, epoch): parameters from a CPU
generator, per-pixel noise from one on the device, so an epoch is the same whatever the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rayexperts.data.transforms import MEAN_STD, NATIVE_SIZE

Step = Callable[[Tensor, "BatchRng"], Tensor]  # uint8-valued float batch [B, C, H, W] -> the same


class BatchRng:
    """Per-sample parameters from a CPU generator; per-pixel noise from a generator on ``device``."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cpu = torch.Generator().manual_seed(seed)
        self.device = device
        self.pixels = torch.Generator(device=device).manual_seed(seed + 1)

    def uniform64(self, n: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        """``U(low, high)`` draws in float64 on the CPU (factors whose complements must be exact)."""
        return torch.rand(n, generator=self.cpu, dtype=torch.float64) * (high - low) + low

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return self.uniform64(n, low, high).to(self.device, torch.float32)

    def randint(self, n: int, high: int) -> Tensor:
        return torch.randint(high, (n,), generator=self.cpu).to(self.device)

    def rand_cpu(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.cpu)

    def randn_like(self, x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=self.pixels, device=x.device, dtype=x.dtype)


def _to_u8(x: Tensor) -> Tensor:
    """torchvision's float → uint8 after a colour operation: clamp, then truncate."""
    return x.clamp_(0, 255).floor_()


def _gray(x: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` ``[B, 1, H, W]`` (float), as torchvision computes it."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


# ----------------------------------------------------------------------------- geometry


def pad_crop_flip(padding: int, flip: bool) -> Step:
    """``RandomCrop(size, padding)`` (zero fill) and, if ``flip``, ``RandomHorizontalFlip``: a crop offset
    in ``[0, 2·padding]²`` and a coin per image."""

    def step(x: Tensor, rng: BatchRng) -> Tensor:
        b, _, h, w = x.shape
        padded = F.pad(x, (padding, padding, padding, padding))
        top, left = rng.randint(b, 2 * padding + 1), rng.randint(b, 2 * padding + 1)
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        rows = top[:, None] + ar_h
        cols = left[:, None] + ar_w
        if flip:
            mirrored = rng.uniform(b) < 0.5
            cols = torch.where(mirrored[:, None], left[:, None] + (w - 1 - ar_w), cols)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    return step


def horizontal_flip(p: float = 0.5) -> Step:
    def step(x: Tensor, rng: BatchRng) -> Tensor:
        mirrored = (rng.uniform(x.shape[0]) < p).view(-1, 1, 1, 1)
        return torch.where(mirrored, x.flip(-1), x)

    return step


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


class RandomResizedCrop:
    """``RandomResizedCrop(size, scale, ratio)`` on a batch of equal-sized images (bilinear; no antialias,
    which only matters when a crop is larger than ``size``), or one image at a time with torchvision's
    ``resized_crop`` (:meth:`one`: images of different sizes, decoded from files)."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, x: Tensor, rng: BatchRng) -> Tensor:
        return crop_resize(x, resized_crop_boxes(x.shape[0], x.shape[2], x.shape[3], self.scale, self.ratio, rng),
                           self.size)

    def one(self, image: Tensor, rng: BatchRng) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w = resized_crop_boxes(1, image.shape[-2], image.shape[-1], self.scale, self.ratio, rng)[0].tolist()
        return TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)


def random_resized_crop(size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> RandomResizedCrop:
    return RandomResizedCrop(size, scale, ratio)


def affine_scale_translate(x: Tensor, scale: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """``F.affine(angle=0, translate=(tx, ty), scale, shear=0, bilinear, fill=0)`` per image, as
    torchvision computes it on tensors (inverse matrix, its grid, a coverage mask for the fill)."""
    b, c, h, w = x.shape
    dtype = torch.float32
    s, tx, ty = (t.to(torch.float64) for t in (scale, tx, ty))  # torchvision builds the matrix in double
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = -tx / s, -ty / s
    theta = theta.to(x.device, dtype)
    base = torch.empty(1, h, w, 3, dtype=dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=x.device))
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    with_mask = torch.cat([x.to(dtype), torch.ones(b, 1, h, w, dtype=dtype, device=x.device)], 1)
    out = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = out[:, :c], out[:, c:]
    return img.mul_(mask).round_()


def random_affine(translate: float, scale: Sequence[float]) -> Step:
    """``RandomAffine(degrees=0, translate=(t, t), scale)`` with bilinear interpolation: whole-pixel
    translations ``round(U(−t·size, t·size))`` and a scale ``U(scale)`` per image."""

    def step(x: Tensor, rng: BatchRng) -> Tensor:
        b, _, h, w = x.shape
        tx = torch.round(rng.uniform64(b, -translate * w, translate * w))
        ty = torch.round(rng.uniform64(b, -translate * h, translate * h))
        return affine_scale_translate(x, rng.uniform64(b, scale[0], scale[1]), tx, ty)

    return step


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
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long,
                          device=img.device)
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
    ``RandomApply``): per image its own four factors and its own random order of the four operations."""
    bounds = [(max(0.0, 1 - s), 1 + s) for s in strengths[:3]] + ([(-strengths[3], strengths[3])] if len(strengths) > 3
                                                                  else [])

    def step(x: Tensor, rng: BatchRng) -> Tensor:
        b = x.shape[0]
        applied = rng.uniform(b) < p
        order = rng.rand_cpu(b, 4).argsort(1).to(x.device)  # a uniform random permutation per image
        factors = [rng.uniform64(b, lo, hi).to(x.device) for lo, hi in bounds]
        out = x.clone()
        for position in range(4):
            for op in range(len(bounds)):
                chosen = applied & (order[:, position] == op)
                if chosen.any():
                    out[chosen] = _COLOUR_OPS[op](out[chosen], factors[op][chosen])
        return out

    return step


def random_grayscale(p: float) -> Step:
    def step(x: Tensor, rng: BatchRng) -> Tensor:
        if x.shape[1] == 1:
            return x
        chosen = (rng.uniform(x.shape[0]) < p).view(-1, 1, 1, 1)
        return torch.where(chosen, _gray(x).floor_().expand_as(x), x)

    return step


def gaussian_blur(kernel: int, sigma: Sequence[float], p: float) -> Step:
    """``RandomApply([GaussianBlur(kernel, sigma)], p)``: a sigma per image, reflect padding, rounded."""

    def step(x: Tensor, rng: BatchRng) -> Tensor:
        b, c, h, w = x.shape
        chosen = rng.uniform(b) < p
        if not chosen.any():
            return x
        s = rng.uniform(b, sigma[0], sigma[1]).to(torch.float32)
        half = (kernel - 1) * 0.5
        t = torch.linspace(-half, half, steps=kernel, device=x.device)
        k = torch.exp(-0.5 * (t[None] / s[:, None]).pow(2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B·C, K]
        pad = kernel // 2
        flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
        flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
        flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
        blurred = flat.view(b, c, h, w).round_()
        return torch.where(chosen.view(-1, 1, 1, 1), blurred, x)

    return step


# ----------------------------------------------------------------------------- auto-augment policies


def _grouped(x: Tensor, keys: list[tuple | None], apply: Callable[[Tensor, tuple], Tensor]) -> Tensor:
    """Apply ``apply(images, key)`` to each group of images sharing a key (None: untouched).

    The images with a key are gathered once, sorted by key, so that each group is a contiguous slice,
    and scattered back once: one index transfer and two copies per call, not per group (each group
    costs a host-to-device index copy on a GPU otherwise)."""
    order = sorted((i for i, key in enumerate(keys) if key is not None), key=lambda i: keys[i])
    if not order:
        return x
    rows = torch.tensor(order, device=x.device)
    sorted_images = x.index_select(0, rows).to(torch.uint8)
    parts, start = [], 0
    while start < len(order):
        key, end = keys[order[start]], start + 1
        while end < len(order) and keys[order[end]] == key:
            end += 1
        parts.append(apply(sorted_images[start:end], key))
        start = end
    out = x.clone()
    out[rows] = torch.cat(parts).to(x.dtype)
    return out


class AutoAugmentStep:
    """Shared by RandAugment and AutoAugment: per image and round a key (operation, magnitude) or None,
    drawn by :meth:`draw`; :meth:`__call__` applies each round, a group of images per key, through
    torchvision's own operation (``_apply_image_or_video_transform`` of the same transform class)."""

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

    def __call__(self, x: Tensor, rng: BatchRng) -> Tensor:
        b, _, h, w = x.shape
        for keys in self.draw(b, h, w, rng):
            x = _grouped(x, keys, lambda imgs, key: self.t._apply_image_or_video_transform(
                imgs, key[0], key[1], interpolation=self.t.interpolation, fill=self.t._fill))
        return x


class BatchRandAugment(AutoAugmentStep):
    """``RandAugment(num_ops, magnitude)``: per image and round an operation drawn uniformly from its 14
    and, for a signed one, a coin for the sign."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> None:
        from torchvision.transforms import v2

        super().__init__(v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins))
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
    """``AutoAugment(AutoAugmentPolicy.CIFAR10)``: per image a sub-policy drawn uniformly from its 25, each
    of its two operations applied with its probability (and a coin for a signed one's sign)."""

    def __init__(self) -> None:
        from torchvision.transforms import v2

        super().__init__(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))

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


def normalise(image_kind: str, noise_sigma: float = 0.0) -> Callable[[Tensor, BatchRng], Tensor]:
    """uint8 values → ``(x/255 − mean) / std`` (``ToNormalised``); with ``noise_sigma``, as the CBD
    ``data_aug`` teachers: ``x/255`` plus Gaussian noise, clipped to [0, 1], before the normalisation."""
    mean_t, std_t = MEAN_STD[image_kind]

    def step(x: Tensor, rng: BatchRng) -> Tensor:
        mean = torch.tensor(mean_t, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(std_t, device=x.device).view(1, -1, 1, 1)
        if noise_sigma > 0:
            x = x.mul(1.0 / 255)
            x = (x + rng.randn_like(x) * noise_sigma).clamp_(0, 1)
            return x.sub_(mean).div_(std)
        return x.div(255).sub_(mean).div_(std)

    return step


def cutout(size: int) -> Step:
    """``Cutout(size)`` on the normalised image: a zero square at a uniform random centre, clipped."""

    def step(x: Tensor, rng: BatchRng) -> Tensor:
        b, _, h, w = x.shape
        cy, cx, half = rng.randint(b, h), rng.randint(b, w), size // 2
        rows = torch.arange(h, device=x.device)[None]
        cols = torch.arange(w, device=x.device)[None]
        in_rows = (rows >= (cy[:, None] - half).clamp(min=0)) & (rows < cy[:, None] + half)
        in_cols = (cols >= (cx[:, None] - half).clamp(min=0)) & (cols < cx[:, None] + half)
        hole = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
        return x.masked_fill(hole, 0.0)

    return step


# ----------------------------------------------------------------------------- pipelines


class BatchPipeline:
    """uint8 ``[B, C, H, W]`` → normalised float, through ``steps`` on the uint8 values, the normalisation,
    then ``after`` on the normalised image (Cutout)."""

    def __init__(self, steps: list[Step], norm: Callable[[Tensor, BatchRng], Tensor], after: list[Step] | None = None):
        self.steps, self.norm, self.after = steps, norm, list(after or [])

    def __call__(self, images: Tensor, rng: BatchRng) -> Tensor:
        x = images.to(torch.float32)
        for step in self.steps:
            x = step(x, rng)
        x = self.norm(x, rng)
        for step in self.after:
            x = step(x, rng)
        return x


def _standard(image_kind: str, image_size: int) -> list[Step]:
    if image_kind == "digits":
        return [pad_crop_flip(1, flip=False)]
    if image_kind == "cifar":
        return [pad_crop_flip(4, flip=True)]
    return [random_resized_crop(image_size), horizontal_flip()]


def batch_transform(image_kind: str, augment: str, train: bool, image_size: int = 32) -> BatchPipeline:
    """The batched twin of ``transforms.build_transform(image_kind, augment, train, image_size)``."""
    from rayexperts.data.transforms import AUGMENTS, _check_kind

    _check_kind(image_kind)
    if augment not in AUGMENTS:
        raise ValueError(f"unknown data.augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not train or augment == "none":
        return BatchPipeline([], normalise(image_kind))
    steps = _standard(image_kind, image_size)
    if augment == "data_aug" and image_kind != "digits":
        steps.append(color_jitter((0.4, 0.4, 0.4)))
    elif augment == "randaugment":
        steps.append(BatchRandAugment())
    elif augment == "autoaugment_cutout":
        steps.append(BatchAutoAugment())
    noise = 0.01 if augment == "data_aug" else 0.0
    after = [cutout(NATIVE_SIZE.get(image_kind, image_size) // 2)] if augment == "autoaugment_cutout" else []
    return BatchPipeline(steps, normalise(image_kind, noise), after)


def batch_moco_transform(image_kind: str, image_size: int = 32) -> BatchPipeline:
    """The batched twin of ``transforms.moco_transform``: the MoCo v2 key view."""
    if image_kind == "digits":
        return BatchPipeline([random_affine(0.125, (0.8, 1.2))], normalise(image_kind))
    steps = [random_resized_crop(NATIVE_SIZE.get(image_kind, image_size), scale=(0.2, 1.0)),
             color_jitter((0.4, 0.4, 0.4, 0.1), p=0.8), random_grayscale(0.2)]
    if image_kind == "imagenet":
        steps.append(gaussian_blur(23, (0.1, 2.0), p=0.5))
    return BatchPipeline([*steps, horizontal_flip()], normalise(image_kind))
