"""One prepared check of the GPU path (GPU findings F2-F15): PASS / FAIL / INFO lines and ``gpu_check.json``.

    python jobs/gpu_check.py [--out runs/gpu_check] [--data PARQUET] [--budget 480] [--parts ACBEFHDG] [--rows 540]
    python jobs/gpu_check.py --cpu-smoke [--out DIR]    # parts A, E and H on the CPU, digits-lt, in seconds

Runs in one process without Ray (``Run`` + ``train_one_epoch`` / ``evaluate``), on CIFAR-10-LT IF 100
(``--data``: a CIFAR-10 Parquet file) with ResNet-32, else digits-lt. Every part
runs in its own ``try``/``except`` under its own time budget (and the whole under ``--budget`` seconds),
so one failure or one slow part does not stop the others; after each part ``gpu_check.json`` is
rewritten in ``--out``. Each line reads ``<PASS|FAIL|INFO> <part>.<name> key=value ...``.

A  placement and dtypes (F15, F8, F7): every registered method (CBD with two CE teachers trained (20 steps)
   first; methods added later are included), ``data.cache=device``, a few steps under a dispatch probe:
   no op in ``rayexperts/`` mixes devices, the loss ops get float32, the loss is finite, every
   evaluation view's logits are float32, and the data-dependent ops (syncs on a GPU) per step.
B  syncs and throughput (F2, F5, F13): for ce and ncl, ``torch.cuda.set_sync_debug_mode("warn")`` over
   20 steps with the device loader and with one pre-built batch; images/s of each and the loader's share;
   then ``data.cache=host`` (its copies come from pinned buffers, the split itself is not pinned) and
   ``data.cache=off data.decode=device`` (nvJPEG).
C  the nvJPEG stream race (F4): decodes while queued kernels still read freed memory of the outputs'
   size, without and with the project's stream sync (``decode_batch``).
D  torch.compile (F10): ce (reduce-overhead) and ncl (default), each in a child process with a time
   limit: first-step time, graph breaks, graphs, cudagraph skips, new graphs in epoch 2, and the loss
   against eager.
E  resume and cuDNN (F12): ce 2 epochs vs 1 + checkpoint + resume + 1 against the run-to-run noise of two
   straight runs; optimizer state on the device after resume; cudnn.benchmark on/off step time; two runs
   with deterministic algorithms.
F  two ranks on one GPU with gloo (F9): ncl with MoCo under DDP (``model.sync_bn=false``): identical
   parameters, key encoders, queues and buffers on both ranks, the mean over workers and the evaluation
   sums reduced on CUDA tensors; and whether ``validate`` refuses two ranks on a fractional GPU (F1).
G  memory (F6): the cache plan against ``torch.cuda.mem_get_info`` and the peak memory of every part.
H  throughput (for paper-protocol wall-time estimates): one epoch of every method with its CIFAR-10-LT
   IF 100 preset (eager), images/s, seconds per epoch and per evaluation, and the preset's whole run.

Without CUDA (and without ``--cpu-smoke``) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import rayexperts  # noqa: E402
from rayexperts.config import ConfigError, list_presets, load_config, validate, with_overrides  # noqa: E402
from rayexperts.engine.loop import evaluate, train_one_epoch, train_step  # noqa: E402
from rayexperts.engine.run import Run, local_device  # noqa: E402
from rayexperts.engine.worker import resume  # noqa: E402
from rayexperts.eval.metrics import EvalAccumulator  # noqa: E402
from rayexperts.launch.bench import _Steps, time_pipeline  # noqa: E402
from rayexperts.registry import METHODS  # noqa: E402
from rayexperts.rundir import RunDir, save_checkpoint, unwrap  # noqa: E402

PKG = str(rayexperts.PACKAGE_DIR) + os.sep
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"
BUDGETS = {"A": 90, "B": 90, "C": 45, "D": 180, "E": 50, "F": 60, "G": 10, "H": 120}  # seconds
ORDER = "ACBEFHDG"  # compile last: the slowest and the most likely to run out of time
SMOKE_PARTS = "AEH"
TWO_TEACHERS = "cbd.teachers=[{type: standard, seed: 0}, {type: data_aug, seed: 1}]"
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "bincount", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive"}
LOSS_OPS = {"_log_softmax", "_softmax", "nll_loss_forward", "nll_loss2d_forward", "kl_div", "logsumexp",
            "binary_cross_entropy_with_logits", "log_sigmoid_forward", "mse_loss", "smooth_l1_loss", "huber_loss"}


# ------------------------------------------------------------------------------ reporting


class Check:
    """The run's context and its record: device, data, budgets, lines, and the JSON file."""

    def __init__(self, args: argparse.Namespace, device: torch.device, data: list[str], data_name: str) -> None:
        self.args, self.device, self.data, self.data_name = args, device, data, data_name
        self.model: list[str] = []  # model and batch overrides of the runs not built from a preset
        self.smoke = bool(args.cpu_smoke)
        self.out = Path(args.out)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.start = time.perf_counter()
        self.deadline = self.start + float(args.budget)
        self.part_deadline = self.deadline
        self.part = ""
        self.lines: list[dict[str, Any]] = []
        self.parts: dict[str, dict[str, Any]] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def line(self, status: str, name: str, **numbers: Any) -> None:
        text = " ".join(f"{k}={_fmt(v)}" for k, v in numbers.items())
        print(f"{status} {self.part}.{name} {text}".rstrip(), flush=True)
        entry = {"status": status, "part": self.part, "name": name, **{k: _plain(v) for k, v in numbers.items()}}
        self.lines.append(entry)
        if self.part in PARTS:
            self.parts.setdefault(self.part, {"lines": []})["lines"].append(entry)

    def check(self, ok: bool, name: str, **numbers: Any) -> bool:
        self.line("PASS" if ok else "FAIL", name, **numbers)
        return ok

    def left(self) -> float:
        """Seconds left to this part (its budget and the whole run's)."""
        return min(self.part_deadline, self.deadline) - time.perf_counter()

    def over(self, what: str) -> bool:
        """True (and an INFO line) when this part's time is spent: skip ``what``."""
        if self.left() > 0:
            return False
        self.line("INFO", "skipped", what=what, reason="time budget spent")
        return True

    def steps(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        summary = Counter(line["status"] for line in self.lines)
        doc = {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "torch": torch.__version__,
            "cpu_smoke": self.smoke,
            "data": self.data_name,
            "seconds": round(time.perf_counter() - self.start, 1),
            "summary": {"pass": summary["PASS"], "fail": summary["FAIL"], "info": summary["INFO"]},
            "parts": self.parts,
            "lines": self.lines,
        }
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(_plain(v), separators=(",", ":"), default=str)
    return str(v).replace(" ", "_")


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ------------------------------------------------------------------------------ runs


def config(ck: Check, method: str, *extra: str, preset: bool = False):
    """A run config of ``method`` on the check's data (``data.cache=device``; ResNet-32, batch 128 on CIFAR),
    or with its preset's settings (``preset``; the data location still the check's)."""
    name = f"{method}-{uuid.uuid4().hex[:8]}"
    found = preset_of(method, ck.data_name) if preset else None
    base = [f"method={method}", *ck.data, *([] if found else ck.model), "data.cache=device", "run.verbose=false",
            "train.compile=off", f"run.storage_path={ck.tmp / 'runs'}", f"run.name={name}"]
    if method == "cbd" and not found:
        base.append(TWO_TEACHERS)
    cfg = load_config(found, [*base, *extra])
    if method == "ride_ea" and not cfg.ride_ea.stage1 and not cfg.ride_ea.experts_run:  # its stage 1: a RIDE run
        stage1 = preset_of("ride", ck.data_name) if found else None
        if stage1 is None:  # RIDE on the same data and model
            from omegaconf import OmegaConf

            stage1 = str(ck.tmp / f"ride_stage1_{name}.yaml")
            same = OmegaConf.from_dotlist(["method=ride", *ck.data, *([] if found else ck.model)])
            Path(stage1).write_text(OmegaConf.to_yaml(same))
        cfg = load_config(found, [*base, *extra, f"ride_ea.stage1={stage1}"])
    return cfg


def preset_of(method: str, data_name: str) -> str | None:
    """The method's preset on the check's data (CIFAR-10-LT IF 100, or digits-lt)."""
    data = "digits" if data_name == "digits-lt" else "cifar10_lt_if100"
    names = set(list_presets())
    return next((n for n in (f"{data}_{method}", f"{method}_{data}") if n in names), None)


def with_prerequisites(ck: Check, cfg, train: bool):
    """``cfg`` once its prerequisite runs (CBD's teachers, RIDE-EA's stage 1) exist: each a run directory with
    its config and a checkpoint, trained on the check's device for (at most) 20 steps of one epoch (``train``)
    or saved untrained (the same cost per step: for throughput)."""
    cls = METHODS.get(cfg.method)
    pres = cls.prerequisites(cfg)
    if not pres:
        return cfg
    dirs = []
    for p in pres:
        p = with_overrides(p, {"train.epochs": 1, "data.cache": "device", "scaling.use_gpu": ck.cuda,
                               "scaling.gpus_per_worker": 1}, "gpu check")
        run = Run(p, 0, 1, ck.device)
        if train:
            train_steps(run, 0, 20)
        rundir = RunDir.of(str(p.run.storage_path), str(p.run.name))
        rundir.write_config(p)
        local = Path(tempfile.mkdtemp(dir=ck.tmp))
        save_checkpoint(local, model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
        rundir.put_checkpoint(str(local), 1, 1)
        dirs.append(rundir.uri)
        del run
    return cls.after_prerequisites(cfg, dirs)


def make_run(ck: Check, method: str, *extra: str, preset: bool = False, train_teachers: bool = True) -> Run:
    cfg = with_prerequisites(ck, config(ck, method, *extra, preset=preset), train_teachers)
    return Run(cfg, 0, 1, ck.device)


class Repeat:
    """A loader that yields the same pre-built batch (the step without the data pipeline)."""

    def __init__(self, items: tuple) -> None:
        self.items = items

    def __iter__(self):
        return itertools.repeat(self.items)


def train_steps(run: Run, epoch: int, steps: int, loader=None) -> dict[str, float]:
    """``steps`` training steps of ``epoch`` (the loop's own ``train_one_epoch``; 0: the whole epoch)."""
    run.start_epoch(epoch)
    loader = loader if loader is not None else run.train_loader
    return loop(run, _Steps(loader, steps) if steps else loader, epoch)


def loop(run: Run, batches, epoch: int) -> dict[str, float]:
    """``train_one_epoch`` over ``batches`` as the run trains (with its mixup, when it has one)."""
    mixup = getattr(run, "mixup", None)
    return train_one_epoch(run.method, run.model, run.optimizer, batches, epoch, run.lr_at, run.opts,
                           **({"mixup": mixup} if mixup is not None else {}))


def timed(ck: Check, fn: Callable[[], Any]) -> tuple[float, Any]:
    ck.sync()
    t = time.perf_counter()
    out = fn()
    ck.sync()
    return time.perf_counter() - t, out


def one_step(run: Run, batches) -> Any:
    """One training step as the loop takes it (the batch from ``batches``)."""
    return train_step(run.method, run.model, run.optimizer, run.opts.batch(next(batches)), run.opts)


def _where() -> str | None:
    """``file:line`` of the innermost frame in the rayexperts package, or None."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.startswith(PKG):
            return f"{f.f_code.co_filename[len(PKG):]}:{f.f_lineno}"
        f = f.f_back
    return None


class Probe(TorchDispatchMode):
    """Every aten op dispatched from ``rayexperts/`` code: mixed devices (besides 0-dim CPU scalars),
    data-dependent ops (a sync on a GPU), host-to-device and device-to-host copies, CPU work while the
    model is on a GPU, and the dtypes the loss ops get."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.ops = 0
        self.mixed: Counter = Counter()
        self.syncs: Counter = Counter()
        self.h2d: Counter = Counter()
        self.d2h: Counter = Counter()
        self.cpu_ops: Counter = Counter()
        self.loss_dtypes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = _where()
        if where is not None:
            self.ops += 1
            name = func.overloadpacket.__name__
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if name in ("_to_copy", "copy_"):
                src = args[1] if name == "copy_" else args[0]
                dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
                if src.device.type == "cpu" and torch.device(dst).type != "cpu":
                    self.h2d[where] += 1
                elif src.device.type != "cpu" and torch.device(dst).type == "cpu":
                    self.d2h[where] += 1
            elif len(devices) > 1:
                self.mixed[f"{name}@{where}"] += 1
            elif self.device.type != "cpu" and devices == {torch.device("cpu")}:
                self.cpu_ops[where] += 1
            on_host = self.device.type != "cpu" and all(t.device.type == "cpu" for t in tensors)  # no sync
            if not on_host and (name in SYNC_OPS or (name in ("index", "index_put", "index_put_", "_index_put_impl_")
                                                     and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                             for t in tree_leaves(args[1:2])))):
                self.syncs[f"{name}@{where}"] += 1
            if name in LOSS_OPS:
                first = next((t for t in tensors if t.is_floating_point()), None)
                if first is not None:
                    self.loss_dtypes[str(first.dtype).removeprefix("torch.")] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def view_dtypes(record: dict[str, set]):
    """Record the dtype of the logits every evaluation view hands ``EvalAccumulator.update``."""
    original = EvalAccumulator.update

    def update(self, view, logits, targets):
        record.setdefault(view, set()).add(str(logits.dtype).removeprefix("torch."))
        return original(self, view, logits, targets)

    EvalAccumulator.update = update
    try:
        yield record
    finally:
        EvalAccumulator.update = original


def top(counter: Counter, n: int = 3) -> dict[str, int]:
    return dict(counter.most_common(n))


# ------------------------------------------------------------------------------ A: placement and dtypes


def part_a(ck: Check) -> None:
    steps = ck.steps(5, 2)
    for method in METHODS.names():
        if ck.over(f"methods from {method} on"):
            return
        try:
            run = make_run(ck, method)
            run.start_epoch(0)
            batches = iter(run.train_loader)
            probe = Probe(ck.device)
            losses = []
            with probe:
                for _ in range(steps):
                    losses.append(one_step(run, batches).total.detach().float())
            ck.sync()
            loss = torch.stack(losses)
            dtypes: dict[str, set] = {}
            with view_dtypes(dtypes):
                evaluate(run.method, run.eval_model, _Steps(run.eval_loaders[""], 1), run.opts)
            ck.check(not probe.mixed, f"{method}.placement", ops_per_step=probe.ops // steps,
                     mixed=top(probe.mixed), h2d_per_step=sum(probe.h2d.values()) / steps,
                     cpu_ops_per_step=sum(probe.cpu_ops.values()) / steps)
            ck.check(set(probe.loss_dtypes) <= {"float32"} and loss.dtype == torch.float32,
                     f"{method}.loss_dtypes", loss_ops=dict(probe.loss_dtypes), total=str(loss.dtype))
            ck.check(bool(torch.isfinite(loss).all()), f"{method}.loss_finite", loss=float(loss[-1]))
            ck.check(set(dtypes) == set(run.views) and all(d == {"float32"} for d in dtypes.values()),
                     f"{method}.eval_view_dtypes", views=len(dtypes), dtypes=sorted(set().union(*dtypes.values())))
            ck.line("INFO", f"{method}.syncs", per_step=sum(probe.syncs.values()) / steps, top=top(probe.syncs),
                    d2h_per_step=sum(probe.d2h.values()) / steps, h2d_top=top(probe.h2d))
            del run
        except Exception as e:  # one method's failure does not stop the others
            ck.line("FAIL", f"{method}.error", error=_error(e))


# ------------------------------------------------------------------------------ B: syncs and throughput


def count_syncs(ck: Check, fn: Callable[[], Any]) -> tuple[int, Counter]:
    """Synchronizing CUDA operations during ``fn`` (``set_sync_debug_mode("warn")``), and where (Python)."""
    if not ck.cuda:  # --force-cpu (development): nothing to count
        fn()
        return 0, Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ck.sync()
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    return len(hits), Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits)


