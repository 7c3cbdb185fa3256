"""Part F, two ranks on one GPU with gloo (GPU findings F9, F1): ncl with MoCo under DDP (``model.sync_bn=false``),
10 steps: identical parameters, key encoders, queues and buffers on both ranks, the mean over workers and the
evaluation sums reduced on CUDA tensors; and that the config refuses two ranks on a fractional GPU."""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch

from rayexperts.config import ConfigError, load_config, to_dict, validate
from rayexperts.diagnostics.runs import run_config

pytestmark = pytest.mark.gpu


def test_validate_refuses_two_ranks_on_a_fractional_gpu():
    with pytest.raises(ConfigError):
        validate(load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.5"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, out: str, device_type: str) -> None:
    """One of two DDP ranks on the same device, gloo (``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rayexperts.config import from_dict
    from rayexperts.diagnostics.runs import train_steps
    from rayexperts.engine.loop import evaluate_splits, mean_over_workers
    from rayexperts.engine.run import Run
    from rayexperts.rundir import unwrap

    torch.set_num_threads(2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        run = Run(from_dict(cfg_dict), rank, world, device)
        run.model = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
        mean = mean_over_workers(train_steps(run, 0, 10))
        accs = evaluate_splits(run)  # buffers broadcast, sums all-reduced on the device's tensors
        summary = accs[""].summary(run.method.primary_view, run.groups)
        state = {k: v.detach().cpu() for k, v in unwrap(run.model).state_dict().items()}
        torch.save({"state": state, "mean_loss": mean["loss"], "top1": summary["top1"],
                    "num_samples": summary["num_samples"], "test_size": len(run.data.test),
                    "sums_device": str(accs[""].kl_sum.device)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(setup) -> tuple[dict, dict]:
    import torch.multiprocessing as mp

    cfg = run_config(setup, "ncl", "model.sync_bn=false", "scaling.num_workers=2", "train.batch_size=128")
    out = Path(tempfile.mkdtemp(dir=setup.root))
    context = mp.spawn(_rank_main, args=(2, _free_port(), to_dict(cfg), str(out), setup.device.type), nprocs=2,
                       join=False)
    limit = max(10.0, setup.left())
    deadline = time.perf_counter() + limit
    while not context.join(timeout=max(0.1, min(5.0, deadline - time.perf_counter()))):
        if time.perf_counter() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the two ranks did not finish within the part's {limit:.0f} s")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    return r0, r1


def _diffs(ranks) -> dict[str, float]:
    r0, r1 = ranks
    return {k: float((v.double() - r1["state"][k].double()).abs().max()) if v.numel() else 0.0
            for k, v in r0["state"].items()}


def test_ddp_gloo_moco_queues_and_key_encoders_identical(ranks, note):
    moco = {k: d for k, d in _diffs(ranks).items() if "queue" in k or "key_" in k}
    note(tensors=len(moco), max_abs_diff=max(moco.values(), default=float("nan")))
    assert moco and max(moco.values()) == 0.0


def test_ddp_gloo_all_state_identical(ranks, note):
    diffs = _diffs(ranks)
    note(tensors=len(diffs), max_abs_diff=max(diffs.values()), worst=max(diffs, key=diffs.get))
    assert max(diffs.values()) == 0.0


def test_ddp_gloo_reductions(ranks, note):
    r0, r1 = ranks
    note(num_samples=r0["num_samples"], test_size=r0["test_size"], top1=r0["top1"], sums_on=r0["sums_device"])
    assert r0["num_samples"] == r0["test_size"] and r0["top1"] == r1["top1"] and r0["mean_loss"] == r1["mean_loss"]
