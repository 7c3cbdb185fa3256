"""Part B, syncs and throughput (GPU findings F2, F5, F13): for ce and ncl, ``torch.cuda.set_sync_debug_mode("warn")``
over 20 steps with the device loader and with one pre-built batch; images/s of each and the loader's share; then
``data.cache=host`` (its copies come from pinned buffers, the split itself is not pinned) and ``data.cache=off
data.decode=device`` (nvJPEG)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayexperts.diagnostics.bench import time_pipeline
from rayexperts.diagnostics.runs import Repeat, make_run, train_steps
from rayexperts.engine.loop import seed_epoch

pytestmark = pytest.mark.gpu

MAX_SYNCS_PER_STEP = 10


def count_syncs(fn) -> tuple[int, Counter]:
    """Synchronizing CUDA operations during ``fn`` (``set_sync_debug_mode("warn")``), and where (Python)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    return len(hits), Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits)


@pytest.fixture(scope="module", params=["ce", "ncl"])
def warm(request, cuda) -> SimpleNamespace:
    """The method's run after 3 warm-up steps, and one batch of epoch 1 kept for the fixed-batch steps."""
    run = make_run(cuda, request.param)
    train_steps(run, 0, 3)
    seed_epoch(run, 1)
    fixed = next(iter(run.train_loader))
    yield SimpleNamespace(run=run, fixed=fixed, setup=cuda)
    del run
    torch.cuda.empty_cache()


def test_syncs_per_step(warm, note):
    run, n = warm.run, min(20, len(warm.run.train_loader))
    loader, where = count_syncs(lambda: train_steps(run, 1, n))
    fixed, _ = count_syncs(lambda: train_steps(run, 1, n, Repeat(warm.fixed)))
    warm.setup.sync()
    note(loader=loader / n, fixed_batch=fixed / n, steps=n, top=dict(where.most_common(3)))
    assert loader / n <= MAX_SYNCS_PER_STEP


def test_throughput(warm, note):
    run, setup = warm.run, warm.setup
    bs, steps = int(run.cfg.train.batch_size), min(100, len(run.train_loader))
    t_loader, _ = setup.timed(lambda: train_steps(run, 2, steps))
    t_fixed, _ = setup.timed(lambda: train_steps(run, 2, steps, Repeat(warm.fixed)))
    pipeline = time_pipeline(run, 3, min(50, len(run.train_loader) - 3))
    note.info(f"{run.cfg.method}.throughput", loader_img_s=steps * bs / t_loader,
              fixed_batch_img_s=steps * bs / t_fixed, loader_share=1 - t_fixed / t_loader,
              pipeline_ms=1000 * pipeline, steps=steps)
    assert t_loader > 0 and t_fixed > 0


def test_host_cache_pinned_staging(cuda, note):
    run = make_run(cuda, "ce", "data.cache=host")
    split = run.train_loader.split
    train_steps(run, 0, 3)
    staging = getattr(split, "staging", None)
    pinned = staging is not None and all(b.is_pinned() for slot in staging.buffers for b in slot if b is not None)
    note(staging=staging is not None, buffers_pinned=pinned, split_pinned=split.images.is_pinned())
    n = min(50, len(run.train_loader))
    t, _ = cuda.timed(lambda: train_steps(run, 1, n))
    note.info("host_cache.throughput", img_s=n * int(run.cfg.train.batch_size) / t, steps=n)
    assert run.cache.mode == "host" and pinned and not split.images.is_pinned()


def test_decode_device_throughput(cuda, note):
    if not cuda.data_name.startswith("cifar"):
        pytest.skip("no encoded data (digits-lt)")
    # The same file as data.name=parquet keeps the JPEGs encoded (cifar10-lt decodes them at load).
    run = make_run(cuda, "ce", "data.name=parquet", "data.imbalance_type=exp", "data.cache=off",
                   "data.decode=device", "data.num_workers=4")
    train_steps(run, 0, 3)
    n = min(50, len(run.train_loader))
    t, _ = cuda.timed(lambda: train_steps(run, 1, n))
    note.info("decode_device.throughput", img_s=n * int(run.cfg.train.batch_size) / t, steps=n,
              loader=type(run.train_loader).__name__)
    assert t > 0
