"""A Ray Tune sweep whose trials are training runs (Ray Train inside Tune).

    python jobs/sweep.py --space tune_spaces/ncl.yaml [--config PRESET_OR_YAML] [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("sweep"))
