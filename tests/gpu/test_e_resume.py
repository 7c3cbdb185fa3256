"""Part E, resume and cuDNN (GPU finding F12): ce for 2 epochs against 1 + checkpoint + resume + 1 (exact on a CPU,
within the run-to-run noise of two straight runs on a GPU); optimizer state on the device after resume;
``cudnn.benchmark`` on/off step time; two runs with deterministic algorithms."""

from __future__ import annotations

import math
import tempfile
import warnings
from types import SimpleNamespace

import pytest
import torch

from rayexperts.diagnostics.runs import Repeat, make_run, state_diff, train_steps
from rayexperts.engine.fit import resume
from rayexperts.engine.loop import seed_epoch
from rayexperts.rundir import save_checkpoint

pytestmark = pytest.mark.gpu


def ce(setup):
    return make_run(setup, "ce", "train.epochs=2")


@pytest.fixture(scope="module")
def resumed(setup) -> SimpleNamespace:
    """Two straight epochs, and one epoch + checkpoint + a new run resumed from it + one epoch (``steps`` each)."""
    steps = setup.steps(30, 3)
    straight = ce(setup)
    for epoch in range(2):
        train_steps(straight, epoch, steps)
    first = ce(setup)
    train_steps(first, 0, steps)
    ckpt = tempfile.mkdtemp(dir=setup.root)
    save_checkpoint(ckpt, model=first.model, optimizer=first.optimizer, epoch=1, ident=first.ident)
    del first
    run = ce(setup)
    epoch = resume(run, ckpt)
    states = [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    on_device = all(t.device.type == setup.device.type for t in states if t.dim() > 0)
    train_steps(run, 1, steps)
    return SimpleNamespace(straight=straight, run=run, epoch=epoch, states=len(states), on_device=on_device,
                           steps=steps, setup=setup)


def test_optimizer_state_on_device_after_resume(resumed, note):
    note(epoch=resumed.epoch, tensors=resumed.states)
    assert resumed.epoch == 1 and resumed.states > 0 and resumed.on_device


def test_resume_is_exact(resumed, note):
    if resumed.setup.cuda:
        pytest.skip("a GPU's kernels are not bit-stable: test_resume_matches_within_noise")
    diff = state_diff(resumed.straight.model, resumed.run.model)
    note(max_abs_diff=diff, steps_per_epoch=resumed.steps)
    assert diff == 0.0


def test_resume_matches_within_noise(resumed, note):
    if not resumed.setup.cuda:
        pytest.skip("on a CPU resume is exact: test_resume_is_exact")
    again = ce(resumed.setup)
    for epoch in range(2):
        train_steps(again, epoch, resumed.steps)
    diff = state_diff(resumed.straight.model, resumed.run.model)
    noise = state_diff(resumed.straight.model, again.model)
    note(max_abs_diff=diff, run_to_run=noise, steps_per_epoch=resumed.steps)
    assert diff <= 10 * noise + 1e-5


def test_cudnn_benchmark(cuda, note):
    run = ce(cuda)
    train_steps(run, 0, 3)
    seed_epoch(run, 1)
    fixed = next(iter(run.train_loader))
    times = {}
    before = torch.backends.cudnn.benchmark
    try:
        for flag in (False, True):
            torch.backends.cudnn.benchmark = flag
            train_steps(run, 1, 5, Repeat(fixed))  # (re)tune
            t, _ = cuda.timed(lambda: train_steps(run, 1, 30, Repeat(fixed)))
            times[flag] = 1000 * t / 30
    finally:
        torch.backends.cudnn.benchmark = before
    note.info("cudnn_benchmark", off_ms_per_step=times[False], on_ms_per_step=times[True],
              speedup=times[False] / times[True])
    assert times[False] > 0 and times[True] > 0


def test_deterministic_runs(cuda, note):
    """Information: with ``train.deterministic=true`` (deterministic kernels, warn-only), whether two runs of 20
    steps end with identical weights, and which ops have no deterministic kernel."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = []
            for _ in range(2):
                r = make_run(cuda, "ce", "train.deterministic=true")
                train_steps(r, 0, 20)
                runs.append(r)
        diff = state_diff(*[r.model for r in runs])
        ops = sorted({str(w.message).split(" does not have a deterministic")[0][:60] for w in caught
                      if "deterministic" in str(w.message)})
        note.info("deterministic_runs", identical=diff == 0.0, max_abs_diff=diff, nondeterministic_ops=ops)
        assert math.isfinite(diff)  # both runs trained to finite weights
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[0], flags[1]
        torch.use_deterministic_algorithms(flags[2], warn_only=flags[3])
