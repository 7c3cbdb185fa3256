"""The GPU path, checked on a CPU (GPU findings F3-F7, F14; the GPU check script's CPU-safe parts).

The dispatch census runs one training step and one evaluation batch of every registered method under a
``TorchDispatchMode`` and fails on every op issued from ``rayexperts/`` code that must read a value back
from the device (a host-device sync on a GPU) beyond a fixed, named budget."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_fixtures import make_cifar_parquet
from helpers import without_ray

from rayexperts.config import ConfigError, DataSection, load_config
from rayexperts.data.device import CachedSplit, PinnedStaging, plan_cache, processes_per_device
from rayexperts.data.errors import DataError
from rayexperts.data.sources import ArraySource, ImageSource
from rayexperts.diagnostics.census import EVAL_BUDGET, TRAIN_BUDGET, Census
from rayexperts.diagnostics.runs import Setup, Steps, run_config, with_prerequisites
from rayexperts.diagnostics.runs import census as step_census
from rayexperts.engine.loop import LoopOptions, evaluate
from rayexperts.engine.run import Run
from rayexperts.eval.metrics import EvalAccumulator
from rayexperts.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ the dispatch census

# The census, its op lists, budgets and host-side exemptions: rayexperts/diagnostics/census.py (shared with the
# GPU tests in tests/gpu).


def census_run(method: str, tmp_path: Path, *extra: str) -> Run:
    """``method`` on digits-lt (or ``extra``'s data) with the device cache, its prerequisites (CBD's teachers,
    RIDE-EA's stage 1) trained for a few steps in this process."""
    setup = Setup.create(torch.device("cpu"), None, tmp_path)
    cfg = run_config(setup, method, *extra)
    try:
        METHODS.get(method).prerequisites(cfg)
    except ConfigError as e:  # a two-stage method added later: give it a case in diagnostics.runs.run_config
        pytest.skip(f"{method}: its first stage cannot be composed here ({e})")
    return Run(with_prerequisites(setup, cfg, steps=2))


def census(run: Run) -> tuple[Census, Census]:
    """One training step (batch from the loader, training_step, backward, optimizer step, after_step) and
    one evaluation batch through ``evaluate``, each under its own census."""
    train, evaluation, _ = step_census(run)
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


AUGMENTS = typing.get_args(typing.get_type_hints(DataSection)["augment"])  # every data.augment choice


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


def _on_two_devices() -> None:
    cpu = torch.arange(6.0).reshape(2, 3)
    dev = cpu.to("meta")  # line +2: a host-to-device copy
    torch.log_softmax(dev, 1)
    torch.log_softmax(dev.bfloat16(), 1)
    torch.bincount(torch.arange(3))  # line +5: host-side work, no sync
    with contextlib.suppress(Exception):
        cpu + dev  # line +7: mixed devices
    with contextlib.suppress(Exception):
        dev.nonzero()  # line +9: a sync on the device
    with contextlib.suppress(Exception):
        dev.to("cpu")  # line +11: a device-to-host copy
    dev * torch.tensor(2.0)  # a 0-dim CPU scalar with a device tensor: not mixed


def test_the_census_of_a_run_on_another_device():
    """What the GPU tests record (tests/gpu/test_a_placement.py), with the "meta" device standing in for a GPU:
    copies each way, CPU-only ops (which are no syncs), mixed devices, device syncs and the loss ops' dtypes."""
    census = Census(root=str(Path(__file__).resolve()), device=torch.device("meta"))
    with census:
        _on_two_devices()
    first = _on_two_devices.__code__.co_firstlineno  # the def line: "line +n" below it
    at = {n: ("", "_on_two_devices", first + n) for n in range(13)}
    assert census.h2d == {at[2]: 1} and census.d2h == {at[11]: 1}
    assert census.mixed == {("add", *at[7]): 1}
    assert census.syncs == {("nonzero", *at[9]): 1} and census.device_syncs() == census.syncs
    assert set(census.cpu_ops) == {at[1], at[5]}  # arange/view, arange/bincount: all on the host
    assert census.loss_dtypes == {"float32": 1, "bfloat16": 1}
    assert census.over_budget({}) == {f"nonzero :{first + 9} (_on_two_devices)": 1}
    assert census.over_budget({("nonzero", ""): (1, "allowed here")}) == {}


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
    evaluate(run.method, run.eval_model, Steps(run.eval_loaders[""], 2), run.opts)
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

    monkeypatch.setattr("rayexperts.engine.loaders.plan_cache", spy)
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
    from rayexperts.engine import entry

    calls = []

    class FakeRun:
        def __init__(self, cfg, rank, world, device):
            calls.append(("run", device))

        def compile(self):
            pass

    monkeypatch.setattr("rayexperts.engine.run.Run", FakeRun)  # entry imports it when a run starts
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append(("fraction", fraction, device)))
    for share, expected in ((0.25, [("fraction", 0.25, CUDA), ("run", CUDA)]), (1.0, [("run", CUDA)])):
        calls.clear()
        cfg = load_config(None, ["scaling.use_gpu=true", f"scaling.gpus_per_worker={share}"])
        entry.one_worker_run(cfg)
        assert calls == expected
    calls.clear()
    entry.one_worker_run(load_config(None, []))
    assert calls == [("run", torch.device("cpu"))]


