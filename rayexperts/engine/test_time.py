"""Test-time steps: views that learn on the unlabelled test images before they are evaluated (an engine
capability; SADE's test-time self-supervised aggregation is one, docs/methods.md §3.4).

A method offers them by name from ``Method.test_time_steps()``; each is a :class:`TestTimeStep`. The engine
freezes the trained model (eval mode, no gradient), feeds the step ``passes`` shuffled passes over the WHOLE
test split (every rank the same data and draws, so every rank learns the same view) in batches of
``batch_size``, each batch as two views of the step's augmentation (``augment``, a ``data.augment`` name), and
after each pass asks it whether it is done. The learnt view is then evaluated with the method's own views.
These views are transductive: their metrics rows carry ``transductive=True``, reports mark them, and no run
reports one as its headline view. ``eval.test_time`` says when they run: at the last evaluation (``last``,
the default), at every evaluation (``every``) or never (``off``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from rayexperts.methods.base import View


class TestTimeStep(Protocol):
    augment: str  # the two views' augmentation (a data.augment name)
    passes: int
    batch_size: int

    def start(self, device: torch.device) -> None: ...

    def step(self, logits1: list[Tensor], logits2: list[Tensor]) -> Tensor: ...

    def done(self) -> bool: ...

    def view(self) -> View: ...


def learn_views(run: Any, steps: dict[str, TestTimeStep], source: Any) -> dict[str, View]:
    """Run every test-time step of ``steps`` on the trained model of ``run`` (a :class:`~rayexperts.engine.run.Run`)
    over the held-out ``source`` (its images, never its labels); returns the learnt views by name."""
    method, model = run.method, run.eval_model
    views: dict[str, View] = {}
    model.eval()
    for name, step in steps.items():
        step.start(run.device)
        for number in range(int(step.passes)):
            for items in run.loaders.test_time_batches(source, step.augment, int(step.batch_size), number):
                batch = run.opts.batch(items)
                with torch.no_grad(), torch.autocast(run.device.type, enabled=False):
                    first = method.model_output(method.infer(model, batch.images)).logits
                    second = method.model_output(method.infer(model, batch.key_images)).logits
                with torch.autocast(run.device.type, enabled=False):
                    step.step([z.float() for z in first], [z.float() for z in second])
            if step.done():
                break
        views[name] = step.view()
    return views