def part_b(ck: Check) -> None:
    for method in ("ce", "ncl"):
        if ck.over(f"B {method}"):
            return
        run = make_run(ck, method)
        bs = int(run.cfg.train.batch_size)
        n, timed_steps = min(20, len(run.train_loader)), min(100, len(run.train_loader))  # within one epoch
        train_steps(run, 0, 3)  # warm-up
        run.start_epoch(1)
        fixed = next(iter(run.train_loader))
        loader_syncs, where = count_syncs(ck, lambda: train_steps(run, 1, n))
        fixed_syncs, _ = count_syncs(ck, lambda: train_steps(run, 1, n, Repeat(fixed)))
        ck.check(loader_syncs / n <= 10, f"{method}.syncs_per_step", loader=loader_syncs / n, fixed_batch=fixed_syncs / n,
                 steps=n, top=top(where))
        t_loader, _ = timed(ck, lambda: train_steps(run, 2, timed_steps))
        t_fixed, _ = timed(ck, lambda: train_steps(run, 2, timed_steps, Repeat(fixed)))
        pipeline = time_pipeline(run, 3, min(50, len(run.train_loader) - 3))
        ck.line("INFO", f"{method}.throughput", loader_img_s=timed_steps * bs / t_loader,
                fixed_batch_img_s=timed_steps * bs / t_fixed, loader_share=1 - t_fixed / t_loader,
                pipeline_ms=1000 * pipeline, steps=timed_steps)
        del run
    if ck.over("B host cache"):
        return
    run = make_run(ck, "ce", "data.cache=host")
    split = run.train_loader.split
    train_steps(run, 0, 3)
    staging = getattr(split, "staging", None)
    pinned = staging is not None and all(b.is_pinned() for slot in staging.buffers for b in slot if b is not None)
    ck.check(run.cache.mode == "host" and pinned and not split.images.is_pinned(), "host_cache_pinned_staging",
             staging=staging is not None, buffers_pinned=pinned, split_pinned=split.images.is_pinned())
    n = min(50, len(run.train_loader))
    t, _ = timed(ck, lambda: train_steps(run, 1, n))
    ck.line("INFO", "host_cache.throughput", img_s=n * int(run.cfg.train.batch_size) / t, steps=n)
    del run
    if ck.over("B decode=device"):
        return
    if not ck.data_name.startswith("cifar"):
        ck.line("INFO", "decode_device.skipped", reason="no encoded data (digits-lt)")
        return
    # The same file as data.name=parquet keeps the JPEGs encoded (cifar10-lt decodes them at load).
    run = make_run(ck, "ce", "data.name=parquet", "data.imbalance_type=exp", "data.cache=off", "data.decode=device",
                   "data.num_workers=4")
    train_steps(run, 0, 3)
    n = min(50, len(run.train_loader))
    t, _ = timed(ck, lambda: train_steps(run, 1, n))
    ck.line("INFO", "decode_device.throughput", img_s=n * int(run.cfg.train.batch_size) / t, steps=n,
            loader=type(run.train_loader).__name__)


