"""The methods: ``method=<name>`` → its :class:`~rayexperts.methods.base.Method` (one module each).

Built-in methods register themselves when their module is imported; the registry
(:data:`rayexperts.registry.METHODS`) imports a module on the first lookup of its name.
"""

from __future__ import annotations

from rayexperts.methods.base import Batch, LossOutput, Method, NoOptions, register_method
from rayexperts.registry import METHODS


def method_names() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "Batch", "LossOutput", "Method", "NoOptions", "get_method", "method_names", "register_method"]
