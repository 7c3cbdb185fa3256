"""One training run of any method: one worker in a Ray actor, several workers through Ray Train's TorchTrainer;
a method whose runs must finish first (CBD's teachers, RIDE's experts for its router) trains them first.

    python jobs/train.py [--config PRESET_OR_YAML] [--print-config] [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("train"))