# ------------------------------------------------------------------------------ C: the nvJPEG race


class _Named:
    def describe(self, i: int) -> str:
        return f"test image {i}"


def jpeg_blobs(ck: Check, n: int = 256, size: int = 224) -> list[torch.Tensor]:
    """``n`` JPEGs of the check's training images, upscaled to ``size`` (ImageNet-sized outputs)."""
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    from rayexperts.data import build_dataset

    cfg = load_config(None, [*ck.data, "run.verbose=false"])
    images = torch.from_numpy(build_dataset(cfg.data).train.images[:n])
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    big = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return [encode_jpeg(img.round().clamp(0, 255).to(torch.uint8), quality=90) for img in big]


def race(ck: Check, blobs: list[torch.Tensor], decode: Callable[[], list[torch.Tensor]], refs, reps: int,
         size: int = 8192):
    """Decode ``reps`` times while sums over just-freed tensors of the outputs' sizes are still queued
    behind a long matmul: (wrong sums, wrong decodes)."""
    dev = ck.device
    bad_sums = bad_decodes = 0
    for _ in range(reps):
        baits = [torch.ones(r.shape, dtype=torch.uint8, device=dev) for r in refs]
        big = torch.randn(size, size, device=dev)
        slow = big @ big
        for _ in range(3):  # ~50-100 ms of queued work before the sums
            slow = slow @ big
        sums = torch.stack([b.sum() for b in baits])  # queued behind the matmul, reading the baits
        expected = torch.tensor([b.numel() for b in baits], device=dev)
        del baits, big
        out = decode()
        torch.cuda.synchronize(dev)
        bad_sums += int((sums != expected).sum())
        bad_decodes += sum(not torch.equal(o, r) for o, r in zip(out, refs))
        del slow, out
    return bad_sums, bad_decodes


