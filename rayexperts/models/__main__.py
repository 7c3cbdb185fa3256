"""``python -m rayexperts.models summary [--config PRESET_OR_YAML] [key=value ...]``: the model a config
builds (its method assembles it): parameters per part, ``total parameters: N``, multiply-accumulates per
image. Compare a model with a paper's this way. Bad input prints ``error: ...`` and exits 2."""

from __future__ import annotations

import argparse
import sys

from rayexperts.config import load_config
from rayexperts.registry import DATASETS, METHODS


def build(cfg):
    """``(model, input shape)`` of ``cfg``: the class count from the data set's registration, or from the
    data when it has none (imagefolder, parquet)."""
    import torch

    entry = DATASETS.get(cfg.data.name)
    num_classes, in_channels = entry.num_classes, entry.in_channels
    if num_classes is None:
        data = entry.build(cfg.data)
        num_classes, in_channels = data.num_classes, data.in_channels
    method = METHODS.get(cfg.method)(cfg, torch.ones(num_classes), in_channels)
    torch.manual_seed(cfg.seed)
    size = int(cfg.data.image_size)
    return method.build_model(), (in_channels, size, size)


def main(argv: list[str] | None = None, prog: str = "python -m rayexperts.models") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="The model a config builds: parameters per part, the "
                                     "total, and multiply-accumulates per image (compare a model with a paper's).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="parameters per part and multiply-accumulates of the model a config builds")
    p.add_argument("--config", help="a shipped preset name or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted config keys, e.g. method=mllt data.name=cifar100-lt")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from rayexperts.models.summary import describe_model, summary_text

    model, shape = build(cfg)
    print(summary_text(model, shape, describe_model(cfg)))
    return 0


if __name__ == "__main__":  # `rayexperts models ...`: rayexperts.cli.main maps errors to exit statuses
    import runpy

    sys.argv[1:1] = ["models"]
    runpy.run_module("rayexperts.cli", run_name="__main__")
