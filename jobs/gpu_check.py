"""The GPU check: runs the GPU tests (``tests/gpu``, marked ``gpu``) part by part under time budgets, prints one
line per check and writes ``gpu_check.json`` (docs/gpu.md "jobs/gpu_check.py").

    python jobs/gpu_check.py [--out runs/gpu_check] [--data PARQUET] [--budget 480] [--parts ACBEFHDG] [--rows 540]
    python jobs/gpu_check.py --cpu-smoke [--out DIR]    # parts A, E and H on the CPU, digits-lt, in seconds

Part X is ``tests/gpu/test_x_*.py`` (A placement and dtypes, B syncs and throughput, C the nvJPEG race,
D torch.compile, E resume and cuDNN, F two ranks with gloo, G memory, H throughput per method). Each part has its
own time budget and the whole ``--budget`` seconds: a test that starts after its part's budget (or with under 5 s of
the whole left) is skipped, so one slow part does not stop the others. Each line reads
``<PASS|FAIL|SKIP|INFO> <part>.<name> key=value ...``: a test's outcome with the numbers it noted, or an INFO line
it wrote; ``gpu_check.json`` in ``--out`` is rewritten after every test. Runs in one process without Ray, on
CIFAR-10-LT IF 100 (``--data``: a CIFAR-10 Parquet file) with ResNet-32, else digits-lt. Exit status 1 if a check
failed, else 0. Without CUDA (and without ``--cpu-smoke``) every test is reported skipped and the exit status is 0.
``--rows SECONDS`` then trains the CIFAR-10-LT paper rows (rayexperts/launch/rows.py, into ``OUT/rows``; CUDA only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from rayexperts.diagnostics.runs import Setup  # noqa: E402

TESTS = ROOT / "tests" / "gpu"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"
BUDGETS = {"A": 90, "B": 90, "C": 45, "D": 180, "E": 50, "F": 60, "G": 10, "H": 120}  # seconds
ORDER = "ACBEFHDG"  # compile last but memory: the slowest and the most likely to run out of time
SMOKE_PARTS = "AEH"


class GpuCheck:
    """The pytest plugin ``gpu_check``: the setup the tests ask for (``tests/gpu/conftest.py``), the time budgets,
    and the record of every test's line, written to ``gpu_check.json``."""

    def __init__(self, setup: Setup, out: Path, budget: float, on_cpu: bool) -> None:
        self.__name__ = "gpu_check"  # the name pytest registers it under (tests/gpu/conftest.py asks for it)
        self.setup, self.out, self.on_cpu = setup, out, on_cpu
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.part: str | None = None
        self.part_start = self.start
        self.lines: list[dict[str, Any]] = []
        self.shown: set[str] = set()  # the errors whose traceback is printed
        self.parts = setup.parts

    # -------------------------------------------------------------------------------- the record

    def line(self, status: str, part: str, name: str, **numbers: Any) -> None:
        text = " ".join(f"{k}={_fmt(v)}" for k, v in numbers.items())
        print(f"{status} {part}.{name} {text}".rstrip(), flush=True)
        entry = {"status": status, "part": part, "name": name, **{k: _plain(v) for k, v in numbers.items()}}
        self.lines.append(entry)
        if part in BUDGETS:
            self.parts.setdefault(part, {"lines": []})["lines"].append(entry)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        summary = Counter(line["status"] for line in self.lines)
        cuda = self.setup.cuda
        doc = {
            "device": str(self.setup.device),
            "device_name": torch.cuda.get_device_name(self.setup.device) if cuda else "cpu",
            "torch": torch.__version__,
            "cpu_smoke": self.setup.smoke,
            "data": self.setup.data_name,
            "seconds": round(time.perf_counter() - self.start, 1),
            "summary": {"pass": summary["PASS"], "fail": summary["FAIL"], "info": summary["INFO"],
                        "skip": summary["SKIP"]},
            "parts": self.parts,
            "lines": self.lines,
        }
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    # -------------------------------------------------------------------------------- parts and budgets

    def _open(self, part: str) -> None:
        self.part, self.part_start = part, time.perf_counter()
        budget = max(BUDGETS[part], 300) if self.on_cpu else BUDGETS[part]  # a loaded CPU: no skips
        self.setup.deadline = min(self.part_start + budget, self.deadline)
        self.parts.setdefault(part, {"lines": []})
        if self.setup.cuda:
            torch.cuda.reset_peak_memory_stats(self.setup.device)

    def _close(self) -> None:
        if self.part is None:
            return
        entry = self.parts[self.part]
        entry["seconds"] = round(time.perf_counter() - self.part_start, 1)
        if self.setup.cuda:
            entry["peak_mb"] = round(torch.cuda.max_memory_allocated(self.setup.device) / 2**20, 1)
            torch.cuda.empty_cache()
        statuses = {line["status"] for line in entry["lines"]}
        entry["status"] = "FAIL" if "FAIL" in statuses else "PASS" if "PASS" in statuses else "SKIP"
        self.part = None
        self.write()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        part = part_of(item.nodeid)
        if part != self.part:
            self._close()
            self._open(part)
        now = time.perf_counter()
        if self.deadline - now < 5:
            pytest.skip("the whole check's time budget is spent")
        if self.setup.deadline <= now:
            pytest.skip(f"part {part}'s time budget is spent")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        part, name = part_of(report.nodeid), name_of(report.nodeid)
        numbers = {k: v for k, v in report.user_properties if not k.startswith("INFO ")}
        if report.skipped and report.when in ("setup", "call"):
            self.line("SKIP", part, name, reason=_skip_reason(report))
        elif report.failed:
            self.line("FAIL", part, name if report.when == "call" else f"{name}.{report.when}", **numbers,
                      error=_error(report))
            if (error := _error(report)) not in self.shown:  # a module fixture's error fails each of its tests
                self.shown.add(error)
                print("\n".join(report.longreprtext.splitlines()[-12:]), flush=True)
        elif report.when == "call":
            self.line("PASS", part, name, **numbers)
        if report.when == "call":
            for key, info in report.user_properties:
                if key.startswith("INFO "):
                    self.line("INFO", part, key[5:], **info)
        if report.when == "teardown":
            self.write()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._close()
        s = Counter(line["status"] for line in self.lines)
        self.line("INFO", "all", "done", seconds=time.perf_counter() - self.start, passed=s["PASS"],
                  failed=s["FAIL"], skipped=s["SKIP"])
        self.write()


