"""timm's RandAugment (``randaugment_timm``: docs/methods.md "Recipes behind the published numbers", NCL
ImageNet-LT train view) on a batch, through Pillow's arithmetic (:mod:`.pil`), grouped by operation."""

from __future__ import annotations


import torch
from torch import Tensor

from rayexperts.data.augment.batched.core import BatchRng, Plan, Step, rows_by_group, scatter
from rayexperts.data.augment.batched.pil import (
    pil_affine,
    pil_autocontrast,
    pil_brightness,
    pil_color,
    pil_contrast,
    pil_equalize,
    pil_lut,
    pil_rotate_matrix,
    pil_sharpness,
)


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
    """The affine matrix Pillow receives from timm's geometric op (``img.rotate`` computes its own:
    :func:`.pil.pil_rotate_matrix`)."""
    if name == "ShearX":
        return [1.0, arg, 0.0, 0.0, 1.0, 0.0]
    if name == "ShearY":
        return [1.0, 0.0, 0.0, arg, 1.0, 0.0]
    if name == "TranslateXRel":
        return [1.0, 0.0, arg * w, 0.0, 1.0, 0.0]
    if name == "TranslateYRel":
        return [1.0, 0.0, 0.0, 0.0, 1.0, arg * h]
    return pil_rotate_matrix(arg, w, h)


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
            r, cuts = rows_by_group(torch.tensor(group), 9)
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
            x = scatter(x, rows, parts)
        return x
