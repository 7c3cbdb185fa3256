"""Config files: the shipped presets (``rayexperts/presets/*.yaml``) and the user's YAML files, each with
its ``base:`` chain (base first) and its ``official:`` block (read by :mod:`rayexperts.config.official`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rayexperts.config.layers import Layer
from rayexperts.config.schema import WRITTEN_BY_LOADER
from rayexperts.errors import ConfigError
from rayexperts.registry import did_you_mean


PRESET_DIR = Path(__file__).parent.parent / "presets"  # rayexperts/presets


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (``cifar10_lt_if100_ncl``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    shipped = PRESET_DIR / f"{p.stem if p.suffix else name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file '{name_or_path}' does not exist")
    if not PRESET_DIR.is_dir():
        raise ConfigError(
            f"preset '{name_or_path}': the presets folder {PRESET_DIR} is missing, so this rayexperts is incomplete "
            "(an upload that excluded it?)"
        )
    names = list_presets()
    hint = did_you_mean(name_or_path, names, cutoff=0.4) or f"; `rayexperts presets` lists the {len(names)} presets"
    raise ConfigError(f"no preset or YAML file named '{name_or_path}'{hint}")


def _layer_name(path: Path) -> str:
    """How a file layer is recorded: shipped presets by name (the same on every machine), other files by path."""
    try:
        path.resolve().relative_to(PRESET_DIR.resolve())
        return f"preset {path.stem}"
    except ValueError:
        return f"file {path.resolve()}"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML or interpolation errors
        raise ConfigError(f"cannot read config file '{path}': {e}") from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
    for written in WRITTEN_BY_LOADER:  # a resolved config.yaml's records of its own layers, not settings
        loaded.pop(written, None)
    return loaded


def file_layers(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[Layer]:
    """The layers of a preset or YAML file: its ``base:`` chain first, then the file itself (without its
    ``official:`` block, which :func:`rayexperts.config.official.official_values` reads)."""
    return [(source, settings) for source, settings, _ in preset_chain(name_or_path, _seen)]


def preset_chain(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(layer name, settings, official block) of a file and its ``base:`` chain, base first."""
    path = preset_path(str(name_or_path))
    source = _layer_name(path)
    if source in _seen:
        raise ConfigError(f"config file '{path}': 'base:' chain loops back to {source}")
    loaded = _read_file(path)
    base = loaded.pop("base", None)
    official = loaded.pop("official", None) or {}
    if not isinstance(official, dict):
        raise ConfigError(f"config file '{path}': 'official:' must map dotted keys to {{value, source, status}}")
    inherited = preset_chain(str(base), (*_seen, source)) if base else []
    return [*inherited, (source, loaded, official)]
