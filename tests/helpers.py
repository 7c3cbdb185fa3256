"""Small helpers shared by tests (importable as ``helpers``)."""

from __future__ import annotations

from pathlib import Path


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
