"""Composing a config from its layers: defaults → data set → method → preset/YAML (→ ``compat=official``)
→ ``key=value`` overrides; ``explain`` (``--print-config``: each value with its layer); copies with overrides;
a resolved dict back to a typed config."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rayexperts.config.layers import Layer, flatten_mapping, nest, provenance, setting
from rayexperts.config.official import OfficialValue, method_official, official_sources, official_values
from rayexperts.config.paths import absolute_paths
from rayexperts.config.presets import file_layers
from rayexperts.config.schema import (WRITTEN_BY_LOADER, Config, DataSection, ModelSection, schema, unknown_key_error,
                                      valid_keys)
from rayexperts.config.serialise import flatten, settings
from rayexperts.config.validation import registry_message, validate
from rayexperts.errors import ConfigError
from rayexperts.registry import DATASETS, METHODS, load_plugins


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "model.num_experts=3"]`` → ``{"train.lr": 0.1, ...}`` (YAML-typed values)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def method_layers(method: str, compat: str = "paper") -> list[Layer]:
    """The method's defaults layer, and with ``compat=official`` the authors'-code values it declares."""
    m = METHODS.get(method)
    layers: list[Layer] = [(f"method {method} defaults", dict(getattr(m, "defaults", {})))]
    if compat == "official":
        values = {k: v.value for k, v in method_official(method).items()}
        layers.append((f"compat official ({method})", {"compat": "official", **values}))
    return layers


def default_layers(method: str, data_name: str) -> list[Layer]:
    """The data set's and the method's default layers, in merge order."""
    data_set = DATASETS.get(data_name)
    return [(f"data set {data_name} defaults", dict(getattr(data_set, "defaults", {}))), *method_layers(method)]


def model_layers(layers: Sequence[Layer]) -> list[Layer]:
    """A timm backbone's input size as a layer after the data set's defaults (docs/pretrained.md "Preprocessing"):
    ``data.image_size`` follows the model unless a later layer (a method's defaults, a preset, the command line)
    sets it. The size is ``model.timm_kwargs.img_size`` (the model is built at it), else the ``input_size`` of
    ``model.timm_kwargs.pretrained_cfg_overlay``, else that of the model's pretrained config in timm. No layer for
    other backbones, a name timm lacks (the backbone check refuses it) or a size that is not square."""
    backbone, _ = setting(layers, "model.backbone", ModelSection.backbone)
    if not str(backbone).startswith("timm/"):
        return []
    size, _ = setting(layers, "model.timm_kwargs.img_size", None)
    if size is None:
        overlay, _ = setting(layers, "model.timm_kwargs.pretrained_cfg_overlay.input_size", None)
        if overlay is None:
            # timm (and torch) only for a timm backbone: other configs resolve without torch
            from timm.models import get_pretrained_cfg

            pretrained = get_pretrained_cfg(str(backbone)[len("timm/"):])
            overlay = pretrained.input_size if pretrained is not None else None
        size = list(overlay)[-2:] if overlay is not None else None
    try:
        sides = {int(v) for v in size} if isinstance(size, (list, tuple, ListConfig)) else {int(size)}
    except (TypeError, ValueError):  # no size, or one timm will refuse itself
        return []
    if len(sides) != 1 or min(sides) < 1:
        return []
    return [(f"model {backbone} input size", {"data": {"image_size": sides.pop()}})]


def _yaml_switches(cfg: DictConfig, flat: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``on``/``off`` (and ``yes``/``no``) as booleans: for a choice that offers ``on``/``off``
    (``data.cache=off``, ``train.compile=on``), a boolean means that choice."""
    out = dict(flat)
    for key, value in flat.items():
        if isinstance(value, bool):
            node = OmegaConf.select(cfg, key.rsplit(".", 1)[0]) if "." in key else cfg
            choices = getattr(getattr(node, "_get_node", lambda _: None)(key.rsplit(".", 1)[-1]), "_metadata", None)
            allowed = getattr(getattr(choices, "ref_type", None), "__args__", ())
            word = "on" if value else "off"
            if word in allowed:
                out[key] = word
    return out


_FREE_DICTS = ("model.timm_kwargs.",)  # dict keys whose entries are any names (timm.create_model's kwargs)


def _merge(cfg: DictConfig, layer: Mapping[str, Any], source: str, keys: set[str], method: str) -> DictConfig:
    flat = flatten_mapping(layer)
    for key in flat:
        if key.split(".")[0] in WRITTEN_BY_LOADER:
            raise ConfigError(f"'{key}' in {source}: it is written by the config loader, not set")
        if key not in keys and not key.startswith(_FREE_DICTS):
            raise unknown_key_error(key, source, sorted(keys), method)
    flat = _yaml_switches(cfg, flat)
    if "model" in cfg and "timm_kwargs" in cfg.model:
        OmegaConf.set_struct(cfg.model.timm_kwargs, False)  # its entries are timm's, not this schema's
    try:
        return OmegaConf.merge(cfg, nest(flat))  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {e.msg}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: invalid value for '{key}': {msg}") from e


def compose(layers: Sequence[Layer], *, resolve_paths: bool = True) -> DictConfig:
    """Merge ``layers`` (in order) onto the schema of the method they name; validate; record them."""
    method, where = setting(layers, "method", Config.method)
    if str(method) not in METHODS:
        raise ConfigError(f"{where}: " + registry_message(METHODS, str(method)))
    cfg = schema(str(method))
    keys = set(valid_keys(cfg))
    for source, layer in layers:
        cfg = _merge(cfg, layer, source, keys, str(method))
    validate(cfg)
    if resolve_paths:
        absolute_paths(cfg)
    cfg.layers = [source for source, _ in layers]
    return cfg


def _plugin_modules(value: Any, where: str) -> list[str]:
    """``run.plugins`` as module names; anything else is a :class:`ConfigError` naming where it was set."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, ListConfig)) or not all(isinstance(m, str) and m for m in value):
        raise ConfigError(f"run.plugins={value!r} ({where}) must be a list of module names, e.g. "
                          "run.plugins=[my_package.methods]")
    return [str(m) for m in value]


def config_layers(
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> tuple[list[Layer], list[tuple[str, dict[str, OfficialValue]]]]:
    """The layers :func:`load_config` merges, in order, and the ``compat=official`` values among them."""
    user: list[Layer] = file_layers(str(config)) if config else []
    command: list[Layer] = []
    if overrides:
        flat = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
        if flat:
            command.append((f"command line ({', '.join(flat)})", nest(flat)))
    load_plugins(_plugin_modules(*setting([*user, *command], "run.plugins", [])))
    method, where = setting([*user, *command], "method", Config.method)
    data_name, data_where = setting([*user, *command], "data.name", DataSection.name)
    compat, _ = setting([*user, *command], "compat", Config.compat)
    if compat not in ("paper", "official"):
        raise ConfigError(f"invalid value {compat!r} for 'compat': choose paper or official")
    for registry, value, at in ((METHODS, method, where), (DATASETS, data_name, data_where)):
        if str(value) not in registry:
            raise ConfigError(f"{at}: " + registry_message(registry, str(value)))
    official = official_values(str(config) if config else None, str(method)) if compat == "official" else []
    compat_layers: list[Layer] = [(name, {"compat": "official", **{k: v.value for k, v in values.items()}})
                                  for name, values in official]
    data_defaults, *method_defaults = default_layers(str(method), str(data_name))
    later = [*method_defaults, *user, *compat_layers, *command]
    return [("defaults", {}), data_defaults, *model_layers([data_defaults, *later]), *later], official


def load_config(
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> DictConfig:
    """Resolve the full config: defaults → data set → method → preset/YAML (→ ``compat=official``: the
    method's and the preset's official recipe) → command-line overrides."""
    layers, official = config_layers(config, overrides)
    cfg = compose(layers)
    cfg.sources = official_sources(layers, official)
    return cfg


def explain(config: str | os.PathLike | None = None,
            overrides: Sequence[str] | Mapping[str, Any] | None = None) -> str:
    """The resolved config as YAML, every value with the layer that set it (``--print-config``): the typed
    defaults, the data set's or the method's defaults, a preset, ``compat=official`` (with the source of the
    authors' code) or the command line."""
    layers, official = config_layers(config, overrides)
    cfg = compose(layers)
    where = provenance(layers)
    sources = official_sources(layers, official)
    lines = []
    for key, value in flatten(settings(cfg)).items():
        note = where.get(key, "defaults")
        if key in sources:
            note += f"; {sources[key]}"
        import yaml

        shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"{key}: {shown}  # {note}")
    return "\n".join(lines)


def from_dict(d: Mapping[str, Any], source: str = "config dict") -> DictConfig:
    """Rebuild a typed config from a resolved dict (the worker's copy, or a config.yaml)."""
    d = dict(d)
    load_plugins(_plugin_modules((d.get("run") or {}).get("plugins") or [], source))
    layers = list(d.pop("layers", None) or [])
    sources = dict(d.pop("sources", None) or {})
    cfg = compose([(source, d)], resolve_paths=False)
    cfg.layers, cfg.sources = layers, sources
    return cfg


def with_overrides(cfg: DictConfig, flat: Mapping[str, Any], source: str = "overrides") -> DictConfig:
    """A copy of ``cfg`` with dotted ``flat`` overrides applied, checked and recorded in ``layers``.
    The method cannot change here (its section would): compose a new config for that."""
    if "method" in flat and flat["method"] != cfg.method:
        raise ConfigError(f"{source}: with_overrides cannot change the method ({cfg.method} → {flat['method']})")
    out = _merge(cfg, nest(dict(flat)), source, set(valid_keys(cfg)), str(cfg.method))
    validate(out)
    out.layers = [*cfg.layers, source]
    out.sources = {k: v for k, v in cfg.sources.items() if k not in flat}  # an overridden value has a new source
    return out
