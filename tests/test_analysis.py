"""rayexperts.analysis and the report on run, ensemble and sweep directories built without Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rayexperts.analysis import best_trial, load_ensemble, load_runs, load_sweep, paper_table
from rayexperts.config import load_config, to_dict
from rayexperts.engine.results import ResultWriter
from rayexperts.report import write_report
from rayexperts.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
GROUPS = np.array(["many"] * 3 + ["medium"] * 4 + ["few"] * 3)


def fake_run(path: Path, method: str = "mllt", seed: int = 0, epochs: int = 3, acc: float = 0.5, **keys) -> Path:
    """A run directory as the engine writes it: config.yaml, metrics/classes/reliability.parquet."""
    cfg = load_config(None, {"method": method, "seed": seed, **keys})
    views = ["expert0", "ensemble"]
    rows = [
        {"epoch": e, "view": v, "top1": acc + 0.01 * e, "top1_many": 0.9, "top1_medium": acc, "top1_few": 0.1,
         "ece": 0.05, "val_top1": acc - 0.02, "loss": 2.0 - e, "timestamp": 1000.0 + e}
        for e in range(epochs) for v in views
    ]
    classes = pd.DataFrame([
        {"epoch": epochs - 1, "view": v, "class_id": c, "class_name": str(c), "train_count": 100 - 9 * c,
         "shot_group": GROUPS[c], "accuracy": 1 - 0.08 * c} for v in views for c in range(10)
    ])
    rundir = RunDir(str(path))
    rundir.write_config(cfg)
    rel = pd.DataFrame([{"epoch": epochs - 1, "view": v, "bin": b, "count": 10.0, "confidence": (b + 0.5) / 15,
                         "accuracy": b / 15} for v in views for b in range(15)])
    ResultWriter(rundir).add(rows, classes, rel)
    return path


def test_load_runs_finds_nested_runs_with_flat_config(tmp_path):
    fake_run(tmp_path / "a", method="mllt", acc=0.4)
    fake_run(tmp_path / "group" / "b", method="ncl", acc=0.6, **{"ncl.distill_weight": 0.3})
    df = load_runs(tmp_path)
    assert sorted(df["run"].unique()) == ["a", "group/b"]
    assert len(df) == 2 * 3 * 2  # runs × epochs × views
    assert {"ncl.distill_weight", "model.num_experts", "data.name", "method"} <= set(df.columns)
    assert df.loc[df["run"] == "group/b", "ncl.distill_weight"].eq(0.3).all()
    assert df["train.milestones"].map(type).eq(str).all()  # lists become JSON strings
    assert load_runs(tmp_path / "a")["run"].unique().tolist() == ["a"]
    with pytest.raises(FileNotFoundError, match="no run directory"):
        load_runs(tmp_path / "empty_dir_does_not_exist")


def test_paper_table_rows_columns_and_seeds(tmp_path):
    fake_run(tmp_path / "mllt", method="mllt", acc=0.4)
    for seed, acc in enumerate([0.5, 0.6, 0.7]):
        fake_run(tmp_path / f"ncl_s{seed}", method="ncl", seed=seed, acc=acc)
    df = load_runs(tmp_path)
    single = paper_table(df[df["method"] == "mllt"])
    assert list(single.columns) == ["Many", "Medium", "Few", "All", "selection"]
    assert single["selection"].eq("last").all()
    assert single.loc[("mllt", "ensemble"), "All"] == pytest.approx(42.0)  # last epoch: 0.4 + 0.02
    with pytest.raises(ValueError, match="seeds='seed'"):
        paper_table(df)
    table = paper_table(df, seeds="seed")
    assert table.loc[("ncl", "ensemble"), "All"] == "62.00 ± 10.00"
    assert table.loc[("ncl", "ensemble"), "seeds"] == 3
    assert table.loc[("mllt", "expert0"), "All"] == "42.00"


def test_paper_table_selection_names_the_checkpoint(tmp_path):
    run = fake_run(tmp_path / "r", epochs=4, acc=0.5)
    df = load_runs(run)
    # epoch 1 of the ensemble view is made the best on test, epoch 2 the best on val
    df.loc[(df["view"] == "ensemble") & (df["epoch"] == 1), ["top1", "top1_few"]] = [0.9, 0.3]
    df.loc[(df["view"] == "ensemble") & (df["epoch"] == 2), "val_top1"] = 0.99
    last = paper_table(df, by=("view",))
    best = paper_table(df, by=("view",), selection="best_test")
    val = paper_table(df, by=("view",), selection="best_val")
    assert last.loc["ensemble", "All"] == pytest.approx(53.0)  # epoch 3: 0.5 + 0.03
    assert best.loc["ensemble", ["All", "Few"]].tolist() == pytest.approx([90.0, 30.0])
    assert best.loc["expert0", "All"] == pytest.approx(53.0)  # every view picks its own best epoch
    assert val.loc["ensemble", "All"] == pytest.approx(52.0)  # its test top-1 at the best val epoch (2)
    assert best["selection"].eq("best_test (selected on the test set)").all() and val["selection"].eq("best_val").all()
    with pytest.raises(ValueError, match="no validation split"):
        paper_table(df.drop(columns=["val_top1"]), by=("view",), selection="best_val")
    with pytest.raises(ValueError, match="choose one of last, best_test, best_val"):
        paper_table(df, selection="best")


def test_paper_table_refuses_to_average_different_configs(tmp_path):
    fake_run(tmp_path / "a", method="ncl", seed=0)
    fake_run(tmp_path / "b", method="ncl", seed=1, **{"ncl.distill_weight": 0.3})
    df = load_runs(tmp_path)
    with pytest.raises(ValueError, match=r"differ in ncl.distill_weight \(0.3, 0.6\)"):
        paper_table(df, seeds="seed")
    assert len(paper_table(df, by=("method", "view", "ncl.distill_weight"), seeds="seed")) == 4


def test_load_runs_leaves_out_sweep_trials_and_job_members_unless_asked(tmp_path):
    fake_run(tmp_path / "plain", method="ce")
    fake_sweep(tmp_path / "sweep")
    job = tmp_path / "job"
    fake_run(job / "teachers" / "teacher0", method="ce")
    fake_run(job / "student", method="cbd")
    (job / "summary.parquet").write_bytes(b"")
    assert set(load_runs(tmp_path)["run"]) == {"plain"}
    assert {"job/student", "job/teachers/teacher0"} <= set(load_runs(tmp_path, members=True)["run"])
    assert len(set(load_runs(tmp_path, trials=True)["run"])) == 4
    assert set(load_runs(job)["run"]) == {"student", "teachers/teacher0"}  # the job itself: its runs


def test_load_ensemble_names_models(tmp_path):
    job = tmp_path / "job"
    for i in range(2):
        fake_run(job / "teachers" / f"teacher{i}", method="ce")
    fake_run(job / "student", method="cbd")
    summary = pd.DataFrame({"model": ["teacher0", "teacher1", "teacher_ensemble", "student"], "top1": 0.5,
                            "top1_many": 0.9, "top1_medium": 0.5, "top1_few": 0.1,
                            "started_at": [0.0, 1.0, 10.0, 10.0], "finished_at": [9.0, 8.0, 20.0, 20.0]})
    summary.to_parquet(job / "summary.parquet")
    ens = load_ensemble(job)
    assert sorted(ens.metrics["model"].unique()) == ["student", "teacher0", "teacher1"]
    assert list(ens.summary["model"]) == list(summary["model"])
    md = write_report(job)
    assert {"report.md", "timeline.png", "models.png", "student_longtail.png", "student_reliability.png"} <= _names(md)


def fake_sweep(root: Path) -> Path:
    space = {"ncl.distill_weight": {"uniform": [0.2, 1.0]}, "model.num_experts": {"choice": [2, 3]}}
    cfg = load_config(None, ["method=ncl"])
    (root).mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump({"config": to_dict(cfg), "space": space}, sort_keys=False))
    rows = []
    for i, (lam, k, val, status) in enumerate([(0.3, 2, 0.5, "completed"), (0.7, 3, 0.7, "completed"),
                                                (0.9, 2, 0.8, "stopped")]):
        tid = f"abc_0000{i}"
        fake_run(root / f"tune_{tid}", method="ncl", acc=val, **{"ncl.distill_weight": lam, "model.num_experts": k})
        rows.append({"trial_id": tid, "status": status, "run": f"tune_{tid}", "ncl.distill_weight": lam,
                     "model.num_experts": k, "val_top1": val, "top1": val + 0.01, "epochs_done": 3 if i < 2 else 1})
    pd.DataFrame(rows).to_parquet(root / "trials.parquet")
    return root


def test_load_sweep_and_best_trial(tmp_path):
    sw = load_sweep(fake_sweep(tmp_path / "sweep"))
    assert sw.keys == ["ncl.distill_weight", "model.num_experts"] and sw.metric == "val_top1" and sw.mode == "max"
    assert set(sw.metrics["run"]) == set(sw.trials["run"])
    assert best_trial(sw.trials, "val_top1", "max")["trial_id"] == "abc_00001"  # the stopped one ran fewer epochs
    assert best_trial(sw.trials, "val_top1", "min")["trial_id"] == "abc_00000"
    assert best_trial(sw.trials, "val_top5", "max") is None


def test_sweep_report_files(tmp_path):
    md = write_report(fake_sweep(tmp_path / "sweep"))
    expected = {"report.md", "sweep_ncl.distill_weight.png", "sweep_model.num_experts.png", "trial_curves.png",
                "best_longtail.png", "best_reliability.png", "best_curves.png"}
    assert expected <= _names(md)
    text = md.read_text()
    assert "abc_00001" in text and "validation" in text
    for png in md.parent.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_an_engine_run_without_ray(tmp_path):
    """A real (1-epoch) run directory written by the engine's Run and ResultWriter, reliability included."""
    import torch

    from rayexperts.engine.run import Run
    from rayexperts.engine.loop import evaluate_splits, train_epoch
    from rayexperts.engine.results import reliability_table, result_rows

    torch.set_num_threads(1)
    cfg = load_config(None, ["method=ce", "train.epochs=1", "data.val_per_class=10", "run.verbose=false"])
    run = Run(cfg)
    stats = train_epoch(run, 0)
    accs = evaluate_splits(run)
    rows, classes = result_rows(run, 0, accs, stats)
    rundir = RunDir.of(str(tmp_path), "engine_run")
    rundir.write_config(cfg)
    rel = reliability_table(0, accs[""], run.views)
    ResultWriter(rundir).add(rows, classes, rel)
    assert rel.groupby("view")["count"].sum().eq(300).all()  # every test image in one bin per view
    md = write_report(tmp_path / "engine_run")
    assert {"report.md", "longtail.png", "reliability.png", "curves.png"} <= _names(md)
    assert "Validation top-1" in md.read_text()


def test_report_without_reliability_notes_it(tmp_path):
    run = fake_run(tmp_path / "old")
    (run / "reliability.parquet").unlink()
    md = write_report(run)
    assert "No reliability diagram" in md.read_text() and "reliability.png" not in _names(md)


def test_report_cli_rejects_other_directories(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "neither a run directory" in out.stderr


def _names(md: Path) -> set[str]:
    return {p.name for p in md.parent.iterdir()}
