"""The method registry: ``method=<name>`` → its :class:`~rayexperts.methods.base.Method`."""

from __future__ import annotations

import difflib
import importlib

from rayexperts.methods.base import Batch, LossOutput, Method

_REGISTRY = {
    "ce": "rayexperts.methods.ce:CrossEntropy",
    "bsce": "rayexperts.methods.bsce:BalancedSoftmax",
    "mllt": "rayexperts.methods.mllt:MutualLearning",
    "ncl": "rayexperts.methods.ncl:NestedCollaborative",
    "ecl": "rayexperts.methods.ecl:EffectiveCollaborative",
    "cbd": "rayexperts.methods.cbd:ClassBalancedDistillation",
}


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method '{name}' (config key 'method'): choose one of {', '.join(method_names())}{hint}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Batch", "LossOutput", "Method", "get_method", "method_names"]
