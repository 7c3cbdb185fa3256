"""What only a job submitted with ``ray job submit`` needs checked (docs/cluster.md "Storage must be shared"):
its driver runs in a temporary copy of the working directory, which Ray deletes with the session.

Imports nothing of Ray: :func:`check_storage` runs in :func:`rayexperts.launch.train.preflight`, before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from rayexperts.config import ConfigError, absolute_path_or_uri, is_uri

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by the Ray job supervisor for a submitted job's driver


def in_ray_job() -> bool:
    """True in the driver of a job submitted with ``ray job submit``."""
    return RAY_JOB_ENV in os.environ


def check_storage(cfg: DictConfig) -> None:
    """In a Ray job, refuse a ``run.storage_path`` inside the job's working directory (where a relative path
    lands once the config made it absolute): Ray deletes that directory with the session."""
    storage = str(cfg.run.storage_path)
    if not in_ray_job() or is_uri(storage):
        return
    here = Path.cwd().resolve()
    path = Path(absolute_path_or_uri(storage)).resolve()
    if path == here or here in path.parents:
        raise ConfigError(
            f"run.storage_path={storage} is inside this Ray job's working directory {here} (a relative path lands "
            "there), which Ray deletes with the session. Give run.storage_path an absolute path on storage every "
            "node sees, or a URI (run.storage_path=/shared/runs, run.storage_path=s3://bucket/runs)"
        )