def part_c(ck: Check) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    from rayexperts.data.encoded import decode_batch

    if not ck.cuda:
        ck.line("INFO", "skipped", reason="needs CUDA")
        return
    blobs = jpeg_blobs(ck)
    torch.cuda.synchronize(ck.device)
    refs = [r.clone() for r in decode_jpeg(blobs, mode=ImageReadMode.RGB, device=ck.device)]
    torch.cuda.synchronize(ck.device)
    reps = 30
    raw = race(ck, blobs, lambda: decode_jpeg(blobs, mode=ImageReadMode.RGB, device=ck.device), refs, reps)
    ck.line("INFO", "nvjpeg_race.without_sync", wrong_sums=raw[0], wrong_decodes=raw[1], reps=reps,
            images=len(blobs), reproduced=raw[0] + raw[1] > 0)
    index = list(range(len(blobs)))
    ours = race(ck, blobs, lambda: decode_batch(blobs, ck.device, _Named(), index), refs, reps)  # type: ignore[arg-type]
    ck.check(ours == (0, 0), "nvjpeg_race.decode_batch_with_sync", wrong_sums=ours[0], wrong_decodes=ours[1], reps=reps)


# ------------------------------------------------------------------------------ D: torch.compile


def part_d(ck: Check) -> None:
    for method, share in (("ce", 0.45), ("ncl", 1.0)):
        if ck.over(f"D {method}"):
            return
        limit = max(10.0, ck.left() * share)
        cmd = [sys.executable, __file__, "--child-compile", method, "--data", ck.args.data, "--out", str(ck.tmp),
               *([] if ck.cuda else ["--force-cpu"])]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            ck.line("FAIL", f"{method}.timeout", seconds=limit, reason="compile + 2x40 steps did not finish")
            continue
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not found:
            ck.line("FAIL", f"{method}.error", rc=done.returncode, stderr=done.stderr.strip().splitlines()[-3:])
            continue
        r = json.loads(found[-1])
        ck.check(r["new_graphs_epoch2"] == 0, f"{method}.no_recompile_in_epoch2", new_graphs=r["new_graphs_epoch2"])
        ck.check(abs(r["loss_compiled"] - r["loss_eager"]) < 5e-2, f"{method}.loss_vs_eager",
                 compiled=r["loss_compiled"], eager=r["loss_eager"])
        ck.line("INFO", f"{method}.compile", mode=r["mode"], first_step_s=r["first_step_s"],
                epoch1_s=r["epoch1_s"], epoch2_s=r["epoch2_s"], eager_s=r["eager_s"], graphs=r["unique_graphs"],
                graph_breaks=r["graph_breaks"], break_reasons=r["break_reasons"], cudagraph_skips=r["cudagraph_skips"])


