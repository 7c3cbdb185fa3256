"""Shared fixtures: one local Ray cluster per test session, the real CIFAR-10 file when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10_PARQUET = REPO.parent / "shared" / "data" / "cifar10-jpeg.parquet"


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster shared by every test that needs one (start-up costs 10–30 s)."""
    import ray

    from rayexperts.launch.cluster import start_local_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, dashboard=True)  # the Ray Train tests need its state API
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """In-process runs on one thread while it lasts: the 2 cores are shared with Ray's processes
    (oversubscribed threads ran ~10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cbd_job(ray_cluster, tmp_path_factory) -> tuple[Path, dict]:
    """The short CBD job (``helpers.CBD_JOB`` on preset cbd_digits), run once per session on the shared
    cluster: (its job directory, run_ensemble's result)."""
    from helpers import CBD_JOB

    from rayexperts.launch.ensemble import resolve_job_config, run_ensemble

    root = tmp_path_factory.mktemp("cbd_job")
    cfg = resolve_job_config(None, [*CBD_JOB, f"run.storage_path={root}", "run.verbose=false"])
    return root / "job", run_ensemble(cfg)


@pytest.fixture(scope="session")
def cifar10_parquet() -> Path:
    """The real CIFAR-10 file in ``../shared/data``. Skipped in a clone without it, but a failure where
    ``RAYEXPERTS_REQUIRE_SHARED_DATA=1`` (``.ci/run`` sets it when ``../shared`` is there)."""
    if not CIFAR10_PARQUET.exists():
        if os.environ.get("RAYEXPERTS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{CIFAR10_PARQUET} not present, and RAYEXPERTS_REQUIRE_SHARED_DATA=1 requires it")
        pytest.skip(f"{CIFAR10_PARQUET} not present")
    return CIFAR10_PARQUET
