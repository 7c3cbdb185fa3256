"""``python -m rayexperts.eval probes RUN_DIR [--probes a,b] [--device cpu]``: representation probes
of a finished run (docs/methods.md "Evaluation every run should be able to report")."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rayexperts.eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probes", help="feature accuracy, NCM, cRT, tau-norm, LWS and ECL feature distance")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with config.yaml and a checkpoint")
    p.add_argument("--probes", help="comma-separated subset of feature_accuracy,ncm,crt,tau_norm,lws,feature_distance"
                   " (default: all)")
    p.add_argument("--device", default="cpu", help="torch device for features and probes (default cpu)")
    p.add_argument("--tau", type=float, default=1.0, help="tau of tau_norm (default 1.0)")
    p.add_argument("--tau-on-val", action="store_true", help="pick tau in 0..2 on the val split when there is one")
    p.add_argument("--feature-accuracy-epochs", type=int, help="default 200 (MLLT)")
    p.add_argument("--crt-epochs", type=int, help="default 10")
    p.add_argument("--lws-epochs", type=int, help="default 10")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.run_dir).is_dir():  # fail before importing torch (load_run checks again)
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 2
    from rayexperts.eval.probes import PROBES, ProbeOptions, run_probes

    opts = ProbeOptions(tau=args.tau, tau_on_val=args.tau_on_val)
    for name in ("feature_accuracy", "crt", "lws"):
        epochs = getattr(args, f"{name}_epochs")
        if epochs is not None:
            opts = replace(opts, **{name: replace(getattr(opts, name), epochs=epochs)})
    probes = [p.strip() for p in args.probes.split(",") if p.strip()] if args.probes else PROBES
    try:
        df = run_probes(args.run_dir, probes, args.device, opts)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_format(df))
    print(f"\nwritten to {args.run_dir.rstrip('/')}/probes.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
