"""``build_dataset(cfg.data)``: the data set named by ``data.name`` (``rayexperts.registry.DATASETS``;
docs/results.md names). A data set registers a :class:`~rayexperts.data.lt_dataset.DataSetEntry`:
its builder and its defaults (a config layer)."""

from __future__ import annotations

from rayexperts.data.lt_dataset import LTDataset
from rayexperts.registry import DATASETS


def build_dataset(data_cfg) -> LTDataset:
    """The :class:`LTDataset` named by ``data_cfg.name`` (``cfg.data``: the ``DataSection`` keys)."""
    return DATASETS.get(str(data_cfg.name)).build(data_cfg)


__all__ = ["DATASETS", "build_dataset"]
