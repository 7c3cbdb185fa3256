"""One training run of any method on Ray Train.

    python jobs/train.py [--config PRESET_OR_YAML] [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.run_job("rayexperts.launch.train"))
