"""A published table re-run as one Ray job, beside the paper's numbers.

    python jobs/reproduce.py (--paper P [--table T] | --catalog CSV) [--data-root DATASET=PATH ...] [--seeds N]
        [--dry-run] [--epochs-scale F] [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("reproduce"))
