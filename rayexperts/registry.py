"""One registry mechanism for methods, data sets and backbones, and the plugins that add to them.

A :class:`Registry` maps a name (the value of a config key: ``method``, ``data.name``,
``model.backbone``) to what implements it. Built-in entries live in modules that register
themselves when imported; the registry knows those modules by name only and imports one on the
first lookup that needs it, so looking up a data set never imports torch's model code. Built-in
methods are found by reading ``rayexperts/methods/*.py`` for ``@register_method("name")``: a new
method module needs no entry anywhere else.

Plugins (docs/development.md "Plugins"): a package names a module in the entry-point group
``rayexperts.plugins``, or a config names modules in ``run.plugins``; :func:`load_plugins` imports
them (once per process) before a config is resolved, in the driver and in every Ray actor, Train
worker and Tune trial. A plugin registers as a built-in does::

    from rayexperts.methods.base import LossOutput, Method, register_method

    @register_method("my_method")
    class MyMethod(Method): ...
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from rayexperts.errors import ConfigError

T = TypeVar("T")

ENTRY_POINT_GROUP = "rayexperts.plugins"
_PACKAGE = Path(__file__).resolve().parent


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
    module that registers it (imported on first lookup), or is a function giving that map
    (called on first need). With ``sets_name``, :meth:`register` also sets the object's ``name``
    (a method's name is its config section)."""

    def __init__(self, kind: str, key: str, builtins: Mapping[str, str] | Callable[[], Mapping[str, str]],
                 default: str = "", *, sets_name: bool = False) -> None:
        self.kind, self.key, self.default, self.sets_name = kind, key, default, sets_name
        self._find_builtins = builtins if callable(builtins) else None
        self._builtin_map: dict[str, str] | None = None if callable(builtins) else dict(builtins)
        self._entries: dict[str, T] = {}
        self._plugins: set[str] = set()
        self._origins: dict[str, str] = {}

    @property
    def _builtins(self) -> dict[str, str]:
        if self._builtin_map is None:
            self._builtin_map = dict(self._find_builtins())  # type: ignore[misc]
        return self._builtin_map

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``@REGISTRY.register("name")`` on a class or function, or ``register("name", obj)``.
        A built-in name cannot be taken by anything but its built-in module."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} registers under a non-empty name: register({name!r}, ...)")

        def add(target: T) -> T:
            if name in self._builtins and name not in self._entries:
                importlib.import_module(self._builtins[name])  # returns at once while that module is importing
            if name in self._entries and self._entries[name] is not target:
                raise ConfigError(f"{self.kind} name {name!r} is already registered ({self._entries[name]!r})")
            if self.sets_name:
                target.name = name  # type: ignore[attr-defined]
            self._entries[name] = target
            if name in self._builtins:
                self._origins[name] = f"built-in {self._builtins[name]}"
            else:
                self._plugins.add(name)
                module = str(getattr(target, "__module__", "") or "")
                self._origins[name] = _loading[-1] if _loading else f"script {module or '?'}"
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

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``built-in <module>``, ``plugin <package> (<module>)``,
        ``plugin <module>`` (``run.plugins``) or ``script <module>`` (registered by the calling code)."""
        self.get(name)
        return self._origins[str(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._entries

    def load_all(self) -> dict[str, T]:
        """Every entry, importing every built-in module."""
        return {name: self.get(name) for name in self.names()}

    def plugins(self) -> dict[str, T]:
        """Entries registered from outside the built-in modules."""
        return {name: self._entries[name] for name in sorted(self._plugins)}

    def shipped(self, modules: Iterable[str] = ()) -> dict[str, T]:
        """Plugins that no plugin module (none of ``modules``) registers, i.e. defined by the calling script:
        what travels to Ray workers as objects; a plugin module's entries are registered there by importing it."""
        skip = set(modules)
        return {name: obj for name, obj in self.plugins().items()
                if self._origins[name].startswith("script ") and getattr(obj, "__module__", None) not in skip}

    def add_plugins(self, entries: Mapping[str, T]) -> None:
        """Register entries that :meth:`shipped` gave in another process."""
        for name, obj in entries.items():
            if self._entries.get(name) is not obj:
                self.register(name, obj)


def builtin_methods() -> dict[str, str]:
    """Each built-in method name → its module, read (not imported) from ``rayexperts/methods/*.py``:
    every ``@register_method("name")`` line."""
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules([str(_PACKAGE / "methods")]):
        text = (_PACKAGE / "methods" / f"{info.name}.py").read_text(encoding="utf-8")
        for name in re.findall(r"^@register_method\(\s*[\"']([^\"']+)[\"']", text, flags=re.MULTILINE):
            found[name] = f"rayexperts.methods.{info.name}"
    return found


METHODS: Registry[Any] = Registry("method", "method", builtin_methods, default="ce", sets_name=True)
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


REGISTRIES = (METHODS, DATASETS, BACKBONES)

_loading: list[str] = []  # the plugin being imported (what a registration's origin names)
_loaded: dict[str, str] = {}  # plugin module → its origin, in this process
_entry_points_loaded = False


def _import_plugin(module: str, origin: str, how: str) -> None:
    if module in _loaded:
        return
    _loading.append(origin)
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of a plugin's import is the same one-line error
        why = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"plugin {module!r} ({how}) failed to import: {type(e).__name__}: {why}") from e
    finally:
        _loading.pop()
    _loaded[module] = origin


def _any_entry_points() -> bool:
    """Whether any distribution on ``sys.path`` mentions the group (a scan of a few ms; importing
    ``importlib.metadata`` and reading every distribution costs about ten times that)."""
    for entry in sys.path:
        try:
            found = os.scandir(entry or ".")
        except OSError:
            continue
        with found:
            for d in found:
                if d.name.endswith((".dist-info", ".egg-info")):
                    try:
                        with open(os.path.join(d.path, "entry_points.txt"), encoding="utf-8") as f:
                            if ENTRY_POINT_GROUP in f.read():
                                return True
                    except OSError:
                        continue
    return False


def load_plugins(modules: Sequence[str] = (), shipped: Mapping[str, Any] | None = None) -> None:
    """Register the plugins in this process: every module of the entry-point group
    ``rayexperts.plugins`` (installed packages), the ``modules`` a config names (``run.plugins``),
    and what another process :func:`ship`-ped (its plugin modules, imported here, and the entries
    its own script registered). Each module is imported once per process; one that fails is a
    :class:`ConfigError` naming it. Every process entry calls this before it resolves a config."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True  # once per process, found or not
        eps: Iterable[Any] = ()
        if _any_entry_points():
            import importlib.metadata

            eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: e.name):
            package = ep.dist.name if ep.dist is not None else ep.name
            _import_plugin(ep.module, f"plugin {package} ({ep.module})",
                           f"entry point {ep.name!r} of package {package}, group {ENTRY_POINT_GROUP}")
    for module in modules or ():
        _import_plugin(str(module), f"plugin {module}", "run.plugins")
    if shipped:
        for module, origin in (shipped.get("modules") or {}).items():
            _import_plugin(module, origin, "a plugin of the driver: install its package on every node or ship it "
                                           "with the runtime environment's py_modules")
        entries = shipped.get("entries") or {}
        for r in REGISTRIES:
            r.add_plugins(entries.get(r.key, {}))


def ship() -> dict[str, Any]:
    """What a Ray worker needs to register this process's plugins with :func:`load_plugins`: the plugin
    modules loaded here (each imported there) and the entries the calling script registered itself."""
    return {"modules": dict(_loaded), "entries": {r.key: r.shipped(_loaded) for r in REGISTRIES}}