def part_of(nodeid: str) -> str:
    """``tests/gpu/test_a_placement.py::...`` -> ``A``."""
    found = re.search(r"test_([a-z])_\w+\.py::", nodeid)
    return found.group(1).upper() if found else "?"


def name_of(nodeid: str) -> str:
    """``...::test_placement[ce]`` -> ``ce.placement``; ``...::test_resume_is_exact`` -> ``resume_is_exact``."""
    test = nodeid.split("::")[-1]
    base, _, param = test.partition("[")
    base = base.removeprefix("test_")
    return f"{param.rstrip(']')}.{base}" if param else base


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _error(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else report.longreprtext
    return (text.splitlines() or [""])[0][:200]


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


def part_files() -> dict[str, Path]:
    """Part letter -> its test file."""
    return {p.name[5].upper(): p for p in sorted(TESTS.glob("test_?_*.py"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 Parquet file (else digits-lt)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--parts", default=None,
                   help=f"which parts, in order (default {ORDER}; --cpu-smoke: {SMOKE_PARTS})")
    p.add_argument("--cpu-smoke", action="store_true", help="parts A, E and H on the CPU with digits-lt, tiny sizes")
    p.add_argument("--rows", type=float, default=0.0,
                   help="then train the CIFAR-10-LT paper rows for this many seconds (rayexperts/launch/rows.py, "
                   "into OUT/rows; CUDA only)")
    p.add_argument("--force-cpu", action="store_true", help=argparse.SUPPRESS)  # development: any part on the CPU
    args = p.parse_args(argv)
    files = part_files()
    parts = (args.parts or (SMOKE_PARTS if args.cpu_smoke else ORDER)).upper()
    if unknown := sorted(set(parts) - set(files)):
        print(f"error: --parts: unknown part(s) {', '.join(unknown)}: choose from {''.join(sorted(files))}",
              file=sys.stderr)
        return 2
    on_cpu = bool(args.cpu_smoke or args.force_cpu)
    cuda = torch.cuda.is_available() and not on_cpu
    if not cuda and not on_cpu:
        print("INFO gpu_check no CUDA device (torch.cuda.is_available() is False): the GPU tests are skipped; "
              "--cpu-smoke runs parts A, E and H on the CPU", flush=True)
    if on_cpu:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    setup = Setup.create(device, args.data, root, smoke=bool(args.cpu_smoke))
    plugin = GpuCheck(setup, Path(args.out), args.budget, on_cpu)
    print(f"INFO gpu_check.start device={device} data={setup.data_name} parts={parts} budget_s={args.budget:g}",
          flush=True)
    try:
        code = pytest.main([*(str(files[part]) for part in parts), "-m", "gpu", "-p", "no:cacheprovider",
                            "-p", "no:terminal", "-o", "addopts=", "--strict-markers", "-s",
                            "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")], plugins=[plugin])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        print(f"error: pytest stopped with exit status {int(code)} ({code.name})", file=sys.stderr)
        return 1
    status = 1 if any(line["status"] == "FAIL" for line in plugin.lines) else 0
    if args.rows > 0 and cuda:  # the paper rows after the checks, in child processes (rayexperts/launch/rows.py)
        from rayexperts.cli import main as rayexperts_main

        torch.cuda.empty_cache()
        status = max(status, rayexperts_main(["gpu-rows", "--out", str(Path(args.out) / "rows"), "--data", args.data,
                                              "--budget", str(args.rows)]))
    return status


if __name__ == "__main__":
    sys.exit(main())