class _Clock:
    """A loader that notes when each batch is asked for (the first step's time, compilation included)."""

    def __init__(self, loader) -> None:
        self.loader, self.times = loader, []

    def __iter__(self):
        for items in self.loader:
            self.times.append(time.perf_counter())
            yield items

    def __len__(self) -> int:
        return len(self.loader)


def compile_child(args: argparse.Namespace) -> int:
    """``--child-compile METHOD``: eager vs compiled, 2 x 40 steps; one JSON line on stdout."""
    cuda = torch.cuda.is_available() and not args.force_cpu
    ck = make_check(args, local_device(cuda))
    try:
        return _compile_child(ck, args.child_compile, 40)
    finally:
        shutil.rmtree(ck.tmp, ignore_errors=True)


def _compile_child(ck: Check, method: str, steps: int) -> int:
    from torch._dynamo.utils import counters

    from rayexperts.engine.run import compile_mode

    eager = make_run(ck, method)
    eager_s, stats = timed(ck, functools.partial(train_steps, eager, 0, steps))
    loss_eager = stats["loss"]
    del eager
    run = make_run(ck, method, "train.compile=on")
    run.compile()
    counters.clear()
    clock = _Clock(_Steps(run.train_loader, steps))
    run.start_epoch(0)
    t1, stats = timed(ck, lambda: loop(run, clock, 0))
    graphs = counters["stats"]["unique_graphs"]
    t2, _ = timed(ck, lambda: train_steps(run, 1, steps))
    breaks = counters["graph_break"]
    print(json.dumps({
        "mode": compile_mode(run.cfg, run.device, run.method.uses_key_view),
        "loss_eager": loss_eager, "loss_compiled": stats["loss"], "eager_s": eager_s,
        "first_step_s": clock.times[1] - clock.times[0] if len(clock.times) > 1 else t1,
        "epoch1_s": t1, "epoch2_s": t2, "unique_graphs": graphs,
        "new_graphs_epoch2": counters["stats"]["unique_graphs"] - graphs,
        "graph_breaks": sum(breaks.values()), "break_reasons": dict(Counter(breaks).most_common(3)),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }, default=str), flush=True)
    return 0


