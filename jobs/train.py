"""One training run of any method on Ray Train.

    python jobs/train.py [--config PRESET_OR_YAML] [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts  # noqa: E402

rayexperts.check_install_or_exit()  # an upload without the presets stops here, not halfway through a run
from rayexperts.launch.train import main  # noqa: E402
from rayexperts.trace import mark  # noqa: E402

if __name__ == "__main__":
    mark("imports done")
    code = main()
    mark("exit")
    sys.exit(code)
