"""Our run beside the authors' code run on the same data: per-epoch test top-1 of both, last and best, shot groups
and per-class accuracy at the end; compare.md, compare.png, compare.parquet (docs/compare.md).

    python jobs/compare_official.py --code CHECKOUT --ours RUN_DIR --log THEIR_LOG [--out DIR] [--view expert0]
        [--one-step]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("compare-official"))
