"""``rayexperts reproduce --dry-run``: each run's resources (a share of a GPU or of the CPUs), its training-set
size, a timing probe of each distinct model on this machine, and the plan printed with its estimated cost.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rayexperts.config import ConfigError
from rayexperts.launch.reproduce_plan import Setting, protocol_lines
from rayexperts.registry import METHODS

# Training images of the data sets whose split files fix them (docs/methods.md "Shared building blocks").
KNOWN_TRAIN_SIZES = {"imagenet-lt": 115_846, "places-lt": 62_500, "inat2018": 437_513}
SMALL_BACKBONES = ("resnet8", "resnet20", "resnet32", "digitsnet")  # a quarter of a GPU each


def resources(cfg: DictConfig, cpus: float, gpus: float, concurrent: int, user: dict[str, Any]) -> dict[str, Any]:
    """What a one-worker run asks for: with GPUs a quarter of one for a CIFAR-sized ResNet (four runs share a
    device), else one; on CPUs only an equal share of them (and as many torch threads). Scaling keys the user
    set on the command line win."""
    if any(k.startswith("scaling.") for k in user) or int(cfg.scaling.num_workers) > 1:
        return {}
    if gpus > 0:
        share = 0.25 if str(cfg.model.backbone) in SMALL_BACKBONES else 1.0
        per_gpu = max(1, int(1 / share))
        return {"scaling.use_gpu": True, "scaling.gpus_per_worker": share,
                "scaling.cpus_per_worker": float(max(1, math.floor(cpus / max(1, per_gpu * gpus))))}
    return {"scaling.use_gpu": False, "scaling.cpus_per_worker": float(max(1, math.floor(cpus / max(1, concurrent))))}


def train_size(cfg: DictConfig) -> int | None:
    """Training images of ``cfg``'s data set without reading the images where the profile or the published
    split fixes the number; None when unknown."""
    from rayexperts.data.imbalance import exponential_counts

    name = str(cfg.data.name)
    if name in ("cifar10-lt", "cifar100-lt") and cfg.data.imbalance_type == "exp":
        n_max, classes = (5000, 10) if name == "cifar10-lt" else (500, 100)
        return int(exponential_counts(n_max, classes, float(cfg.data.imbalance_factor)).sum())
    if name in KNOWN_TRAIN_SIZES:
        return KNOWN_TRAIN_SIZES[name]
    if name == "digits-lt" or cfg.data.root:
        from rayexperts.data import build_dataset

        try:
            return len(build_dataset(cfg.data).train)
        except Exception:  # noqa: BLE001 - unknown sizes are reported as such
            return None
    return None


def probe(cfg: DictConfig, steps: int = 5) -> float:
    """Training images per second of ``cfg``'s model on this machine's device (its GPU when it has one): the
    median of a few timed training steps on random images of the data set's size, after two untimed ones."""
    import torch
    import torch.nn.functional as F

    from rayexperts.engine.run import local_device
    from rayexperts.engine.schedule import build_optimizer
    from rayexperts.methods.base import Batch
    from rayexperts.registry import DATASETS

    entry = DATASETS.get(str(cfg.data.name))
    classes = entry.num_classes or 10
    channels = entry.in_channels
    size = {"digits-lt": 8, "cifar10-lt": 32, "cifar100-lt": 32}.get(str(cfg.data.name), int(cfg.data.image_size))
    device = local_device()
    counts = torch.linspace(100, 2, classes)
    method = METHODS.get(cfg.method)(cfg, counts, channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = method.build_model().to(device)
        b = max(2, min(int(cfg.train.batch_size) // int(cfg.scaling.num_workers), 32))
        images = torch.randn(b, channels, size, size, device=device)
        targets = torch.randint(classes, (b,)).to(device)
        batch = Batch(images, targets, key_images=images if method.uses_key_view else None)
    method.class_counts = method.class_counts.to(device)  # not setup(): CBD's would load teachers not trained yet
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
    model.train()
    method.on_epoch(0)

    def step() -> None:
        try:
            loss = method.training_step(model, batch).total
        except (ConfigError, FileNotFoundError, ValueError):  # needs finished runs (teachers): the network alone
            loss = F.cross_entropy(model(batch.images).logits[0], batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed() -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        step()
    times = sorted(timed() for _ in range(steps))
    return b / times[len(times) // 2]  # the median step: robust to a busy machine


def estimate(settings: list[Setting], cpus: float, gpus: float) -> dict[str, dict[str, Any]]:
    """Per run name: epochs, images, probe images/s and hours (of this machine's device), from one probe per
    distinct model; a run with a first wave (CBD's teachers) adds theirs."""
    probes: dict[str, float] = {}
    out = {}
    for s in settings:
        for cfg, first in zip(s.configs, s.first):
            total_h, notes = 0.0, []
            for c in [*first, cfg]:
                key = json.dumps([c.method, c.model.backbone, int(c.model.num_experts), c.data.name,
                                  int(c.train.batch_size), c.get(c.method) and OmegaConf.to_container(c[c.method])],
                                 sort_keys=True, default=str)
                if key not in probes:
                    try:
                        probes[key] = probe(c)
                    except Exception as e:  # noqa: BLE001 - a model that cannot be probed here is reported
                        probes[key] = float("nan")
                        notes.append(f"probe failed: {str(e).splitlines()[0][:80]}")
                images = train_size(c)
                if images is None:
                    notes.append(f"{c.data.name}: training size unknown")
                    total_h = float("nan")
                    continue
                total_h += int(c.train.epochs) * images / probes[key] / 3600
            out[cfg.run.name] = {"epochs": int(cfg.train.epochs), "runs": len(first) + 1, "hours": total_h,
                                 "note": "; ".join(notes)}
    return out


def print_plan(settings: list[Setting], skipped: pd.DataFrame, cost: dict[str, dict[str, Any]], where: str) -> None:
    print(f"{'run':<48} {'epochs':>6} {'resources':<28} {'est. hours':>10}  rows")
    total, unknown = 0.0, 0
    for s in settings:
        for cfg in s.configs:
            c = cost.get(cfg.run.name, {})
            cpus = f"{cfg.scaling.cpus_per_worker:g} CPU" if cfg.scaling.cpus_per_worker else "a share of the CPUs"
            res = f"{cfg.scaling.gpus_per_worker:g} GPU, {cpus}" if cfg.scaling.use_gpu else cpus
            hours = c.get("hours", float("nan"))
            unknown += math.isnan(hours)
            total += 0 if math.isnan(hours) else hours
            runs = f" (+{c['runs'] - 1} first)" if c.get("runs", 1) > 1 else ""
            note = f"  [{c['note']}]" if c.get("note") else ""
            print(f"{cfg.run.name:<48} {cfg.train.epochs:>6} {res:<28} {hours:>10.3f}  {s.label}{runs}{note}")
        for line in protocol_lines(s):
            print(line)
    for _, r in skipped.drop_duplicates(["table", "method", "variant", "dataset", "backbone"]).iterrows():
        print(f"no preset: {r['table']} {r['method']}" + (f" ({r['variant']})" if r["variant"] else "")
              + f", {r['dataset']} {r['backbone']}: skipped" + (" [inferred]" if r.get("inferred", False) else ""))
    missing = f" + {unknown} runs not estimated (see their notes)" if unknown else ""
    print(f"estimated total: {total:.3f} {where}-hours{missing} (a timing probe of each model on this machine's {where}: "
          "the median of 5 training steps; runs one after another, data loading and evaluation not counted)")
