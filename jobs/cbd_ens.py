"""CBD / CBD_ENS: K teachers in parallel on Ray, then the class-balanced student.

    python jobs/cbd_ens.py [--config PRESET_OR_YAML] [--print-config] [key=value ...]

With no arguments: the embedded demo on digits-lt (preset cbd_digits). On a cluster:
    ray job submit --working-dir . -- python jobs/cbd_ens.py --config cbd_cifar100_lt_if100 \
        data.root=/shared/cifar-100-python run.storage_path=/shared/runs
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("cbd"))
