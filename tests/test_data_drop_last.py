"""data.drop_last: the epoch's last, partial batch kept as the authors' loaders keep it (issue 34)."""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter

import numpy as np
import pytest
import torch

from rayexperts.config import load_config, with_overrides
from rayexperts.data import EpochSampler
from rayexperts.data.imbalance import exponential_counts
from rayexperts.engine.loop import train_one_epoch
from rayexperts.engine.run import Run
from rayexperts.engine.loop import seed_epoch, train_epoch
from rayexperts.errors import ConfigError
from rayexperts.methods.base import Batch

LABELS = np.repeat(np.arange(4), [400, 100, 25, 4])  # n = 529


def _labels(counts) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_without_drop_last_the_ranks_split_every_global_batch_and_the_remainder(replicas):
    per_rank = 16
    samplers = [EpochSampler(LABELS, "instance", replicas, r, seed=2, drop_last=False) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(4)
    order = samplers[0].epoch_indices(4).tolist()
    global_batch = per_rank * replicas
    steps = math.ceil(529 / global_batch)
    assert {s.steps(per_rank) for s in samplers} == {steps}
    shares = [list(s) for s in samplers]
    assert sum(len(sh) for sh in shares) == 529  # no padding: every image once
    for step in range(steps):
        got = Counter(i for sh in shares for i in sh[step * per_rank:(step + 1) * per_rank])
        assert got == Counter(order[step * global_batch:(step + 1) * global_batch])
        assert samplers[0].global_batch(step, per_rank) == len(order[step * global_batch:(step + 1) * global_batch])


def test_loss_weights_of_a_last_batch_smaller_than_the_ranks():
    # 529 = 11 * 48 + 1: the last global batch has one image, on rank 0; ranks 1 and 2 have none
    samplers = [EpochSampler(LABELS, "instance", 3, r, drop_last=False) for r in range(3)]
    assert [len(s) for s in samplers] == [177, 176, 176]
    assert samplers[0].steps(16) == 12 and samplers[0].global_batch(11, 16) == 1
    assert [s.loss_weight(11, 16, n) for s, n in zip(samplers, (1, 0, 0))] == [3.0, 0.0, 0.0]
    assert samplers[1].loss_weight(3, 16, 16) == 1.0
    # 529 = 5 * 96 + 49 on 2 ranks at 48: 25 + 24 images, weights 2*25/49 and 2*24/49
    two = [EpochSampler(LABELS, "instance", 2, r, drop_last=False) for r in range(2)]
    assert [s.loss_weight(5, 48, n) for s, n in zip(two, (25, 24))] == [50 / 49, 48 / 49]
    # drop_last: as before, floor of the (padded) share
    assert EpochSampler(LABELS, "instance", 2, 0).steps(48) == 265 // 48


# The authors' loaders: epochs x iterations per epoch at the preset's batch under compat=official.
# LDAM-DRW (CE, LDAM-DRW presets), RIDE, SADE and BalPoE keep the last partial batch: ceil(N / B);
# Balanced Softmax breaks at int(N / B) (run_networks.py: epoch_steps) and NCL drops it: floor(N / B).
@pytest.mark.parametrize("preset, n, per_epoch, epochs", [
    ("cifar100_lt_if100_ce", 10847, 85, 200),
    ("cifar10_lt_if50_ce", 13996, 110, 200),
    ("cifar100_lt_if100_ldam_drw", 10847, 85, 200),
    ("cifar100_lt_if100_ride", 10847, 85, 200),
    ("cifar100_lt_if10_sade", 19573, 153, 200),
    ("cifar100_lt_if100_balpoe", 10847, 85, 200),
    ("cifar100_lt_if100_bsce", 10847, 21, 591),
    ("cifar100_lt_if50_bsce", 12608, 24, 520),
    ("cifar10_lt_if100_bsce", 12406, 24, 520),
    ("cifar10_lt_if50_bsce", 13996, 27, 465),
    ("cifar100_lt_if100_ncl", 10847, 169, 400),
])
def test_official_presets_run_the_codes_iterations(preset, n, per_epoch, epochs):
    cfg = load_config(preset, ["compat=official"])
    classes = 100 if cfg.data.name == "cifar100-lt" else 10
    counts = exponential_counts(500 if classes == 100 else 5000, classes, float(cfg.data.imbalance_factor))
    assert counts.sum() == n
    sampler = EpochSampler(_labels(counts), "instance", drop_last=bool(cfg.data.drop_last))
    assert sampler.steps(int(cfg.train.batch_size)) == per_epoch
    assert int(cfg.train.epochs) == epochs
    if cfg.method == "bsce":  # 13,000 iterations / ceil(N/512) batches = the code's epochs, each int(N/512) steps
        assert epochs == math.ceil(13000 / math.ceil(n / 512))
        assert epochs * per_epoch == epochs * (n // 512)
    # the same presets under compat=paper keep dropping the last batch (the default)
    assert load_config(preset).data.drop_last is True


def _count_steps(run: Run) -> list[int]:
    sizes: list[int] = []
    real = run.method.training_step

    def counting(model, batch):
        sizes.append(int(batch.targets.shape[0]))
        return real(model, batch)

    run.method.training_step = counting  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("cache", ["device", "off"])
def test_one_worker_trains_every_image_with_the_partial_batch(cache, one_torch_thread):
    cfg = load_config("digits_ce", ["run.verbose=false", "train.batch_size=64", "data.drop_last=false",
                                    f"data.cache={cache}"])
    run = Run(cfg)
    sizes = _count_steps(run)
    stats = train_epoch(run, 0)
    assert sizes == [64] * 9 + [9]  # 585 = 9 * 64 + 9
    assert math.isfinite(stats["loss"])
    kept = Run(with_overrides(cfg, {"data.drop_last": True}))
    dropped = _count_steps(kept)
    train_epoch(kept, 0)
    assert dropped == [64] * 9


def test_files_decoded_on_the_device_keep_the_partial_batch(tmp_path, one_torch_thread):
    from PIL import Image

    from rayexperts.data.encoded import EncodedLoader

    rng = np.random.default_rng(0)
    for split, per_class in (("train", (9, 5)), ("test", (2, 2))):
        for c, n in enumerate(per_class):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):  # several sizes: not cached, decoded a batch at a time
                Image.fromarray(rng.integers(0, 255, (36 + 3 * i, 40, 3), dtype=np.uint8)).save(
                    tmp_path / split / f"c{c}" / f"{i}.jpg")
    cfg = load_config(None, ["method=ce", "data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32",
                             "model.backbone=resnet8", "data.decode=device", "data.num_workers=0", "train.batch_size=4",
                             "data.drop_last=false", "run.verbose=false"])
    run = Run(cfg)
    assert isinstance(run.train_loader, EncodedLoader)
    sizes = _count_steps(run)
    train_epoch(run, 0)
    assert sizes == [4, 4, 4, 2]  # 14 images


def test_per_iteration_schedules_count_the_partial_batch(one_torch_thread):
    cfg = load_config("digits_ce", ["run.verbose=false", "train.batch_size=64", "data.drop_last=false",
                                    "train.schedule=cosine", "train.lr_step=iteration", "train.epochs=4"])
    run = Run(cfg)
    lrs: list[float] = []
    train_epoch(run, 0)  # warm
    real = run.lr_at

    def seen(epoch, step, steps):
        lrs.append(steps)
        return real(epoch, step, steps)

    train_one_epoch(run.method, run.model, run.optimizer, run.train_loader, 1, seen, run.opts)
    assert lrs == [10] * 10  # t = e + (i + 1)/10: the epoch ends exactly at t = e + 1


def test_split_weights_give_the_gradient_of_the_whole_last_batch(one_torch_thread):
    """DDP averages the ranks' gradients: with the loss weights that average is the gradient of the mean
    loss over the whole partial batch (BatchNorm frozen, so each image's loss depends on it alone)."""
    cfg = load_config("digits_ce", ["run.verbose=false", "train.batch_size=64", "data.drop_last=false"])
    run = Run(cfg)
    run.model.eval()
    seed_epoch(run, 0)
    images, targets = next(iter(run.train_loader))
    images, targets = images[:5], targets[:5]

    def grads(x, y, weight):
        run.model.zero_grad(set_to_none=True)
        (run.method.training_step(run.model, Batch(x, y)).total * weight).backward()
        return [p.grad.clone() for p in run.model.parameters() if p.grad is not None]

    whole = grads(images, targets, 1.0)
    # 3 ranks at 2 images each, an epoch of 5 images: one step of 2 + 2 + 1, weights 3*2/5, 3*2/5, 3*1/5
    ranks = [EpochSampler(np.arange(5), "instance", 3, r, drop_last=False) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert sorted(len(s) for s in shares) == [1, 2, 2] and sorted(i for s in shares for i in s) == list(range(5))
    weights = [s.loss_weight(0, 2, len(sh)) for s, sh in zip(ranks, shares)]
    assert weights == [1.2, 1.2, 0.6]
    parts = [grads(images[s], targets[s], w) for s, w in zip(shares, weights)]
    for k, g in enumerate(whole):
        torch.testing.assert_close(sum(p[k] for p in parts) / 3, g, rtol=1e-4, atol=1e-6)


def test_moco_methods_refuse_an_uneven_last_batch_on_several_workers():
    with pytest.raises(ConfigError, match="data.drop_last=false with scaling.num_workers=2 and ncl.contrastive"):
        load_config("cifar100_lt_if100_ncl", ["data.drop_last=false", "scaling.num_workers=2"])
    load_config("cifar100_lt_if100_ncl", ["data.drop_last=false"])  # one worker: fine
    load_config("cifar100_lt_if100_ncl", ["data.drop_last=false", "scaling.num_workers=2", "ncl.contrastive=false"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # 585 = 4 * 146 + 1: the last global batch is one image, on rank 0; rank 1 steps on an empty batch
    cfg = load_config("digits_ce", ["run.verbose=false", "train.batch_size=146", "data.drop_last=false",
                                    f"scaling.num_workers={world}", "train.epochs=1"])
    run = Run(cfg, rank, world)
    run.model = DistributedDataParallel(run.model)
    sizes = _count_steps(run)
    stats = train_epoch(run, 0)
    flat = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    torch.save({"sizes": sizes, "params": flat, "loss": stats["loss"]}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_workers_take_the_codes_steps_when_one_gets_no_image_of_the_last_batch(tmp_path):
    world = 2
    ctx = torch.multiprocessing.start_processes(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
                                                join=False, start_method="fork")
    deadline = time.monotonic() + 120  # unequal step counts would hang the all-reduce: fail instead
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two DDP workers did not finish the epoch in 120 s (unequal step counts?)")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert got[0]["sizes"] == [73] * 4 + [1] and got[1]["sizes"] == [73] * 4 + [0]  # ceil(585/146) = 5 each
    assert torch.isfinite(got[0]["params"]).all()
    torch.testing.assert_close(got[0]["params"], got[1]["params"], rtol=0, atol=0)  # DDP kept them equal
    assert math.isfinite(got[0]["loss"])
