"""Where the seconds go: with ``RAYEXPERTS_TRACE=FILE`` set, the jobs and the workers they start append
``<unix time> <pid> <event>`` lines to FILE (imports done, Ray ready, a Train run's start, each epoch's
start, end of training and end of its report, the exit). ``jobs/bench_overhead.py`` reads them; unset,
a mark costs one environment lookup."""

from __future__ import annotations

import os
import time

TRACE_ENV = "RAYEXPERTS_TRACE"


def mark(event: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.6f}\t{os.getpid()}\t{event}\n")


def read(path: str) -> list[tuple[float, int, str]]:
    """The marks of a trace file, in time order."""
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t", 2) for line in f if line.strip()]
    return sorted((float(t), int(pid), event) for t, pid, event in rows)
