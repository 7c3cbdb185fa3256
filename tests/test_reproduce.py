"""``jobs/reproduce.py``: a catalogue's rows re-run as one Ray job beside the published numbers.

The catalogue here is a made-up one of 2 rows on digits-lt (its "published" numbers are invented for the test,
not any paper's): 2 rows × 2 seeds = 4 runs of the digits presets at a short protocol (2 epochs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rayexperts.analysis import select_epochs
from rayexperts import cli
from rayexperts.published import COLUMNS

REPO = Path(__file__).resolve().parents[1]
INVENTED = [  # numbers invented for this test
    {"paper": "TEST", "table": "Table 1", "dataset": "digits-lt", "imbalance_factor": "", "backbone": "digitsnet",
     "method": "CE", "variant": "", "metric": "top1_all", "value": "60.0", "selection": "best_test", "epochs": "",
     "seeds": "", "source": "invented for a test", "preset": "digits_ce", "overrides": "", "view": "expert0"},
    {"paper": "TEST", "table": "Table 1", "dataset": "digits-lt", "imbalance_factor": "", "backbone": "digitsnet",
     "method": "BSCE", "variant": "", "metric": "top1_all", "value": "55.0", "selection": "", "epochs": "",
     "seeds": "", "source": "invented for a test", "preset": "digits_bsce", "overrides": "bsce.tau=1.0", "view": ""},
    {"paper": "TEST", "table": "Table 1", "dataset": "digits-lt", "imbalance_factor": "", "backbone": "digitsnet",
     "method": "Other", "variant": "", "metric": "top1_all", "value": "50.0", "selection": "", "epochs": "",
     "seeds": "", "source": "invented for a test", "preset": "", "overrides": "", "view": ""},
]


@pytest.fixture
def catalog(tmp_path) -> Path:
    path = tmp_path / "my_rows.csv"
    pd.DataFrame(INVENTED, columns=[*COLUMNS, "view"]).to_csv(path, index=False)
    return path


def test_dry_run_plans_without_training(catalog, tmp_path, capsys):
    storage = tmp_path / "runs"
    code = cli.main(["reproduce", "--catalog", str(catalog), "--seeds", "2", "--dry-run", "--epochs-scale", "0.1",
                   f"run.storage_path={storage}"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("digits_ce-") == 2 and out.count("digits_bsce-") == 2  # 2 rows × 2 seeds
    assert "no preset: Table 1 Other" in out and "estimated total:" in out and "CPU-hours" in out
    assert "     3 " in out  # 30 epochs × 0.1
    assert not storage.exists()  # nothing trained, nothing written


def test_bad_input_is_one_line(catalog, tmp_path, capsys):
    assert cli.main(["reproduce", "--catalog", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text(catalog.read_text().replace("top1_all", "top5", 1))
    assert cli.main(["reproduce", "--catalog", str(bad)]) == 2
    assert "catalogue line 2: column 'metric' is 'top5'" in capsys.readouterr().err
    assert cli.main(["reproduce", "--paper", "NOPE"]) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_reproduce_runs_reports_and_does_only_the_missing_work(ray_cluster, catalog, tmp_path, capsys):
    storage = tmp_path / "runs"
    common = ["--catalog", str(catalog), "--epochs", "2", f"run.storage_path={storage}", "run.verbose=false"]
    assert cli.main(["reproduce", *common, "--seeds", "1"]) == 0  # as if the job had been stopped after its first runs
    first = capsys.readouterr().out
    assert "2 runs, 0 already finished" in first and "2 of 2 runs" in first
    job = storage / "reproduce-my-rows"
    seed0 = sorted(job.glob("*seed0/metrics.parquet"))
    stamps = {p: pd.read_parquet(p)["timestamp"].tolist() for p in seed0}
    assert cli.main(["reproduce", *common, "--seeds", "2"]) == 0
    second = capsys.readouterr().out
    assert "4 runs, 2 already finished" in second and "ETA" in second and "4 of 4 runs" in second
    assert all(pd.read_parquet(p)["timestamp"].tolist() == t for p, t in stamps.items())  # reused, not retrained
    assert cli.main(["reproduce", *common, "--seeds", "2"]) == 0
    assert "4 runs, 4 already finished" in capsys.readouterr().out  # the same command again: nothing to train

    df = pd.read_parquet(job / "reproduce.parquet")
    assert set(df["protocol"]) == {"short"}
    ce = df[df["method"] == "CE"].set_index("selection")
    assert set(ce.index) == {"best_test", "last"}  # the paper's selection and last, both
    for _, row in df.iterrows():  # ours = mean over the runs, recomputed here from their directories
        values = []
        for path in json.loads(row["run_ids"]):
            m = pd.read_parquet(Path(path) / "metrics.parquet")
            picked = select_epochs(m[m["view"] == row["view"]].assign(run=path), row["selection"])
            values.append(100 * float(picked["top1"].iloc[0]))
        assert row["n_seeds"] == 2 and row["ours_mean"] == pytest.approx(sum(values) / 2)
        assert row["delta"] == pytest.approx(row["ours_mean"] - row["paper_value"])
        assert row["ours_sd"] == pytest.approx(pd.Series(values).std())
    assert df.loc[df["method"] == "BSCE", "view"].eq("expert0").all()  # bsce's primary view
    md = (job / "reproduce.md").read_text()
    assert "short protocol: not comparable with the paper" in md
    assert "best_test (selected on the test set)" in md and "[best_test]" in md
    assert "CE" in md and "BSCE" in md and "Other" in md and "no preset" in md
    assert (job / "reproduce.png").stat().st_size > 1000


def test_the_job_script_answers_help_from_another_directory(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "reproduce.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--catalog" in done.stdout and "re-issue the same command" in done.stdout
