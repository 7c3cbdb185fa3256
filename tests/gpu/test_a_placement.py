"""Part A, placement and dtypes (GPU findings F15, F8, F7): every registered method (CBD with two briefly trained
CE teachers; methods added later included) on the device cache, a few steps under the dispatch census: no op in
``rayexperts/`` mixes devices, the loss ops get float32, the loss is finite, every evaluation view's logits are
float32, and no step syncs beyond the budget the CPU census holds (tests/test_gpu_path.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rayexperts.diagnostics.census import EVAL_BUDGET, TRAIN_BUDGET, top
from rayexperts.diagnostics.runs import census, make_run, view_dtypes
from rayexperts.registry import METHODS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=METHODS.names())
def probed(request, setup) -> SimpleNamespace:
    """A few training steps and one evaluation batch of the method, each under the census."""
    run = make_run(setup, request.param)
    steps = setup.steps(5, 2)
    dtypes: dict[str, set] = {}
    with view_dtypes(dtypes):
        train, evaluation, loss = census(run, steps)
    setup.sync()
    out = SimpleNamespace(train=train, evaluation=evaluation, loss=loss.cpu(), dtypes=dtypes, steps=steps,
                          views=list(run.views))
    del run
    if setup.cuda:
        torch.cuda.empty_cache()
    return out


def test_placement(probed, note):
    t = probed.train
    note(ops_per_step=sum(t.ops.values()) // probed.steps, mixed=top(t.mixed),
         h2d_per_step=sum(t.h2d.values()) / probed.steps, cpu_ops_per_step=sum(t.cpu_ops.values()) / probed.steps)
    assert not t.mixed and not probed.evaluation.mixed


def test_loss_dtypes(probed, note):
    note(loss_ops=dict(probed.train.loss_dtypes), total=str(probed.loss.dtype))
    assert set(probed.train.loss_dtypes) <= {"float32"} and probed.loss.dtype == torch.float32


def test_loss_finite(probed, note):
    note(loss=float(probed.loss[-1]))
    assert bool(torch.isfinite(probed.loss).all())


def test_eval_view_dtypes(probed, note):
    note(views=len(probed.dtypes), dtypes=sorted(set().union(*probed.dtypes.values())))
    assert set(probed.dtypes) == set(probed.views) and all(d == {"float32"} for d in probed.dtypes.values())


def test_syncs(probed, note):
    t, steps = probed.train, probed.steps
    note(per_step=sum(t.device_syncs().values()) / steps, top=top(t.device_syncs()),
         d2h_per_step=sum(t.d2h.values()) / steps, h2d_top=top(t.h2d))
    per_steps = {key: (n * steps, why) for key, (n, why) in TRAIN_BUDGET.items()}
    assert t.over_budget(per_steps) == {} and probed.evaluation.over_budget(EVAL_BUDGET) == {}
