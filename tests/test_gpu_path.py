"""The GPU path, checked on a CPU (GPU findings F3-F7, F14; the GPU check script's CPU-safe parts).

The dispatch census runs one training step and one evaluation batch of every registered method under a
``TorchDispatchMode`` and fails on every op issued from ``rayexperts/`` code that must read a value back
from the device (a host-device sync on a GPU) beyond a fixed, named budget."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rayexperts
from data_fixtures import make_cifar_parquet
from rayexperts.config import ConfigError, DataConfig, load_config, to_dict, with_overrides
from rayexperts.data.device import CachedSplit, PinnedStaging, plan_cache, processes_per_device
from rayexperts.data.errors import DataError
from rayexperts.data.sources import ArraySource, ImageSource
from rayexperts.engine.loop import LoopOptions, evaluate, train_step
from rayexperts.launch.bench import _Steps
from rayexperts.engine.run import Run
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.registry import METHODS
from rayexperts.rundir import RunDir, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
PKG = str(rayexperts.PACKAGE_DIR) + "/"
TWO_TEACHERS = "cbd.teachers=[{type: standard, seed: 0}, {type: data_aug, seed: 1}]"

# ------------------------------------------------------------------------------ the dispatch census

# Ops that read a device value back to the host (each a sync on a GPU): .item()/float()/bool()
# (_local_scalar_dense), nonzero and the boolean-mask index/index_put_ built on it, bincount (sizes its
# output from the input's maximum), and the other ops whose output shape depends on the data.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "bincount", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}

# The budget: (op, file under rayexperts/) -> (calls allowed per training step / evaluation batch, why and where).
# Empty: no sync is unavoidable today (F3 removed evaluation's bincounts). An entry needs its reason and line.
TRAIN_BUDGET: dict[tuple[str, str], tuple[int, str]] = {}
EVAL_BUDGET: dict[tuple[str, str], tuple[int, str]] = {}

# Host-side work, which the census cannot tell from device work on a CPU (here every tensor is a CPU tensor):
# (op, file under rayexperts/, function) -> why it is no sync on a GPU either. Exempt at any count.
HOST_SIDE: dict[tuple[str, str, str], str] = {
    ("bincount", "data/batched.py", "_rows_by_group"):
        "the sizes of the augmentation groups drawn on the CPU (BatchRng.rand_cpu), before one copy to the device: "
        "`sizes = torch.bincount(groups.clamp(max=count), minlength=count + 1)` (a CPU tensor in a GPU run too)",
}


class Census(TorchDispatchMode):
    """Every aten op dispatched while some Python frame on the stack is in the package ``root``: all of
    them counted by name, the syncing ones by ``(op, file, function, line)`` of the innermost such frame."""

    def __init__(self, root: str = PKG) -> None:
        super().__init__()
        self.root = root
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def _frame(self):
        f = sys._getframe(2)
        while f is not None and not f.f_code.co_filename.startswith(self.root):
            f = f.f_back
        return f

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = self._frame()
        if frame is not None:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            masked = name in INDEX_OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                               for t in tree_leaves(args[1:2]))
            if name in SYNC_OPS or masked:
                op = f"{name}[bool]" if masked else name
                path = frame.f_code.co_filename[len(self.root):]
                self.syncs[(op, path, frame.f_code.co_name, frame.f_lineno)] += 1
        return func(*args, **kwargs)

    def over_budget(self, budget: dict[tuple[str, str], tuple[int, str]]) -> dict[str, int]:
        """``"op file:line (function)": count`` of the syncs beyond ``budget`` (host-side work exempt)."""
        device = {k: n for k, n in self.syncs.items() if k[:3] not in HOST_SIDE}
        per_file: collections.Counter = collections.Counter()
        for (op, path, _, _), n in device.items():
            per_file[(op, path)] += n
        over = {key for key, n in per_file.items() if n > budget.get(key, (0, ""))[0]}
        return {f"{op} {path}:{line} ({fn})": n for (op, path, fn, line), n in device.items() if (op, path) in over}


def with_prerequisites(cfg, root: Path):
    """``cfg`` with the runs it needs first (CBD's teachers), each trained for one epoch in this process:
    a run directory with its config.yaml and a checkpoint, as a real stage 1 leaves it."""
    cls = METHODS.get(cfg.method)
    pres = cls.prerequisites(cfg)
    dirs = []
    for p in pres:
        p = with_overrides(p, {"train.epochs": 1})
        run = Run(p)
        run.train_epoch(0)
        rundir = RunDir.of(str(p.run.storage_path), str(p.run.name))
        rundir.write_config(p)
        local = tempfile.mkdtemp(dir=root)
        save_checkpoint(local, model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
        rundir.put_checkpoint(local, 1, 1)
        dirs.append(rundir.uri)
    return cls.after_prerequisites(cfg, dirs) if pres else cfg


def two_stage(method: str, root: Path) -> list[str]:
    """What a two-stage method needs to compose its first stage: CBD two teachers (of its default four),
    RIDE-EA a stage-1 RIDE config."""
    if method == "cbd":
        return [TWO_TEACHERS]
    if method == "ride_ea":
        stage1 = root / "ride_stage1.yaml"
        stage1.write_text("method: ride\n")
        return [f"ride_ea.stage1={stage1}"]
    return []


def census_run(method: str, tmp_path: Path, *extra: str) -> Run:
    cfg = load_config(None, [f"method={method}", "data.cache=device", "run.verbose=false", f"run.storage_path={tmp_path}",
                             "run.name=census", *two_stage(method, tmp_path), *extra])
    try:
        METHODS.get(method).prerequisites(cfg)
    except ConfigError as e:  # a two-stage method added later: give it a case in two_stage()
        pytest.skip(f"{method}: its first stage cannot be composed here ({e})")
    return Run(with_prerequisites(cfg, tmp_path))


def census(run: Run) -> tuple[Census, Census]:
    """One training step (batch from the loader, training_step, backward, optimizer step, after_step) and
    one evaluation batch through ``evaluate``, each under its own census."""
    run.start_epoch(0)
    train, evaluation = Census(), Census()
    with train:
        train_step(run.method, run.model, run.optimizer, run.opts.batch(next(iter(run.train_loader))), run.opts)
    with evaluation:
        evaluate(run.method, run.eval_model, _Steps(run.eval_loaders[""], 1), run.opts)
    return train, evaluation


@pytest.mark.parametrize("method", METHODS.builtin_names())
def test_one_step_and_one_evaluation_batch_issue_no_sync(method, tmp_path):
    """Every registered method (methods added later included), digits-lt on the device path with the
    default augmentation: no data-dependent op from rayexperts/ code beyond the named budget."""
    run = census_run(method, tmp_path)
    assert run.cache.mode == "device"
    train, evaluation = census(run)
    assert sum(train.ops.values()) > 50 and sum(evaluation.ops.values()) > 10  # the census saw the step
    assert train.over_budget(TRAIN_BUDGET) == {}, f"{method}: syncs in one training step"
    assert evaluation.over_budget(EVAL_BUDGET) == {}, f"{method}: syncs in one evaluation batch"


AUGMENTS = typing.get_args(typing.get_type_hints(DataConfig)["augment"])  # every data.augment choice


@pytest.mark.parametrize("augment", AUGMENTS)
def test_the_cifar_pipeline_issues_no_sync(augment, tmp_path):
    """The CIFAR-kind batched pipeline with every ``data.augment`` (NCL: plus the MoCo key view's colour jitter
    and grayscale): GPU finding F2's syncs (boolean masks, ``if chosen.any()``) stay out."""
    parquet = make_cifar_parquet(tmp_path / "c.parquet")
    run = census_run("ncl", tmp_path, "data.name=cifar10-lt", f"data.root={parquet}", "data.imbalance_factor=2",
                     "model.backbone=resnet8", "train.batch_size=32", f"data.augment={augment}")
    train, evaluation = census(run)
    assert train.over_budget(TRAIN_BUDGET) == {}, f"data.augment={augment}: syncs in one training step"
    assert evaluation.over_budget(EVAL_BUDGET) == {}


def _syncing(x: torch.Tensor) -> None:
    torch.bincount(x)
    x[x > 1] = 0
    if x.sum() > 0:
        pass
    x.nonzero()


def test_the_census_sees_syncs_and_only_from_its_package():
    """The census itself: it finds each kind of sync made from frames in its root, and ignores others."""
    here = Census(root=str(Path(__file__).resolve()))
    with here:
        _syncing(torch.arange(4))
    kinds = {op for op, _, _, _ in here.syncs}
    assert {"bincount", "index_put_[bool]", "_local_scalar_dense", "nonzero"} <= kinds
    elsewhere = Census()  # rayexperts/: this file's calls are not its concern
    with elsewhere:
        _syncing(torch.arange(4))
    assert not elsewhere.syncs and not elsewhere.ops


# ------------------------------------------------------------------------------ F3: evaluation sums


def _bincount_reference(acc: EvalAccumulator, view: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """The accumulation before GPU finding F3 (bincount), for comparison."""
    probs = torch.softmax(logits.float(), dim=1)
    conf, pred = probs.max(1)
    correct = (pred == targets).double()
    c, nb = acc.num_classes, acc.num_bins
    acc.correct[view] += torch.bincount(targets, weights=correct, minlength=c)
    acc.total[view] += torch.bincount(targets, minlength=c).double()
    b = torch.clamp((conf * nb).long(), max=nb - 1)
    acc.bins[view][0] += torch.bincount(b, minlength=nb).double()
    acc.bins[view][1] += torch.bincount(b, weights=conf.double(), minlength=nb)
    acc.bins[view][2] += torch.bincount(b, weights=correct, minlength=nb)


def test_evaluation_sums_are_bit_identical_to_bincount():
    from rayexperts.eval.metrics import pairwise_kl

    gen = torch.Generator().manual_seed(0)
    for c in (3, 100):
        new, old = EvalAccumulator(["v"], c), EvalAccumulator(["v"], c)
        for n in (1, 7, 128, 300):
            logits, targets = torch.randn(n, c, generator=gen) * 3, torch.randint(0, c, (n,), generator=gen)
            experts = [torch.randn(n, c, generator=gen) for _ in range(3)]
            new.update("v", logits, targets)
            new.update_expert_kl(experts, targets)
            _bincount_reference(old, "v", logits, targets)
            kl = pairwise_kl(experts).double()
            old.kl_sum += torch.bincount(targets, weights=kl, minlength=c)
            old.kl_count += torch.bincount(targets, minlength=c).double()
        for a, b in zip(new._tensors(), old._tensors()):
            assert a.dtype == torch.float64 and torch.equal(a, b)


# ------------------------------------------------------------------------------ F7: evaluation in fp32


@pytest.mark.parametrize("method", ["mllt", "ncl"])  # mllt: 3 experts, ensemble and PC views; ncl: MoCo branches
def test_evaluation_logits_are_float32_under_bf16_autocast(method, monkeypatch):
    monkeypatch.setattr(LoopOptions, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    seen: dict[str, set] = {}
    original = EvalAccumulator.update

    def record(self, view, logits, targets):
        seen.setdefault(view, set()).add(logits.dtype)
        return original(self, view, logits, targets)

    monkeypatch.setattr(EvalAccumulator, "update", record)
    run = Run(load_config(None, [f"method={method}", "run.verbose=false"]))
    batch = run.opts.batch(next(iter(run.eval_loaders[""])))
    with run.opts.autocast():  # the patched autocast does what CUDA's does to the heads
        logits, _, _ = run.method.predict(run.eval_model, batch.images)
    assert logits["expert0"].dtype == torch.bfloat16
    evaluate(run.method, run.eval_model, _Steps(run.eval_loaders[""], 2), run.opts)
    assert set(seen) == set(run.views) and len(seen) >= 4
    assert all(d == {torch.float32} for d in seen.values()), seen


# ------------------------------------------------------------------------------ F6: the cache plan


class _Images(ImageSource):
    """``n`` images of one ``shape``, never allocated as a whole (a split of any size)."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        self.labels, self.shape = np.zeros(n, dtype=np.int64), shape

    def __getitem__(self, i: int):
        return torch.empty(self.shape, dtype=torch.uint8), 0


def _data(train_gib: float = 2.0):
    shape = (3, 224, 224)
    n = int(train_gib * 2**30 / (3 * 224 * 224))
    return SimpleNamespace(name="big-lt", train=_Images(n, shape), val=None, test=_Images(100, shape))


GIB = 2**30
CUDA = torch.device("cuda", 0)  # a device object only: nothing is allocated on it


@pytest.fixture
def free_gpu(monkeypatch):
    """``torch.cuda.mem_get_info`` of a fake GPU: set ``free_gpu.free`` (bytes); the host has 64 GiB."""
    state = SimpleNamespace(free=80 * GIB, calls=[])

    def mem_get_info(device=None):
        state.calls.append(device)
        return state.free, 80 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr("rayexperts.data.device._host_available_mb", lambda: 64 * 1024.0)
    return state


def test_auto_cache_checks_the_free_gpu_memory_of_every_process_on_it(free_gpu):
    data = _data(2.0)
    plan = plan_cache(data, "auto", 1e9, device=CUDA)
    assert plan.mode == "device" and plan.why.startswith("device: ")
    assert "× 1 process fits in 50% of 81,920 MB free on cuda:0" in plan.why
    assert free_gpu.calls == [CUDA]
    free_gpu.free = 1 * GIB  # 2 GiB decoded does not fit in half of 1 GiB: the host cache
    plan = plan_cache(data, "auto", 1e9, device=CUDA)
    assert plan.mode == "host" and "> 50% of 1,024 MB free" in plan.why and "available host memory" in plan.why
    free_gpu.free = 10 * GIB  # fits for 2 processes (4 GiB <= 5 GiB), not for 4 (8 GiB)
    assert plan_cache(data, "auto", 1e9, device=CUDA, sharing=2).mode == "device"
    plan = plan_cache(data, "auto", 1e9, device=CUDA, sharing=4)
    assert plan.mode == "host" and "× 4 processes" in plan.why
    big = _data(40.0)  # nor in half of the host's 64 GiB for 4 processes: no cache
    plan = plan_cache(big, "auto", 1e9, device=CUDA, sharing=4)
    assert plan.mode == "off" and "available host memory" in plan.why
    assert plan_cache(data, "auto", 1024, device=CUDA).mode == "off"  # data.cache_limit_mb still applies first


def test_explicit_device_cache_that_does_not_fit_names_the_sizes(free_gpu):
    free_gpu.free = 5 * GIB
    with pytest.raises(DataError, match=r"data.cache=device: big-lt's 14366 images, 2062.3 MB decoded; "
                                        r"2,062 MB decoded × 2 processes = 4,125 MB > 50% of 5,120 MB free"):
        plan_cache(_data(2.0), "device", 1e9, device=CUDA, sharing=2)
    plan = plan_cache(_data(2.0), "device", 1e9, device=CUDA, sharing=1)
    assert plan.mode == "device" and "fits in 50% of 5,120 MB free" in plan.why
    assert plan_cache(_data(2.0), "host", 1e9, device=CUDA).mode == "host"


def test_the_cpu_plan_is_unchanged(free_gpu):
    data = _data(0.001)
    plan = plan_cache(data, "auto", 4096, device=torch.device("cpu"), sharing=4)
    images = len(data.train.labels) + 100
    assert plan.mode == "device"
    assert plan.why == f"{images} images, {plan.megabytes:.1f} MB decoded <= data.cache_limit_mb=4096"
    assert plan_cache(data, "device", 4096).why == "data.cache=device"
    assert free_gpu.calls == []  # no GPU asked


def test_processes_per_gpu_and_what_the_run_passes(monkeypatch):
    assert [processes_per_device(g) for g in (1, 2, 0.5, 0.25, 0.3, 0.1, 1 / 3)] == [1, 1, 2, 4, 3, 10, 3]
    assert processes_per_device(0.25, use_gpu=False) == 1
    seen = {}
    real = plan_cache

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr("rayexperts.engine.run.plan_cache", spy)
    Run(load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.25", "run.verbose=false"]))
    assert seen == {"device": torch.device("cpu"), "sharing": 4}


# ------------------------------------------------------------------------------ F5 / F2: host cache, index order


def test_pinned_staging_gathers_into_two_reused_buffers():
    images = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).reshape(10, 3, 2, 2)
    labels = torch.arange(10) * 7
    staging = PinnedStaging(torch.device("cpu"), pin=False)  # the CUDA path's gathers, without pinning
    ptrs = []
    for index in (torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9]), torch.tensor([2, 6, 5]), torch.tensor([0, 8])):
        x, y = staging.copy((images, labels), index)
        assert torch.equal(x, images[index]) and torch.equal(y, labels[index])
        ptrs.append(x.data_ptr())
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] != ptrs[0]  # two buffers in turn, reused (a shorter batch too)


def test_host_and_device_caches_give_the_same_batches_on_a_cpu():
    """On a CPU neither cache moves anything: the host cache has no staging, and both give the
    numbers of plain indexing; the loader's order lives where the split does."""
    source = ArraySource(np.random.default_rng(0).integers(0, 255, (20, 1, 8, 8), dtype=np.uint8), np.arange(20) % 3)
    host = CachedSplit(source, "test", torch.device("cpu"), on_device=False)
    dev = CachedSplit(source, "test", torch.device("cpu"), on_device=True)
    assert host.staging is None and dev.staging is None
    index = torch.tensor([4, 2, 19, 0])
    for split in (host, dev):
        x, y = split.batch(index)
        assert torch.equal(x, torch.from_numpy(source.images)[index]) and y.tolist() == [1, 2, 1, 0]


# ------------------------------------------------------------------------------ F4: the nvJPEG race


def test_device_decoding_syncs_the_stream_once_per_batch_on_cuda_only(monkeypatch):
    import torchvision.io
    from torchvision.io import encode_jpeg

    from rayexperts.data.encoded import decode_batch

    events = []

    class Stream:
        def synchronize(self):
            events.append("sync")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: events.append(("stream", device)) or Stream())
    real = torchvision.io.decode_jpeg

    def decode_jpeg(blobs, mode, device):
        events.append("decode")
        return real(blobs, mode=mode, device="cpu")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    blobs = [encode_jpeg(torch.full((3, 8, 8), v, dtype=torch.uint8)) for v in (10, 200)]
    names = SimpleNamespace(describe=lambda i: f"image {i}")
    out = decode_batch(blobs, torch.device("cpu"), names, [0, 1])  # type: ignore[arg-type]
    assert events == ["decode"] and len(out) == 2
    events.clear()
    decode_batch(blobs, CUDA, names, [0, 1])  # type: ignore[arg-type]
    assert events == [("stream", CUDA), "sync", "decode"]


# ------------------------------------------------------------------------------ F14: a fractional GPU


def test_a_one_worker_run_on_a_gpu_share_caps_its_memory_and_names_its_device(monkeypatch):
    from rayexperts.engine import worker

    calls = []

    class FakeRun:
        def __init__(self, cfg, rank, world, device):
            calls.append(("run", device))

        def compile(self):
            pass

    monkeypatch.setattr(worker, "Run", FakeRun)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append(("fraction", fraction, device)))
    for share, expected in ((0.25, [("fraction", 0.25, CUDA), ("run", CUDA)]), (1.0, [("run", CUDA)])):
        calls.clear()
        cfg = load_config(None, ["scaling.use_gpu=true", f"scaling.gpus_per_worker={share}"])
        worker._one_worker_run({"config": to_dict(cfg)})
        assert calls == expected
    calls.clear()
    worker._one_worker_run({"config": to_dict(load_config(None, []))})
    assert calls == [("run", torch.device("cpu"))]


# ------------------------------------------------------------------------------ the GPU check script


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("FAIL")]
    passed = [ln for ln in lines if ln.startswith("PASS")]
    for name in ("A.ce.placement", "A.ncl.eval_view_dtypes", "A.cbd.loss_finite", "E.resume_is_exact"):
        assert any(ln.startswith(f"PASS {name}") for ln in passed), name
    assert all(any(ln.startswith(f"INFO H.{m}.epoch") for ln in lines) for m in METHODS.builtin_names())
    doc = json.loads((out / "gpu_check.json").read_text())
    assert {"device", "torch", "cpu_smoke", "data", "summary", "parts", "lines"} <= set(doc)
    assert doc["device"] == "cpu" and doc["cpu_smoke"] and doc["data"] == "digits-lt"
    assert set(doc["parts"]) == {"A", "E", "H"} and all(p["status"] == "PASS" for p in doc["parts"].values())
    assert doc["summary"]["fail"] == 0 and doc["summary"]["pass"] == len(passed)


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("INFO gpu_check no CUDA device")
    assert len(done.stdout.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
