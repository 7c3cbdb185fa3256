"""The batched back end's machinery: the generators, one parameter copy per call, per-device constants, the
:class:`Step` protocol and the grouping of images by operation.

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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


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


def rows_by_group(groups: Tensor, count: int) -> tuple[Tensor, list[int]]:
    """CPU: the images sorted by group (stably; group ``count`` and above = untouched, left out) and the
    bounds of each group's slice, ``count + 1`` Python ints."""
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups.clamp(max=count), minlength=count + 1)[:count].tolist()
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return order[:bounds[-1]], bounds


def scatter(x: Tensor, rows: Tensor, parts: list[Tensor]) -> Tensor:
    """``x`` with ``x[rows] = cat(parts)`` (integer rows: no mask, no sync)."""
    if not parts:
        return x
    return x.index_copy(0, rows, torch.cat(parts).to(x.dtype))


def to_u8(x: Tensor) -> Tensor:
    """torchvision's float → uint8 after a colour operation: clamp, then truncate."""
    return x.clamp_(0, 255).floor_()


def gray(x: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` ``[B, 1, H, W]`` (float), as torchvision computes it."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


class FnStep(Step):
    """A :class:`Step` from two functions: ``plan(shape, rng) -> Plan`` and ``apply(x, plan, rng) -> Tensor``."""

    def __init__(self, plan: Callable[[tuple[int, ...], BatchRng], Plan],
                 apply: Callable[[Tensor, Plan, BatchRng], Tensor]) -> None:
        self._plan, self._apply = plan, apply

    def plan(self, shape: tuple[int, ...], rng: BatchRng) -> Plan:
        return self._plan(shape, rng)

    def apply(self, x: Tensor, plan: Plan, rng: BatchRng) -> Tensor:
        return self._apply(x, plan, rng)


def affine_grid_base(h: int, w: int, device: torch.device) -> Tensor:
    """torchvision's ``_affine_grid`` base grid ``[1, h·w, 3]`` (pixel centres, then 1), once per device."""

    def build() -> Tensor:
        base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
        base[..., 2].fill_(1)
        return base.view(1, h * w, 3)

    return constant(("affine_grid_base", h, w), device, build)


def fill_image(fill: Sequence[float], channels: int, device: torch.device) -> Tensor:
    """The fill colour as a ``[1, C, 1, 1]`` float constant on ``device`` (one value: every channel)."""
    values = tuple(float(v) for v in fill)
    values = values * channels if len(values) == 1 else values
    return constant(("fill", values), device, lambda: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))
