"""Config → Ray Train ``TorchTrainer``: one training run of any method.

Connects to a running cluster when there is one (``RAY_ADDRESS``, or inside ``ray job
submit``) and starts a local one otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rayexperts.config import ConfigError, load_config, to_dict, to_yaml
from rayexperts.engine.checkpoint import CheckpointMismatch, IDENTITY_KEYS
from rayexperts.engine.results import RunFiles, storage_uri


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` / the submitting job, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        start_local_ray(num_cpus)


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray instance whose processes can find its state API.

    The dashboard port is chosen here and exported as ``RAY_API_SERVER_ADDRESS`` before Ray
    starts, so every process of the instance inherits it. Without it, Ray Train's
    PlacementGroupCleaner (which frees a run's CPUs when its controller is killed, e.g. a trial
    that ASHA stops) fails whenever another Ray instance runs on the same machine, and the
    CPUs stay reserved.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, log_to_driver=True, dashboard_port=port)


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.method}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def worker_resources(cfg: DictConfig) -> tuple[float, float, int]:
    """(CPUs per worker, GPUs per worker, torch threads per worker).

    ``scaling.cpus_per_worker`` = 0 gives each worker an equal share of the cluster's CPUs,
    and every worker runs exactly that many torch threads (oversubscribed threads on shared
    cores made each process 5–7× slower here).
    """
    import ray

    cpus = float(cfg.scaling.cpus_per_worker)
    if cpus <= 0:
        total = ray.cluster_resources().get("CPU", 1)
        cpus = float(max(1, math.floor(total / cfg.scaling.num_workers)))
    gpus = float(cfg.scaling.gpus_per_worker) if cfg.scaling.use_gpu else 0.0
    return cpus, gpus, max(1, int(cpus))


def check_existing_run(files: RunFiles, cfg: DictConfig) -> bool:
    """True when ``files`` already holds a run; refuse one of another configuration."""
    if not files.exists("config.yaml"):
        return False
    old = OmegaConf.create(files.read_text("config.yaml"))
    diffs = [
        f"{k}: {OmegaConf.select(old, k)!r} there vs {OmegaConf.select(cfg, k)!r} now"
        for k in IDENTITY_KEYS
        if OmegaConf.select(old, k) != OmegaConf.select(cfg, k)
    ]
    if diffs:
        raise CheckpointMismatch(
            f"run directory {files.path} holds a run of another configuration ({'; '.join(diffs)}); "
            "choose another run.name or remove that directory"
        )
    return True


def build_trainer(cfg: DictConfig, callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` (run.name must be set)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayexperts.engine.worker import train_loop_per_worker

    # Worker prints go straight to stdout (Ray forwards them once) instead of through Train's logger.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    cpus, gpus, threads = worker_resources(cfg)
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "threads": threads},
        scaling_config=ScalingConfig(
            num_workers=int(cfg.scaling.num_workers),
            use_gpu=bool(cfg.scaling.use_gpu),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_uri(cfg.run.storage_path),
            failure_config=FailureConfig(max_failures=int(cfg.run.max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=int(cfg.run.num_to_keep)),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=str(cfg.run.ray_log_level)),
        ),
    )


def run_training(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``cfg`` through Ray Train; returns the run directory and the final metrics."""
    ensure_ray()
    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    files = RunFiles(cfg.run.storage_path, cfg.run.name)
    if check_existing_run(files, cfg):
        print(f"[rayexperts] {files.path} exists: resuming from its latest checkpoint if there is one", flush=True)
    files.write_text("config.yaml", to_yaml(cfg))
    result = build_trainer(cfg, callbacks).fit()
    if result.error is not None:
        raise result.error
    return {"path": files.path, "metrics": result.metrics, "checkpoint": result.checkpoint}


def final_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Many / Medium / Few / All top-1 (%) of every view at the last evaluated epoch."""
    last = metrics[metrics["epoch"] == metrics["epoch"].max()]
    cols = {"top1_many": "Many", "top1_medium": "Medium", "top1_few": "Few", "top1": "All"}
    table = last.set_index("view")[list(cols)].rename(columns=cols) * 100
    return table.round(2)


def parse_cli(argv: Sequence[str], prog: str, description: str) -> argparse.Namespace:
    """``[--config PRESET_OR_YAML] [key=value ...]``, shared by the jobs/ scripts."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="a shipped preset name or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. train.epochs=15 model.num_experts=3")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_cli(sys.argv[1:] if argv is None else argv, "jobs/train.py", "One training run on Ray Train.")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = run_training(cfg)
    except CheckpointMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = RunFiles(cfg.run.storage_path, cfg.run.name).read_table("metrics.parquet")
    print(f"\nrun directory: {out['path']}")
    if metrics is not None:
        print(final_table(metrics).to_string())
    return 0
