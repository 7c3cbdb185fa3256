"""Local paths and URIs in a config: local paths made absolute in the driver, where the user typed them."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rayexperts.registry import METHODS


def is_uri(value: str) -> bool:
    """``s3://...``, ``gs://...``: storage that is not a local path."""
    return "://" in value


def absolute_path_or_uri(value: str) -> str:
    """A local path made absolute (``~`` expanded) against the working directory; a URI unchanged."""
    return value if is_uri(value) else os.path.abspath(os.path.expanduser(value))


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Local paths made absolute against the driver's working directory.

    Ray workers and Tune trials do not share the driver's working directory (Tune runs each
    trial in its own), so a relative ``data.root=../data/x.parquet`` must be resolved where the
    user typed it. This covers ``data.root``, ``run.storage_path``, the method's path keys
    (``path_keys``, e.g. teacher run directories) and the split files (``data.*_split``) that exist
    relative to the working directory; a split file that does not is left as given, to be looked
    up under ``data.root``. URIs stay unchanged.
    """
    if cfg.data.root:
        cfg.data.root = absolute_path_or_uri(str(cfg.data.root))
    for key in ("train_split", "val_split", "test_split"):
        value = cfg.data[key]
        if value and not is_uri(str(value)) and Path(str(value)).expanduser().is_file():
            cfg.data[key] = absolute_path_or_uri(str(value))
    cfg.run.storage_path = absolute_path_or_uri(str(cfg.run.storage_path))
    if cfg.model.weights:  # read by the Ray workers, whose working directory is not the user's
        cfg.model.weights = absolute_path_or_uri(str(cfg.model.weights))
    for key in getattr(METHODS.get(cfg.method), "path_keys", ()):
        value = OmegaConf.select(cfg, key)
        new = [absolute_path_or_uri(str(v)) for v in value] if isinstance(value, ListConfig) else (
            absolute_path_or_uri(str(value)) if value else value)
        OmegaConf.update(cfg, key, new, merge=False)
    return cfg
