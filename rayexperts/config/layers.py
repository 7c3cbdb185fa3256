"""A layer is ``(where it comes from, nested or dotted keys)``; reading dotted keys out of layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rayexperts.errors import ConfigError


Layer = tuple[str, Mapping[str, Any]]  # (where it comes from, nested or dotted keys)


def flatten_mapping(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping; lists (e.g. a list of teacher specs) are values, not sections."""
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            full = f"{prefix}{k}"
            if isinstance(v, Mapping):  # a section (an empty one sets nothing)
                out.update(flatten_mapping(v, full + "."))
            else:
                out[full] = v
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' sets a field inside '{p}', which is a value, not a section")
        node[parts[-1]] = dict(value) if isinstance(value, Mapping) else value
    return out


def setting(layers: Sequence[Layer], key: str, default: Any) -> tuple[Any, str]:
    """The last value ``layers`` give ``key`` and the layer that gave it."""
    value, where = default, "the defaults"
    for source, layer in layers:
        flat = flatten_mapping(layer)
        if key in flat:
            value, where = flat[key], source
    return value, where


def provenance(layers: Sequence[Layer]) -> dict[str, str]:
    """Each dotted key's layer: the last of ``layers`` that sets it (keys no layer sets: ``defaults``)."""
    last: dict[str, str] = {}
    for name, layer in layers:
        for key in flatten_mapping(layer):
            last[key] = name
    return last
