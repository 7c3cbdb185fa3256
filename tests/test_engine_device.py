"""The fast path in the engine (issue 15): data on the device by default for data sets that fit, the
same samples per epoch and per worker as the per-image path, exact resume, files decoded on the device
for data sets that do not fit, channels_last, and torch.compile's switch."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_cifar_parquet
from rayexperts.config import ConfigError, load_config, with_overrides
from rayexperts.data.device import DeviceLoader, plan_cache
from rayexperts.data.encoded import EncodedLoader
from rayexperts.engine.run import Run, compile_mode
from rayexperts.engine.loop import evaluate_splits, seed_epoch, train_epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_digits_and_cifar_live_on_the_device_by_default(tmp_path):
    run = Run(load_config(None, ["method=ncl", "run.verbose=false"]))
    assert run.cache.mode == "device" and "885 images" in run.cache.why
    assert isinstance(run.train_loader, DeviceLoader) and isinstance(run.eval_loaders[""], DeviceLoader)
    seed_epoch(run, 0)
    x, x_key, y = next(iter(run.train_loader))
    assert x.shape == x_key.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert not torch.equal(x, x_key)  # the MoCo key view is its own augmentation
    parquet = make_cifar_parquet(tmp_path / "c.parquet")
    cfg = load_config(None, ["data.name=cifar10-lt", f"data.root={parquet}", "data.imbalance_factor=2"])
    assert plan_cache(Run(cfg).data, "auto", 4096).mode == "device"
    assert plan_cache(Run(cfg).data, "auto", 0.001).mode == "off"  # over the limit: the per-image loader
    off = Run(with_overrides(cfg, {"data.cache": "off"}))
    assert isinstance(off.train_loader, torch.utils.data.DataLoader)
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(None, ["data.cache=gpu"])


def _device_batches(run: Run, epoch: int) -> list[list[int]]:
    seed_epoch(run, epoch)
    return [b.tolist() for b in run.train_loader.index_batches()]


@pytest.mark.parametrize("sampler", ["instance", "class_balanced"])
def test_two_workers_train_on_the_one_worker_sample_set_on_the_device_path(sampler):
    cfg1 = load_config(None, ["train.batch_size=64", f"data.sampler={sampler}", "run.verbose=false"])
    cfg2 = with_overrides(cfg1, {"scaling.num_workers": 2})
    one, two = Run(cfg1), [Run(cfg2, rank, 2) for rank in (0, 1)]
    image_path = Run(with_overrides(cfg1, {"data.cache": "off"}))
    for epoch in (0, 3):
        b1 = _device_batches(one, epoch)
        b2 = [_device_batches(r, epoch) for r in two]
        assert len(b2[0]) == len(b2[1]) == len(b1) and all(len(b) == 32 for b in b2[0] + b2[1])
        assert Counter(i for b in b1 for i in b) == Counter(i for r in b2 for b in r for i in b)
        image_path.sampler.set_epoch(epoch)  # the per-image path draws the same samples in the same order
        assert b1 == [list(b) for b in image_path.train_loader.batch_sampler]


def test_resume_is_exact_on_the_device_path():
    cfg = load_config(None, ["method=ncl", "train.epochs=2", "run.verbose=false"])
    straight = Run(cfg)
    for epoch in range(2):
        train_epoch(straight, epoch)
    first = Run(cfg)
    train_epoch(first, 0)
    state = copy.deepcopy({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict()})
    resumed = Run(cfg)
    resumed.model.load_state_dict(state["model"])
    resumed.optimizer.load_state_dict(state["optimizer"])
    train_epoch(resumed, 1)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def _jpeg_tree(root: Path) -> None:
    """train/test folders of RGB JPEGs of different sizes (an ImageNet-like folder)."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", (9, 5)), ("test", (3, 3))):
        for c, n in enumerate(per_class):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                h, w = 40 + 7 * i, 48 + 5 * c
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.jpg")


def test_files_too_large_to_cache_are_decoded_on_the_device(tmp_path):
    _jpeg_tree(tmp_path)
    cfg = load_config(None, ["method=ce", "data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32",
                             "model.backbone=resnet8", "model.shortcut=A", "data.decode=device", "data.num_workers=0",
                             "train.batch_size=4", "data.test_batch_size=4", "train.epochs=1", "run.verbose=false"])
    run = Run(cfg)
    assert run.cache.mode == "off" and "several sizes" in run.cache.why
    assert isinstance(run.train_loader, EncodedLoader) and len(run.train_loader) == 3
    seed_epoch(run, 0)
    x, y = next(iter(run.train_loader))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    stats = train_epoch(run, 0)
    acc = evaluate_splits(run)[""]
    assert np.isfinite(stats["loss"]) and acc.summary("expert0", run.groups)["num_samples"] == 6
    workers = Run(with_overrides(cfg, {"data.decode": "workers"}))
    assert isinstance(workers.train_loader, torch.utils.data.DataLoader)


def test_channels_last_by_default_and_compile_only_where_asked():
    cfg = load_config(None, ["run.verbose=false"])
    run = Run(cfg)
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and run.opts.channels_last
    assert not Run(with_overrides(cfg, {"model.channels_last": "off"})).opts.channels_last
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode(cfg, cpu, False) is None and compile_mode(cfg, cuda, False) == "reduce-overhead"
    assert compile_mode(cfg, cuda, True) == "default"  # MoCo queues change in the forward pass
    assert compile_mode(with_overrides(cfg, {"train.compile": "on"}), cpu, False) == "default"
    assert compile_mode(with_overrides(cfg, {"train.compile": "off"}), cuda, False) is None
