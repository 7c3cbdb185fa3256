"""Mutation score (a benchmark-like job, not a test): how many deliberate bugs the fast tests catch.

    pip install -e ".[dev,mutation]"
    python jobs/mutation_score.py [--sample N [--seed S]] [--resume] [--max-children N] [--out runs/mutation]

Runs ``mutmut`` as configured in ``pyproject.toml`` ([tool.mutmut]: the modules whose arithmetic decides
results, the fast tests that call each mutated function). By default EVERY mutant is run, from scratch
(mutmut's working copy ``mutants/`` is deleted first, so no verdict of older code or older tests is kept;
``--resume`` keeps the verdicts already there, e.g. after an interrupted run). ``--sample N`` runs N mutants
drawn at random, afresh each run, with the seed printed (``--seed S`` repeats a draw).

Reports, overall and per module, ``killed / (all − equivalent)`` (the adjusted score) and the raw
``killed / all``. Killed: a selected test failed (mutmut's ``killed``), ran out of time (``timeout``) or
crashed (``segfault``). Not killed: ``survived``, and ``no tests`` (no selected test calls the mutated
function). Equivalent mutants, which change no result, are listed with their reason in ONE place,
``jobs/mutation_equivalents.yaml``; each entry also records the mutated line, and the job stops when an
entry no longer names that mutation (the source moved) or when a listed mutant was killed (it was not
equivalent). Writes ``OUT/mutation.parquet`` (one row per mutant: module, function, mutant, status,
equivalent) and prints the tables and the mutants not killed (``mutmut show NAME``). Run from the
repository root.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS_FILE = ROOT / "jobs" / "mutation_equivalents.yaml"
KILLED = ("killed", "timeout", "segfault", "caught by type check")


def load_equivalents(path: Path = EQUIVALENTS_FILE) -> dict[str, dict[str, str]]:
    """``{mutant name: {"change": mutated line(s), "reason": why no result can change}}``."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not entry.get("change") or not entry.get("reason"):
            raise SystemExit(f"{path.name}: {name} needs a 'change' (the mutated line) and a 'reason'")
    return data


def mutmut(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def exit_codes() -> dict[str, int | None]:
    """Every generated mutant's name and exit code (None: not run yet), from mutmut's ``.meta`` files."""
    import json

    codes: dict[str, int | None] = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def mutated_lines(name: str) -> str:
    """The line(s) the mutant adds, as ``mutmut show NAME`` prints them (stripped, joined by `` | ``)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name).splitlines()
    return " | ".join(line[1:].strip() for line in diff if line.startswith("+") and not line.startswith("+++"))


def split_name(name: str) -> tuple[str, str]:
    """``rayexperts.eval.metrics.xǁEvalAccumulatorǁsummary__mutmut_3`` → (``rayexperts.eval.metrics``,
    ``EvalAccumulator.summary``)."""
    module, _, mangled = name.rpartition(".")
    return module, mangled.rsplit("__mutmut_", 1)[0][2:].replace("ǁ", ".")  # x_name / xǁClassǁname


def score_table(table):
    """Per module and overall: mutants, equivalent, killed, raw % (killed / all), adjusted % (killed / (all − eq))."""
    import pandas as pd

    t = table.assign(killed=table["status"].isin(KILLED) & ~table["equivalent"])
    per = t.groupby("module").agg(mutants=("mutant", "size"), equivalent=("equivalent", "sum"), killed=("killed", "sum"))
    per.loc["all"] = per.sum()
    per = per.astype(int)
    per["raw_%"] = (100 * per["killed"] / per["mutants"]).round(2)
    per["adjusted_%"] = (100 * per["killed"] / (per["mutants"] - per["equivalent"]).clip(lower=1)).round(2)
    return pd.DataFrame(per)


def pytest_collection_modifyitems(session, config, items) -> None:
    """pytest hook (``[tool.mutmut] pytest_add_cli_args``: ``-p jobs.mutation_score``): a mutant's tests run
    fastest first, by the durations mutmut measured (``mutants/mutmut-stats.json``). mutmut hands them over in no
    particular order and stops at the first failure (``-x``), so a mutant a quick unit test kills no longer waits
    for a slow end-to-end test first. Which tests run, and their verdicts, are unchanged."""
    import json

    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return  # stats collection, the clean run, an ordinary pytest run: the order stays as collected
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, KeyError, ValueError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=0, help="run N mutants drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="the sample's seed (default: a fresh one, printed)")
    parser.add_argument("--resume", action="store_true", help="keep the verdicts already in mutants/")
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--out", default="runs/mutation")
    args = parser.parse_args()
    if args.seed is not None and not args.sample:
        parser.error("--seed draws a sample: give --sample N as well")
    import pandas as pd

    equivalents = load_equivalents()
    started = time.time()
    if not args.resume:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    children = ["--max-children", str(args.max_children)]
    if args.sample:
        seed = secrets.randbits(32) if args.seed is None else args.seed
        print(f"sample of {args.sample} mutants, seed {seed} (repeat it: --sample {args.sample} --seed {seed})")
        if not exit_codes():  # generate the mutants (and the map from functions to tests) with a handful run
            mutmut("run", *children, "rayexperts.data.imbalance.x_shot_group__mutmut_*")
        import random

        names = sorted(exit_codes())
        chosen = sorted(random.Random(seed).sample(names, min(args.sample, len(names))))
        mutmut("run", *children, *chosen)  # named mutants are run again even when they have a verdict
    else:
        mutmut("run", *children)  # every mutant without a verdict: all of them after the reset above
        names = sorted(exit_codes())
        chosen = names
    codes = exit_codes()

    os.chdir(ROOT)  # mutmut reads its configuration and working copy from the working directory
    from mutmut.__main__ import status_by_exit_code

    stale = [n for n in equivalents if n not in codes]
    if stale:
        raise SystemExit(f"{EQUIVALENTS_FILE.name} names mutants mutmut no longer generates: {', '.join(stale)}")
    moved = {n: line for n in equivalents if (line := mutated_lines(n)) != equivalents[n]["change"]}
    if moved:
        raise SystemExit(f"{EQUIVALENTS_FILE.name}: these names now denote another mutation (update the entry):\n"
                         + "\n".join(f"  {n}: now {line!r}" for n, line in moved.items()))

    rows = [{"module": split_name(n)[0], "function": split_name(n)[1], "mutant": n,
             "status": status_by_exit_code[codes[n]], "equivalent": n in equivalents} for n in chosen]
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "mutation.parquet", index=False)

    print(score_table(table).to_string())
    print("\nstatus counts: " + ", ".join(f"{s} {c}" for s, c in table["status"].value_counts().items()))
    what = "all" if not args.sample else f"a random sample of {len(chosen)}"
    print(f"{what} of the {len(names)} mutants; {int(table['equivalent'].sum())} of them listed as equivalent in "
          f"{EQUIVALENTS_FILE.relative_to(ROOT)}; {time.time() - started:.0f} s; {out / 'mutation.parquet'}")
    wrong = table[table["equivalent"] & table["status"].isin(KILLED)]
    if len(wrong):
        print("\nKILLED although listed as equivalent (remove them from the list):\n"
              + wrong[["mutant", "status"]].to_string(index=False))
    left = table[~table["equivalent"] & ~table["status"].isin(KILLED)]
    if len(left):
        print("\nnot killed (mutmut show NAME):\n" + left[["mutant", "status"]].to_string(index=False))
    return 1 if len(wrong) else 0


if __name__ == "__main__":
    sys.exit(main())
