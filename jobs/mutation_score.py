"""Mutation score (a benchmark-like job, not a test): how many deliberate bugs the fast tests catch.

    pip install -e ".[dev,mutation]"
    python jobs/mutation_score.py [--every K] [--max-children N] [--out runs/mutation]

Runs ``mutmut`` as configured in ``pyproject.toml`` ([tool.mutmut]: the modules whose arithmetic decides
results, the fast tests that call each mutated function). ``--every K`` runs every K-th mutant in name
order (a fixed, reproducible sample; 1 = all, about 2,000 mutants). Writes ``OUT/mutation.parquet`` (one
row per mutant run: module, function, mutant, status) and prints killed / total per module. A mutant
whose function no selected test calls counts as not killed. Mutants named in ``EQUIVALENT`` are
excluded: they change no result, so no test can kill them. Run from the repository root (mutmut's
working copy is ``mutants/``; delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Mutants that change nothing a test could see, with why (checked by hand with `mutmut show NAME`).
EQUIVALENT: dict[str, str] = {
    "rayexperts.data.imbalance.x_select_first_n__mutmut_5":
        "np.asarray(labels) without dtype=int64: integer labels are int64 already (64-bit NumPy), and they are "
        "only compared and used as indices",
    "rayexperts.data.imbalance.x_step_counts__mutmut_14":
        "np.full(C, n_max) without dtype=int64: n_max is a Python int, so the array is int64 already",
    "rayexperts.eval.metrics.xǁEvalAccumulatorǁper_class_accuracy__mutmut_4":
        "np.errstate without invalid='ignore': the division is by max(total, 1), so no 0/0 ever happens",
    "rayexperts.methods.cbd.x_teacher_config__mutmut_67":
        "teacher_gpus >= 0 also sets scaling.gpus_per_worker=0 when teacher_gpus=0, but then scaling.use_gpu is "
        "false and a CPU worker never reads gpus_per_worker",
    "rayexperts.methods.cbd.x_teacher_config__mutmut_96":
        "compose(resolve_paths=None) for False: compose tests its truth value",
    "rayexperts.methods.cbd.xǁClassBalancedDistillationǁteacher_feature_dims__mutmut_15":
        "in_channels left at its default when building a teacher only to read its feature width: the width "
        "does not depend on the input channels",
    "rayexperts.methods.ecl.xǁEffectiveCollaborativeǁbkt__mutmut_15":
        "zip(ref, cls, strict=False): both lists come from the same model, one entry per expert, always equally long",
    "rayexperts.methods.ecl.xǁEffectiveCollaborativeǁloss__mutmut_28":
        "zip(ref, cls, strict=None): as above",
    "rayexperts.methods.ecl.xǁEffectiveCollaborativeǁbuild_model__mutmut_6":
        "build_experts(shared_trunk=None) for False: the function tests its truth value",
    "rayexperts.models.heads.xǁCosineClassifierǁforward__mutmut_9":
        "F.normalize(v) without dim=1: dim=1 is F.normalize's default",
}


def mutmut(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def exit_codes() -> dict[str, int | None]:
    """Every generated mutant's name and exit code (None: not run yet), from mutmut's ``.meta`` files."""
    codes: dict[str, int | None] = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=1, help="run every K-th mutant in name order")
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--out", default="runs/mutation")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    started = time.time()
    # Generate the mutants (and the map from functions to tests) by running the smallest sensible set.
    mutmut("run", "--max-children", str(args.max_children), "rayexperts.data.imbalance.x_shot_group__mutmut_*")
    names = sorted(exit_codes())
    # The sample is drawn from every mutant, then the equivalent ones are dropped (so excluding one
    # never changes which others are run).
    sample = [n for n in names[:: args.every] if n not in EQUIVALENT]
    for i in range(0, len(sample), 200):  # a few hundred names per command line
        mutmut("run", "--max-children", str(args.max_children), *sample[i:i + 200])
    codes = exit_codes()

    import os

    os.chdir(ROOT)  # mutmut reads its configuration from the working directory
    from mutmut.__main__ import status_by_exit_code

    rows = []
    for name in sample:
        module, _, rest = name.partition(".x")
        function = rest.rsplit("__mutmut_", 1)[0].lstrip("_ǁ").replace("ǁ", ".")
        rows.append({"module": module, "function": function, "mutant": name,
                     "status": status_by_exit_code[codes[name]]})
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "mutation.parquet", index=False)
    killed = table["status"].isin(["killed", "timeout", "caught by type check"])
    per_module = table.assign(killed=killed).groupby("module")["killed"].agg(["sum", "count"])
    per_module.loc["all"] = [int(killed.sum()), len(table)]
    per_module["score_%"] = (100 * per_module["sum"] / per_module["count"]).round(1)
    print(per_module.rename(columns={"sum": "killed", "count": "mutants"}).to_string())
    excluded = len(names[:: args.every]) - len(sample)
    print(f"\n{len(sample)} of {len(names)} mutants (every {args.every}, {excluded} equivalent ones excluded); "
          f"{time.time() - started:.0f} s; {out / 'mutation.parquet'}")
    survived = table.loc[~killed, ["mutant", "status"]]
    if len(survived):
        print("not killed (mutmut show NAME):\n" + survived.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
