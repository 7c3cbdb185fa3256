"""The CIFAR-10-LT IF 100 paper rows (CE, LDAM-DRW, NCL, BalPoE) on a GPU under a time budget, each beside the
catalogue's number, without Ray (docs/gpu.md "Paper rows on a lent GPU"; the logic: rayexperts/launch/rows.py).

    PYTHONPATH=. python jobs/gpu_rows.py --out runs/gpu_rows --data ../shared/data/cifar10-jpeg.parquet --budget 540
    python jobs/gpu_rows.py --cpu --epochs 2 --rows cifar10_lt_if100_ce model.backbone=resnet8   # a CPU rehearsal
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("gpu-rows"))
