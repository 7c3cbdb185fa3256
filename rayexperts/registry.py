"""One registry mechanism for methods, data sets and backbones.

A :class:`Registry` maps a name (the value of a config key: ``method``, ``data.name``,
``model.backbone``) to what implements it. Built-in entries live in modules that register
themselves with a decorator when imported; the registry knows those modules by name only and
imports one on the first lookup that needs it, so looking up a data set never imports torch's
model code. Outside code registers the same way::

    from rayexperts.registry import METHODS

    @METHODS.register("my_method")
    class MyMethod(Method): ...

Entries registered outside the built-in modules travel to Ray workers with each run
(:meth:`Registry.plugins` / :meth:`Registry.add_plugins`), so a method defined in a user's
script trains on every worker.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from rayexperts.errors import ConfigError

T = TypeVar("T")


def did_you_mean(value: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """``"; did you mean a, b?"`` for the closest ``choices`` to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), sorted(set(choices)), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(close)}?" if close else ""


def unknown_choice(kind: str, key: str, value: Any, choices: Iterable[str]) -> str:
    """The one message for a value that is not among ``choices``: names the key, the value,
    the closest choices and all of them."""
    choices = sorted(set(choices))
    return f"unknown {kind} {key}={value!r}{did_you_mean(str(value), choices)} (choose one of {', '.join(choices)})"


class Registry(Generic[T]):
    """Name → object, filled by :meth:`register`; ``builtins`` maps each built-in name to the
    module that registers it (imported on first lookup)."""

    def __init__(self, kind: str, key: str, builtins: Mapping[str, str], default: str = "") -> None:
        self.kind, self.key, self.default = kind, key, default
        self._builtins = dict(builtins)
        self._entries: dict[str, T] = {}
        self._plugins: set[str] = set()

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``@REGISTRY.register("name")`` on a class or function, or ``register("name", obj)``.
        A built-in name cannot be taken by anything but its built-in module."""

        def add(target: T) -> T:
            if name in self._builtins and name not in self._entries:
                importlib.import_module(self._builtins[name])  # returns at once while that module is importing
            if name in self._entries and self._entries[name] is not target:
                raise ConfigError(f"{self.kind} name {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = target
            if name not in self._builtins:
                self._plugins.add(name)
            return target

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name is a :class:`ConfigError` naming the key and the choices."""
        name = str(name)
        if name not in self._entries and name in self._builtins:
            importlib.import_module(self._builtins[name])
        if name not in self._entries:
            raise ConfigError(unknown_choice(self.kind, self.key, name, self.names()))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(set(self._builtins) | set(self._entries))

    def builtin_names(self) -> list[str]:
        """The entries this package ships (without plugins registered at run time)."""
        return sorted(self._builtins)

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._entries

    def load_all(self) -> dict[str, T]:
        """Every entry, importing every built-in module."""
        return {name: self.get(name) for name in self.names()}

    def plugins(self) -> dict[str, T]:
        """Entries registered from outside the built-in modules (they travel to Ray workers)."""
        return {name: self._entries[name] for name in sorted(self._plugins)}

    def add_plugins(self, entries: Mapping[str, T]) -> None:
        """Register entries that :meth:`plugins` gave in another process."""
        for name, obj in entries.items():
            if self._entries.get(name) is not obj:
                self.register(name, obj)


METHODS: Registry[Any] = Registry("method", "method", {
    "ce": "rayexperts.methods.ce",
    "bsce": "rayexperts.methods.bsce",
    "mllt": "rayexperts.methods.mllt",
    "ncl": "rayexperts.methods.ncl",
    "ecl": "rayexperts.methods.ecl",
    "cbd": "rayexperts.methods.cbd",
    "ldam_drw": "rayexperts.methods.ldam_drw",
    "ride": "rayexperts.methods.ride",
    "ride_ea": "rayexperts.methods.ride",
    "sade": "rayexperts.methods.sade",
    "balpoe": "rayexperts.methods.balpoe",
}, default="ce")
DATASETS: Registry[Any] = Registry("data set", "data.name", {
    "digits-lt": "rayexperts.data.digits",
    "cifar10-lt": "rayexperts.data.cifar",
    "cifar100-lt": "rayexperts.data.cifar",
    "imagenet-lt": "rayexperts.data.split_files",
    "places-lt": "rayexperts.data.split_files",
    "inat2018": "rayexperts.data.split_files",
    "imagefolder": "rayexperts.data.folders",
    "parquet": "rayexperts.data.parquet",
}, default="digits-lt")
BACKBONES: Registry[Any] = Registry("backbone", "model.backbone", {
    "resnet8": "rayexperts.models.resnet_cifar",
    "resnet20": "rayexperts.models.resnet_cifar",
    "resnet32": "rayexperts.models.resnet_cifar",
    "digitsnet": "rayexperts.models.resnet_cifar",
    "resnet50": "rayexperts.models.backbones",
    "resnext50_32x4d": "rayexperts.models.backbones",
    "resnet152": "rayexperts.models.backbones",
}, default="digitsnet")


def plugins() -> dict[str, dict[str, Any]]:
    """Every registry's plugins, keyed by registry (what a Ray worker needs to re-register)."""
    return {r.key: r.plugins() for r in (METHODS, DATASETS, BACKBONES)}


def add_plugins(found: Mapping[str, Mapping[str, Any]]) -> None:
    for r in (METHODS, DATASETS, BACKBONES):
        r.add_plugins(found.get(r.key, {}))
