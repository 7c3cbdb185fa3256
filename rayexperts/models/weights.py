"""Pretrained weights from a local file (``model.weights=PATH``; docs/pretrained.md "Weights files").

A file is a safetensors file (``.safetensors``) or a ``torch.save``d state dict (``.pth``, ``.pt``, ``.bin``:
``torch.load(weights_only=True)``). A checkpoint that nests its state dict under ``state_dict`` or ``model``
is unwrapped, and DistributedDataParallel's ``module.`` prefix is dropped. Loading is strict unless asked
otherwise; every error is one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rayexperts.errors import ConfigError

_NESTED = ("state_dict", "model")  # where training checkpoints keep the weights


class WeightsError(ConfigError):
    """A weights file that cannot be read, or does not fit the model; the message names the file."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of weights file ``path``: nested ``state_dict``/``model`` keys unwrapped, ``module.`` dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.weights: file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a state dict, another format
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"model.weights: cannot read '{path}' (truncated or not a weights file: {reason})") from e
    for key in _NESTED:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"model.weights: '{path}' holds no state dict (a mapping of names to tensors)")
    out = {}
    for key, value in state.items():
        out[key.removeprefix("module.")] = value
    return out


def load_into(module: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike, *, strict: bool = True,
              rename: Callable[[str], str | None] | None = None, quiet: bool = False) -> tuple[list[str], list[str]]:
    """Load ``state`` (read from ``path``) into ``module``; ``rename`` maps a file's key to the module's (None:
    skip it). A shape mismatch is always an error, missing or unexpected keys only when ``strict``; prints one
    line reporting them otherwise. Returns (missing, unexpected)."""
    if rename is not None:
        state = {new: v for k, v in state.items() if (new := rename(k)) is not None}
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong:
        raise WeightsError(f"model.weights: '{path}' is for another architecture: {len(wrong)} tensors of another "
                           f"shape (file vs model: {_few(wrong)})")
    if strict and (missing or unexpected):
        raise WeightsError(f"model.weights: '{path}' does not fit the model (model.weights_strict=true): "
                           f"{len(missing)} missing keys ({_few(missing)}), {len(unexpected)} unexpected keys "
                           f"({_few(unexpected)})")
    if own and next(iter(own.values())).is_meta:
        return missing, unexpected  # a shape check only (the driver's preflight)
    module.load_state_dict(state, strict=False)
    if not quiet and (missing or unexpected):
        print(f"[rayexperts] model.weights '{path}': {len(missing)} missing keys ({_few(missing)}), "
              f"{len(unexpected)} unexpected keys ({_few(unexpected)})", flush=True)
    return missing, unexpected


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") if keys else "none"


__all__ = ["WeightsError", "load_into", "read_state_dict"]
