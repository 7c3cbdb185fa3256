"""``python -m rayexperts.eval probes RUN_DIR [--probes a,b] [--device cpu]`` (``rayexperts probes``, whose parser
is in rayexperts/cli.py): representation probes of a finished run (docs/methods.md "Evaluation every run should be
able to report")."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rayexperts.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def _format(df: pd.DataFrame) -> str:
    """The accuracy probes (top-1 in %), then the ECL feature distances; empty cells as '-'."""
    import pandas as pd

    dist = df["probe"] == "feature_distance"
    parts = []
    for rows, prefix, fmt in ((df[~dist], "top1", "{:.2f}"), (df[dist], "distance", "{:.4f}")):
        if rows.empty:
            continue
        cols = ["probe", "expert"] + [c for c in df.columns if c.startswith(prefix)] + ["note"]
        shown = rows[cols].copy()
        for c in cols[2:-1]:
            scale = 100 if prefix == "top1" else 1
            shown[c] = shown[c].map(lambda x: "-" if pd.isna(x) else fmt.format(scale * x))
        parts.append(shown.to_string(index=False))
    return "\n\n".join(parts)


def main(args: argparse.Namespace) -> int:
    """The probes once their arguments are parsed (:func:`rayexperts.cli.probes`); bad input raises
    :class:`~rayexperts.errors.InputError` (:class:`~rayexperts.eval.probes.ProbeError`)."""
    if not Path(args.run_dir).is_dir():  # fail before importing torch (load_run checks again)
        raise InputError(f"run directory {args.run_dir} does not exist")
    from rayexperts.eval.probes import PROBES, ProbeOptions, run_probes

    opts = ProbeOptions(tau=args.tau, tau_on_val=args.tau_on_val)
    for name in ("feature_accuracy", "crt", "lws"):
        epochs = getattr(args, f"{name}_epochs")
        if epochs is not None:
            opts = replace(opts, **{name: replace(getattr(opts, name), epochs=epochs)})
    probes = [p.strip() for p in args.probes.split(",") if p.strip()] if args.probes else PROBES
    df = run_probes(args.run_dir, probes, args.device, opts)
    print(_format(df))
    print(f"\nwritten to {args.run_dir.rstrip('/')}/probes.parquet")
    return 0


if __name__ == "__main__":  # `rayexperts probes ...`: rayexperts.cli.main maps errors to exit statuses
    import runpy

    sys.argv[1:] = ["probes", *(sys.argv[2:] if sys.argv[1:2] == ["probes"] else sys.argv[1:])]
    runpy.run_module("rayexperts.cli", run_name="__main__")