# ------------------------------------------------------------------------------ the GPU check script


def _gpu_check(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict | None]:
    """jobs/gpu_check.py run as on a lent GPU machine (``PYTHONPATH=.``, no Ray; ``without_ray`` fails the run on
    any attempt to import it): the finished process and its gpu_check.json (None when not written)."""
    env, attempts = without_ray(tmp_path, str(REPO))
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert not attempts.exists(), attempts.read_text()
    found = out / "gpu_check.json"
    return done, json.loads(found.read_text()) if found.exists() else None


def test_gpu_check_without_cuda_reports_every_gpu_test_skipped(tmp_path):
    """The runner of tests/gpu on a machine without CUDA: every test of every part collected (so each imports
    without Ray) and reported skipped, in its lines and gpu_check.json; exit status 0."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done, doc = _gpu_check(tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("INFO gpu_check no CUDA device (torch.cuda.is_available() is False)")
    skips = [ln for ln in done.stdout.splitlines() if ln.startswith("SKIP ")]
    assert doc is not None and doc["device"] == "cpu" and not doc["cpu_smoke"]
    assert doc["summary"] == {"pass": 0, "fail": 0, "info": 1, "skip": len(skips)}  # info: the closing "done" line
    assert set(doc["parts"]) == set("ABCDEFGH") and all(p["status"] == "SKIP" for p in doc["parts"].values())
    lines = [ln for ln in doc["lines"] if ln["status"] == "SKIP"]
    assert len(lines) == len(skips) and all(ln["reason"].startswith("needs CUDA") for ln in lines)
    names = {(ln["part"], ln["name"]) for ln in lines}
    for method in METHODS.builtin_names():  # every built-in method (the runner's process has no test's toys)
        assert {("A", f"{method}.placement"), ("A", f"{method}.syncs"), ("H", f"{method}.one_epoch")} <= names
    assert ("E", "resume_is_exact") in names and ("D", "ncl.loss_vs_eager") in names


def test_gpu_check_skips_the_tests_its_budget_leaves_no_time_for(tmp_path):
    """A test that would start with under 5 s of ``--budget`` left is skipped and says why; nothing fails."""
    done, doc = _gpu_check(tmp_path, "--cpu-smoke", "--parts", "E", "--budget", "4", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert doc is not None and doc["parts"]["E"]["status"] == "SKIP" and doc["summary"]["pass"] == 0
    reasons = {ln["reason"] for ln in doc["lines"] if ln["status"] == "SKIP"}
    assert reasons == {"the whole check's time budget is spent"}
    assert doc["summary"]["skip"] == len(doc["parts"]["E"]["lines"]) >= 3  # every test of part E


def test_gpu_check_refuses_an_unknown_part(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "jobs" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)  # type: ignore[union-attr]
    assert set(gpu_check.part_files()) == set("ABCDEFGH") == set(gpu_check.BUDGETS)
    assert gpu_check.main(["--parts", "AZ", "--out", "never-written"]) == 2
    assert "error: --parts: unknown part(s) Z: choose from ABCDEFGH" in capsys.readouterr().err
    assert gpu_check.name_of("tests/gpu/test_a_placement.py::test_placement[ride_ea]") == "ride_ea.placement"
    assert gpu_check.part_of("tests/gpu/test_e_resume.py::test_resume_is_exact") == "E"


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """``--cpu-smoke``: parts A, E and H of tests/gpu on the CPU with digits-lt, without Ray (it keeps the GPU
    tests runnable; it proves nothing about the GPU path)."""
    done, doc = _gpu_check(tmp_path, "--cpu-smoke", "--budget", "900", timeout=1000)  # a loaded CPU: no skips
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("FAIL")]
    passed = [ln for ln in lines if ln.startswith("PASS")]
    for name in ("A.ce.placement", "A.ncl.eval_view_dtypes", "A.cbd.loss_finite", "A.ride_ea.syncs",
                 "E.resume_is_exact", "E.optimizer_state_on_device_after_resume"):
        assert any(ln.startswith(f"PASS {name} ") for ln in passed), name
    assert all(any(ln.startswith(f"INFO H.{m}.epoch ") for ln in lines) for m in METHODS.builtin_names())
    assert doc is not None and {"device", "torch", "cpu_smoke", "data", "summary", "parts", "lines"} <= set(doc)
    assert doc["device"] == "cpu" and doc["cpu_smoke"] and doc["data"] == "digits-lt"
    assert set(doc["parts"]) == {"A", "E", "H"} and all(p["status"] == "PASS" for p in doc["parts"].values())
    assert doc["summary"]["fail"] == 0 and doc["summary"]["pass"] == len(passed)