# ------------------------------------------------------------------------------ E: resume, cuDNN


def _state_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = unwrap(a).state_dict(), unwrap(b).state_dict()
    return max((float((x.double() - sb[k].double()).abs().max()) if x.numel() else 0.0) for k, x in sa.items())


def part_e(ck: Check) -> None:
    steps = ck.steps(30, 3)

    def ce() -> Run:
        return make_run(ck, "ce", "train.epochs=2")

    straight = ce()
    for epoch in range(2):
        train_steps(straight, epoch, steps)
    first = ce()
    train_steps(first, 0, steps)
    ckpt = Path(tempfile.mkdtemp(dir=ck.tmp))
    save_checkpoint(ckpt, model=first.model, optimizer=first.optimizer, epoch=1, ident=first.ident)
    del first
    resumed = ce()
    epoch = resume(resumed, str(ckpt))
    states = [t for s in resumed.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    ck.check(epoch == 1 and all(t.device.type == ck.device.type for t in states if t.dim() > 0),
             "optimizer_state_on_device_after_resume", epoch=epoch, tensors=len(states))
    train_steps(resumed, 1, steps)
    diff = _state_diff(straight.model, resumed.model)
    if ck.cuda:
        again = ce()
        for epoch in range(2):
            train_steps(again, epoch, steps)
        noise = _state_diff(straight.model, again.model)
        ck.check(diff <= 10 * noise + 1e-5, "resume_matches_within_noise", max_abs_diff=diff, run_to_run=noise,
                 steps_per_epoch=steps)
        del again
    else:
        ck.check(diff == 0.0, "resume_is_exact", max_abs_diff=diff, steps_per_epoch=steps)
    del straight, resumed
    if not ck.cuda or ck.over("E cudnn"):
        return
    run = ce()
    train_steps(run, 0, 3)
    run.start_epoch(1)
    fixed = next(iter(run.train_loader))
    times = {}
    before = torch.backends.cudnn.benchmark
    try:
        for flag in (False, True):
            torch.backends.cudnn.benchmark = flag
            train_steps(run, 1, 5, Repeat(fixed))  # (re)tune
            t, _ = timed(ck, functools.partial(train_steps, run, 1, 30, Repeat(fixed)))
            times[flag] = 1000 * t / 30
    finally:
        torch.backends.cudnn.benchmark = before
    ck.line("INFO", "cudnn_benchmark", off_ms_per_step=times[False], on_ms_per_step=times[True],
            speedup=times[False] / times[True])
    del run
    if ck.over("E determinism"):
        return
    flags = (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    try:
        torch.backends.cudnn.deterministic = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.use_deterministic_algorithms(True, warn_only=True)
            runs = []
            for _ in range(2):
                r = ce()
                train_steps(r, 0, 20)
                runs.append(r)
        diff = _state_diff(*runs)
        ops = sorted({str(w.message).split(" does not have a deterministic")[0][:60] for w in caught
                      if "deterministic" in str(w.message)})
        ck.line("INFO", "deterministic_runs", identical=diff == 0.0, max_abs_diff=diff, nondeterministic_ops=ops)
    finally:
        torch.backends.cudnn.deterministic = flags[0]
        torch.use_deterministic_algorithms(flags[1])


# ------------------------------------------------------------------------------ F: two ranks, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, out: str, device_type: str) -> None:
    """One of two DDP ranks on the same device, gloo (``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rayexperts.config import from_dict
    from rayexperts.engine.run import _mean_over_workers

    torch.set_num_threads(2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        run = Run(from_dict(cfg_dict), rank, world, device)
        run.model = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
        stats = train_steps(run, 0, 10)
        mean = _mean_over_workers(stats)
        accs = run.evaluate()  # buffers broadcast, sums all-reduced on the device's tensors
        summary = accs[""].summary(run.method.primary_view, run.groups)
        state = {k: v.detach().cpu() for k, v in unwrap(run.model).state_dict().items()}
        torch.save({"state": state, "mean_loss": mean["loss"], "top1": summary["top1"],
                    "num_samples": summary["num_samples"], "test_size": len(run.data.test),
                    "sums_device": str(accs[""].kl_sum.device)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def part_f(ck: Check) -> None:
    import torch.multiprocessing as mp

    from rayexperts.config import to_dict

    try:
        validate(load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.5"]))
        refused = False
    except ConfigError:
        refused = True
    ck.check(refused, "validate_refuses_two_ranks_on_a_fractional_gpu")
    cfg = config(ck, "ncl", "model.sync_bn=false", "scaling.num_workers=2", "train.batch_size=128")
    out = Path(tempfile.mkdtemp(dir=ck.tmp))
    context = mp.spawn(_rank_main, args=(2, _free_port(), to_dict(cfg), str(out), ck.device.type), nprocs=2,
                       join=False)
    deadline = time.perf_counter() + max(10.0, ck.left())
    while not context.join(timeout=max(0.1, min(5.0, deadline - time.perf_counter()))):
        if time.perf_counter() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            ck.line("FAIL", "ddp_gloo.timeout", seconds=round(deadline - ck.start))
            return
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    diffs = {k: float((v.double() - r1["state"][k].double()).abs().max()) if v.numel() else 0.0
             for k, v in r0["state"].items()}
    moco = {k: d for k, d in diffs.items() if "queue" in k or "key_" in k}
    ck.check(bool(moco) and max(moco.values()) == 0.0, "ddp_gloo.moco_queues_and_key_encoders_identical",
             tensors=len(moco), max_abs_diff=max(moco.values(), default=float("nan")))
    ck.check(max(diffs.values()) == 0.0, "ddp_gloo.all_state_identical", tensors=len(diffs),
             max_abs_diff=max(diffs.values()), worst=max(diffs, key=diffs.get))
    ck.check(r0["num_samples"] == r0["test_size"] and r0["top1"] == r1["top1"] and r0["mean_loss"] == r1["mean_loss"],
             "ddp_gloo.reductions", num_samples=r0["num_samples"], test_size=r0["test_size"], top1=r0["top1"],
             sums_on=r0["sums_device"])


# ------------------------------------------------------------------------------ G: memory


def part_g(ck: Check) -> None:
    from rayexperts.data.device import plan_cache

    run_cfg = config(ck, "ce")
    from rayexperts.data import build_dataset

    data = build_dataset(run_cfg.data)
    if not ck.cuda:
        ck.line("INFO", "cache_plan.cpu", why=plan_cache(data, "auto", float(run_cfg.data.cache_limit_mb)).why)
        return
    free, total = torch.cuda.mem_get_info(ck.device)
    for sharing in (1, 4):
        plan = plan_cache(data, "auto", float(run_cfg.data.cache_limit_mb), device=ck.device, sharing=sharing)
        ck.line("INFO", f"cache_plan.sharing{sharing}", mode=plan.mode, mb=plan.megabytes, why=plan.why)
    ck.line("INFO", "mem_get_info", free_mb=free / 2**20, total_mb=total / 2**20)
    peaks = {p: v.get("peak_mb") for p, v in ck.parts.items() if v.get("peak_mb") is not None}
    ck.line("INFO", "peak_mb_per_part", **peaks)


# ------------------------------------------------------------------------------ H: throughput per method


def part_h(ck: Check) -> None:
    for method in METHODS.names():
        if ck.over(f"methods from {method} on"):
            return
        try:
            found = preset_of(method, ck.data_name)
            run = make_run(ck, method, "data.cache=auto", preset=True, train_teachers=False)
            bs = int(run.cfg.train.batch_size)
            train_steps(run, 0, ck.steps(5, 1))  # warm-up
            steps = len(run.train_loader)
            timed_steps = ck.steps(steps, min(steps, 3))  # --cpu-smoke: a few steps, scaled to the epoch
            seconds, stats = timed(ck, functools.partial(train_steps, run, 0, timed_steps))
            seconds *= steps / timed_steps
            if ck.smoke:  # one batch per evaluation split, scaled to the split
                eval_s = sum(timed(ck, functools.partial(evaluate, run.method, run.eval_model, _Steps(loader, 1), run.opts))[0]
                             * len(loader) for loader in run.eval_loaders.values())
            else:
                eval_s, _ = timed(ck, run.evaluate)
            epochs, every = int(run.cfg.train.epochs), int(run.cfg.eval.every)
            total_h = (epochs * seconds + math.ceil(epochs / every) * eval_s) / 3600
            ck.line("INFO", f"{method}.epoch", preset=found or "none", img_s=steps * bs / seconds, epoch_s=seconds,
                    loop_img_s=stats["images_per_sec"], eval_s=eval_s, steps=steps, batch=bs,
                    experts=int(run.cfg.model.num_experts), backbone=str(run.cfg.model.backbone),
                    cache=run.cache.mode, preset_epochs=epochs, preset_run_h=total_h)
            del run
        except Exception as e:
            ck.line("FAIL", f"{method}.error", error=_error(e))


# ------------------------------------------------------------------------------ main


PARTS: dict[str, Callable[[Check], None]] = {"A": part_a, "B": part_b, "C": part_c, "D": part_d, "E": part_e,
                                             "F": part_f, "G": part_g, "H": part_h}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def make_check(args: argparse.Namespace, device: torch.device) -> Check:
    cifar = not args.cpu_smoke and Path(args.data).exists()
    data = ["data.name=cifar10-lt", f"data.root={args.data}", "data.imbalance_factor=100"] if cifar else ["data.name=digits-lt"]
    ck = Check(args, device, data, "cifar10-lt-if100" if cifar else "digits-lt")
    ck.model = ["model.backbone=resnet32", "train.batch_size=128"] if cifar else []
    return ck


def run_part(ck: Check, part: str) -> None:
    ck.part = part
    # the CPU smoke run is a test: a loaded machine must not turn its tiny parts into skips
    ck.part_deadline = time.perf_counter() + (max(BUDGETS[part], 300) if ck.smoke else BUDGETS[part])
    entry = ck.parts.setdefault(part, {"lines": []})
    if ck.deadline - time.perf_counter() < 5:
        ck.line("INFO", "skipped", reason="the whole check's time budget is spent")
        entry["status"] = "SKIP"
        return
    if ck.cuda:
        torch.cuda.reset_peak_memory_stats(ck.device)
    start = time.perf_counter()
    try:
        PARTS[part](ck)
    except Exception as e:
        ck.line("FAIL", "error", error=_error(e))
        traceback.print_exc()
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if ck.cuda:
        entry["peak_mb"] = round(torch.cuda.max_memory_allocated(ck.device) / 2**20, 1)
        torch.cuda.empty_cache()
    statuses = {line["status"] for line in entry["lines"]}
    entry["status"] = "FAIL" if "FAIL" in statuses else "PASS"
    ck.write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 Parquet file (else digits-lt)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--parts", default=None, help=f"which parts, in order (default {ORDER}; --cpu-smoke: {SMOKE_PARTS})")
    p.add_argument("--cpu-smoke", action="store_true", help="parts A, E and H on the CPU with digits-lt, tiny sizes")
    p.add_argument("--rows", type=float, default=0.0, help="then train the CIFAR-10-LT paper rows for this many seconds "
                   "(jobs/gpu_rows.py, into OUT/rows; CUDA only)")
    p.add_argument("--force-cpu", action="store_true", help=argparse.SUPPRESS)  # development: any part on the CPU
    p.add_argument("--child-compile", default=None, help=argparse.SUPPRESS)  # part D's child process
    args = p.parse_args(argv)
    if args.child_compile:
        return compile_child(args)
    cuda = torch.cuda.is_available() and not (args.cpu_smoke or args.force_cpu)
    if not cuda and not (args.cpu_smoke or args.force_cpu):
        print("INFO gpu_check no CUDA device (torch.cuda.is_available() is False): nothing checked; "
              "--cpu-smoke runs parts A, E and H on the CPU", flush=True)
        return 0
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device = local_device(cuda)
    parts = (args.parts or (SMOKE_PARTS if args.cpu_smoke else ORDER)).upper()
    if unknown := sorted(set(parts) - set(PARTS)):
        print(f"error: unknown part(s) {', '.join(unknown)}: choose from {''.join(sorted(PARTS))}", file=sys.stderr)
        return 2
    ck = make_check(args, device)
    print(f"INFO gpu_check.start device={device} data={ck.data_name} parts={parts} budget_s={args.budget:g}", flush=True)
    try:
        for part in parts:
            run_part(ck, part)
        ck.part = "all"
        s = Counter(line["status"] for line in ck.lines)
        ck.line("INFO", "done", seconds=time.perf_counter() - ck.start, passed=s["PASS"], failed=s["FAIL"])
        ck.write()
    finally:
        shutil.rmtree(ck.tmp, ignore_errors=True)
    status = 1 if s["FAIL"] else 0
    if args.rows > 0 and cuda:  # the paper rows after the checks, in child processes (rayexperts/launch/rows.py)
        from rayexperts.launch.rows import main as train_rows

        torch.cuda.empty_cache()
        status = max(status, train_rows(["--out", str(Path(args.out) / "rows"), "--data", args.data,
                                         "--budget", str(args.rows)]))
    return status


if __name__ == "__main__":
    sys.exit(main())
