"""Benchmark (not a test): the fixed costs of a run, a CBD job and a sweep trial, and where they go.

    python jobs/bench_overhead.py [--only train,cbd,sweep,import] [--out runs/bench_overhead]

Runs, one after the other, from a fresh process each and with a fresh local Ray instance:

* ``python jobs/train.py`` (the digits demo: CE, 30 epochs),
* ``python jobs/cbd_ens.py`` (the demo: 4 teachers at once, then the student),
* ``python jobs/sweep.py`` over ``tune_spaces/mllt.yaml`` with 2 one-worker trials of 4 epochs,
* ``import rayexperts`` and ``load_config`` of a preset,

each with ``RAYEXPERTS_TRACE`` set, and prints one row per command: its wall time, the summed training
seconds, and where the rest went (imports, Ray start, a Train run's start to its first epoch, the mean
per-epoch time outside training, teardown), with the targets of issue 14 beside them. Writes
``DIR/overhead.parquet`` and the traces.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from rayexperts.trace import TRACE_ENV, read  # noqa: E402


def traced(cmd: list[str], trace: Path, cwd: Path) -> tuple[float, float, float, list]:
    """(start, end, wall) of ``cmd`` run with ``RAYEXPERTS_TRACE=trace``, and its marks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({TRACE_ENV: str(trace), "PYTHONUNBUFFERED": "1"})
    start = time.time()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return start, end, end - start, read(str(trace))


def first(marks: list, prefix: str) -> float:
    return next(t for t, _, e in marks if e.startswith(prefix))


def last(marks: list, prefix: str) -> float:
    return max(t for t, _, e in marks if e.startswith(prefix))


def epochs_of(marks: list, run: str) -> list[tuple[float, float, float]]:
    """(start, trained, done) of each epoch of ``run``."""
    by: dict[int, dict[str, float]] = {}
    for t, _, e in marks:
        parts = e.split()
        if len(parts) == 4 and parts[0] == "epoch" and parts[2] == run:
            by.setdefault(int(parts[3]), {})[parts[1]] = t
    return [(v["start"], v["trained"], v["done"]) for _, v in sorted(by.items()) if len(v) == 3]


def per_epoch_overhead(epochs: list[tuple[float, float, float]]) -> float:
    """Mean time of an epoch outside its training: evaluation, tables, logs, checkpoint, report, and
    the gap to the next epoch's start."""
    spans = [(epochs[i + 1][0] if i + 1 < len(epochs) else e[2]) - e[0] - (e[1] - e[0]) for i, e in enumerate(epochs)]
    return sum(spans) / len(spans)


def train_row(work: Path) -> dict:
    start, end, wall, m = traced([sys.executable, str(ROOT / "jobs" / "train.py"), f"run.storage_path={work}",
                                  "run.name=demo", "run.verbose=false"], work / "train.trace", work)
    ep = epochs_of(m, "demo")
    training = sum(t - s for s, t, _ in ep)
    return {"command": "python jobs/train.py (digits CE, 30 epochs)", "wall_s": wall, "training_s": training,
            "imports_s": first(m, "imports done") - start, "ray_init_s": first(m, "ray ready") - first(m, "imports done"),
            "start_to_first_epoch_s": ep[0][0] - first(m, "fit start"), "per_epoch_overhead_s": per_epoch_overhead(ep),
            "teardown_s": end - last(m, "exit"), "wall_over_training": wall / training,
            "target": "wall <= 45 s; wall/training <= 3; per-epoch overhead <= 0.25 s"}


def cbd_row(work: Path) -> dict:
    start, end, wall, m = traced([sys.executable, str(ROOT / "jobs" / "cbd_ens.py"), f"run.storage_path={work}",
                                  "run.name=cbd", "run.verbose=false"], work / "cbd.trace", work)
    teachers = [epochs_of(m, f"teacher{i}") for i in range(4)]
    student = epochs_of(m, "student")
    stage1 = max(t[-1][2] for t in teachers) - first(m, "actor start teacher")
    training = sum(t - s for run in [*teachers, student] for s, t, _ in run)
    return {"command": "python jobs/cbd_ens.py (demo: 4 teachers, then the student)", "wall_s": wall,
            "training_s": training, "imports_s": first(m, "imports done") - start,
            "ray_init_s": first(m, "ray ready") - first(m, "imports done"), "stage1_s": stage1,
            "teacher_start_to_first_epoch_s": max(t[0][0] for t in teachers) - first(m, "actor start teacher"),
            "student_run_s": last(m, "fit end student") - first(m, "fit start student"),
            "start_to_first_epoch_s": student[0][0] - first(m, "fit start student"),
            "per_epoch_overhead_s": per_epoch_overhead(student), "teardown_s": end - last(m, "exit"),
            "wall_over_training": wall / training, "target": "wall <= 90 s"}


def sweep_row(work: Path) -> dict:
    start, end, wall, m = traced([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--space",
                                  str(ROOT / "tune_spaces" / "mllt.yaml"), "method=mllt", "train.epochs=4",
                                  "tune.num_samples=2", "scaling.cpus_per_worker=1", f"run.storage_path={work}",
                                  "run.name=sweep", "run.verbose=false"], work / "sweep.trace", work)
    starts = {pid: t for t, pid, e in m if e == "trial start"}
    firsts = {pid: t for t, pid, e in reversed(m) if e.startswith("epoch start") and e.endswith(" 0")}
    delays = [firsts[pid] - t for pid, t in starts.items() if pid in firsts]
    # A trial the scheduler stops during its first report has no complete epoch: it has no overhead to show.
    trials = sorted(r for r in {e.split()[2] for _, _, e in m if e.startswith("epoch start")} if epochs_of(m, r))
    training = sum(t - s for run in trials for s, t, _ in epochs_of(m, run))
    return {"command": "python jobs/sweep.py (2 one-worker MLLT trials, 4 epochs)", "wall_s": wall,
            "training_s": training, "trial_start_to_first_epoch_s": max(delays),
            "per_epoch_overhead_s": sum(per_epoch_overhead(epochs_of(m, r)) for r in trials) / len(trials),
            "teardown_s": end - last(m, "exit"), "target": "trial start to first epoch <= 5 s"}


def import_row(work: Path) -> dict:
    code = ("import time; t = time.perf_counter(); import rayexperts; from rayexperts.config import load_config; "
            "load_config('digits_ncl', ['train.epochs=3']); print(time.perf_counter() - t)")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=True)
    return {"command": "import rayexperts + load_config (preset)", "wall_s": time.time() - start,
            "imports_s": float(done.stdout.strip()), "target": "<= 3 s"}


ROWS = {"train": train_row, "cbd": cbd_row, "sweep": sweep_row, "import": import_row}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(ROWS), help="a subset of " + ",".join(ROWS))
    p.add_argument("--out", default="runs/bench_overhead")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"overhead-{name}-", dir=out))
        row = ROWS[name](work)
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.to_parquet(out / "overhead.parquet", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(df.drop(columns=["target"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
