"""Part H, throughput for paper-protocol wall-time estimates: one epoch of every method with its CIFAR-10-LT IF 100
preset (eager; digits on the CPU smoke run, a few steps scaled to the epoch): images/s, seconds per epoch and per
evaluation, and the preset's whole run in hours."""

from __future__ import annotations

import math

import pytest

from rayexperts.diagnostics.runs import Steps, make_run, preset_of, train_steps
from rayexperts.engine.loop import evaluate, evaluate_splits
from rayexperts.registry import METHODS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", METHODS.names())
def test_one_epoch(method, setup, note):
    run = make_run(setup, method, "data.cache=auto", preset=True, teacher_steps=None)
    bs = int(run.cfg.train.batch_size)
    train_steps(run, 0, setup.steps(5, 1))  # warm-up
    steps = len(run.train_loader)
    timed_steps = setup.steps(steps, min(steps, 3))  # the smoke run: a few steps, scaled to the epoch
    seconds, stats = setup.timed(lambda: train_steps(run, 0, timed_steps))
    seconds *= steps / timed_steps
    if setup.smoke:  # one batch per evaluation split, scaled to the split
        eval_s = sum(setup.timed(lambda: evaluate(run.method, run.eval_model, Steps(loader, 1), run.opts))[0]
                     * len(loader) for loader in run.eval_loaders.values())
    else:
        eval_s, _ = setup.timed(lambda: evaluate_splits(run))
    epochs, every = int(run.cfg.train.epochs), int(run.cfg.eval.every)
    total_h = (epochs * seconds + math.ceil(epochs / every) * eval_s) / 3600
    note.info(f"{method}.epoch", preset=preset_of(method, setup.data_name) or "none", img_s=steps * bs / seconds,
              epoch_s=seconds, loop_img_s=stats["images_per_sec"], eval_s=eval_s, steps=steps, batch=bs,
              experts=int(run.cfg.model.num_experts), backbone=str(run.cfg.model.backbone), cache=run.cache.mode,
              preset_epochs=epochs, preset_run_h=total_h)
    assert seconds > 0 and math.isfinite(stats["loss"])
