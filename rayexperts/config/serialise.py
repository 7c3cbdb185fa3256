"""A resolved config as plain data: a dict, YAML, dotted keys, the settings that can change a result.
(Back from a dict: :func:`rayexperts.config.composition.from_dict`.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rayexperts.config.layers import flatten_mapping
from rayexperts.config.schema import WRITTEN_BY_LOADER, is_result_key


def result_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys of ``cfg`` (a config or a flat or nested mapping) that can change a result, sorted."""
    flat = flatten(cfg)
    return {k: flat[k] for k in sorted(flat) if is_result_key(k)}


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without what the loader writes about it (``layers``, ``sources``): the settings."""
    return {k: v for k, v in to_dict(cfg).items() if k not in WRITTEN_BY_LOADER}


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted-key view of a config, e.g. for DataFrame columns."""
    d = to_dict(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    return flatten_mapping(d)
