"""The checks of the GPU path (docs/gpu.md "jobs/gpu_check.py"): tests marked ``gpu``, skipped without CUDA.

``jobs/gpu_check.py`` runs them part by part (``test_<part>_*.py``) under its time budgets and writes their lines and
``gpu_check.json``; its ``--cpu-smoke`` runs some on the CPU. Plain ``pytest tests/gpu`` on a GPU machine runs them
too. Nothing here imports Ray (a lent GPU machine has none): the runs are :mod:`rayexperts.diagnostics.runs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rayexperts.diagnostics.runs import Setup

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.parquet"
NO_CUDA = "needs CUDA (torch.cuda.is_available() is False)"


def _runner(config: pytest.Config) -> Any:
    """jobs/gpu_check.py's plugin (``setup``, ``on_cpu``), when it runs the tests."""
    return config.pluginmanager.get_plugin("gpu_check")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runner = _runner(config)
    if torch.cuda.is_available() or (runner is not None and runner.on_cpu):
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Where the checks run: the runner's :class:`Setup`, else this machine's GPU on the shared CIFAR-10 file
    (digits-lt without it)."""
    runner = _runner(request.config)
    if runner is not None:
        return runner.setup
    return Setup.create(torch.device("cuda", torch.cuda.current_device()), DEFAULT_DATA, tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="session")
def cuda(setup: Setup) -> Setup:
    """The setup, for a check that needs CUDA even where the runner runs the others on the CPU."""
    if not setup.cuda:
        pytest.skip(NO_CUDA)
    return setup


class Note:
    """Numbers for the report: ``note(key=value, ...)`` on this test's PASS/FAIL line, ``note.info(name, ...)`` an
    INFO line of its own (pytest's ``record_property``: the runner reads them from the test's report)."""

    def __init__(self, record: Any) -> None:
        self.record = record

    def __call__(self, **numbers: Any) -> None:
        for key, value in numbers.items():
            self.record(key, value)

    def info(self, name: str, **numbers: Any) -> None:
        self.record(f"INFO {name}", numbers)


@pytest.fixture
def note(record_property: Any) -> Note:
    return Note(record_property)
