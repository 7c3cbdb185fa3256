"""CBD / CBD_ENS: K teachers in parallel on Ray, then the class-balanced student.

    python jobs/cbd_ens.py [--config PRESET_OR_YAML] [key=value ...]

With no arguments: the embedded demo on digits-lt (preset ``cbd_digits``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.run_job("rayexperts.launch.ensemble"))
