"""Small helpers shared by tests (importable as ``helpers``)."""

from __future__ import annotations

from pathlib import Path

# The short CBD demo job every CBD test and the cluster test run (dotted overrides of preset cbd_digits):
# two teachers of 10 epochs at once, then a 1-epoch student.
CBD_TEACHERS = "[{type: standard, seed: 0}, {type: data_aug, seed: 1}]"
CBD_JOB = ["train.epochs=1", "cbd.teacher_epochs=10", "cbd.teacher_cpus=1", f"cbd.teachers={CBD_TEACHERS}",
           "run.name=job"]
VOLATILE = ("timestamp", "images_per_sec", "train_seconds")  # metrics columns that measure time


def quick_overrides(tmp_path: Path, name: str, **extra) -> list[str]:
    """Overrides for a few-second digits-lt run."""
    base = {
        "run.storage_path": str(tmp_path / "runs"),
        "run.name": name,
        "train.epochs": 2,
        "train.batch_size": 64,
        "run.verbose": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def metrics_without_time(run_dir: Path):
    """A run's metrics.parquet without the columns that measure time, in (epoch, view) order."""
    import pandas as pd

    df = pd.read_parquet(Path(run_dir) / "metrics.parquet")
    return df.drop(columns=[c for c in VOLATILE if c in df]).sort_values(["epoch", "view"], ignore_index=True)
