"""Training-step throughput: plain PyTorch vs Ray Train (1 worker) vs Ray Train (N workers)
(``jobs/bench_throughput.py``).

The same :class:`~rayexperts.engine.run.Run` (model, loss, data pipeline: ``data.cache`` picks the
per-image loader or the device path) is timed each way, so the difference is what Ray adds.
Images/s counts all workers' images.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from omegaconf import DictConfig

from rayexperts.config import with_overrides
from rayexperts.diagnostics.runs import Steps
from rayexperts.engine.entry import start_worker
from rayexperts.engine.loop import seed_epoch, train_one_epoch
from rayexperts.engine.run import Run
from rayexperts.launch.cluster import ship_plugins
from rayexperts.launch.torch_trainer import worker_resources


def time_steps(run: Run, warmup: int, steps: int) -> float:
    """Images/s of ``steps`` training steps of this worker, after ``warmup`` untimed steps."""
    seed_epoch(run, 0)
    train_one_epoch(run.method, run.model, run.optimizer, Steps(run.train_loader, warmup), 0, run.lr_at, run.opts)
    seed_epoch(run, 1)
    start = time.perf_counter()
    train_one_epoch(run.method, run.model, run.optimizer, Steps(run.train_loader, steps), 1, run.lr_at, run.opts)
    elapsed = time.perf_counter() - start
    return steps * (int(run.cfg.train.batch_size) // run.world) / elapsed


def time_pipeline(run: Run, warmup: int, steps: int) -> float:
    """Seconds per batch of the training data pipeline alone (sampling, decoding, augmentation, every view
    the method asks for; no model): with :func:`time_steps`, the pipeline's share of a step."""
    seed_epoch(run, 0)
    batches = iter(Steps(run.train_loader, warmup + steps))
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    n = sum(1 for _ in batches)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return (time.perf_counter() - start) / n


def plain_run(cfg: DictConfig, threads: int) -> Run:
    """One :class:`Run` in this process (no Ray), compiled if ``train.compile`` says so."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    run = Run(cfg, 0, 1, device)
    run.compile()
    return run


def _bench_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    run = start_worker(loop_config)
    ips = time_steps(run, int(loop_config["warmup"]), int(loop_config["steps"]))
    total = torch.tensor([ips], dtype=torch.float64)
    if run.world > 1:
        torch.distributed.all_reduce(total)
    metrics = {"images_per_sec": float(total.item())}
    # Ray Train V2 keeps a result's metrics only with a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as d:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if run.rank == 0 else None)


def through_ray(cfg: DictConfig, warmup: int, steps: int, workers: int, storage: str) -> tuple[float, float]:
    """(images/s of the timed steps, wall seconds of the whole ``fit()`` incl. start-up)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = with_overrides(cfg, {"scaling.num_workers": workers, "scaling.cpus_per_worker": 0})
    cpus, gpus, threads = worker_resources(cfg)
    trainer = TorchTrainer(
        _bench_worker,
        train_loop_config={"config": cfg, "threads": threads, "plugins": ship_plugins(), "warmup": warmup,
                           "steps": steps},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=bool(cfg.scaling.use_gpu),
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage),
    )
    start = time.perf_counter()
    result = trainer.fit()
    return float(result.metrics["images_per_sec"]), time.perf_counter() - start
