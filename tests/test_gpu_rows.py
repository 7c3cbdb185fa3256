"""The prepared GPU script that trains the CIFAR-10-LT IF 100 paper rows (``jobs/gpu_rows.py``, issue 35):
rehearsed on the CPU with a short protocol where Ray cannot be imported, and its budget logic."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from data_fixtures import make_cifar_parquet
from helpers import without_ray
from rayexperts.analysis import published
from rayexperts import cli
from rayexperts.launch.rows import ROWS, projected_end, watch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_rehearsal_without_ray(tmp_path):
    """The script as run on a lent machine (``PYTHONPATH=.``, no Ray), with a short protocol: two rows of ResNet-8
    for 2 epochs on a CIFAR-10 Parquet fixture, each finished and shown at ``last`` and at the paper's selection
    beside the catalogue's numbers, in rows.json and rows.md."""
    data = make_cifar_parquet(tmp_path / "cifar10.parquet", train_per_class=100, test_per_class=4)
    env, attempts = without_ray(tmp_path, ".")  # PYTHONPATH=. as on a lent machine
    out = tmp_path / "out"
    presets = ["cifar10_lt_if100_ce", "cifar10_lt_if100_ldam_drw"]
    done = subprocess.run([sys.executable, "jobs/gpu_rows.py", "--cpu", "--epochs", "2", "--rows", ",".join(presets),
                           "--out", str(out), "--data", str(data), "model.backbone=resnet8", "scaling.cpus_per_worker=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not attempts.exists(), attempts.read_text()
    summary = json.loads((out / "rows.json").read_text())
    assert summary["protocol"] == "short protocol: 2 epochs" and summary["device"] == "CPU"
    assert [r["preset"] for r in summary["rows"]] == presets
    md = (out / "rows.md").read_text()
    for row in summary["rows"]:
        assert row["status"] == "finished" and row["epochs_done"] == row["epochs"] == 2, row
        assert row["run_dir"] == str(out / "runs" / row["preset"]) and row["wall_s"] > 0 and row["images_per_sec"] > 0
        assert "run.ray=false" in row["command"] and "data.cache=device" in row["command"]
        metrics = pd.read_parquet(Path(row["run_dir"]) / "metrics.parquet")
        expert0 = metrics[metrics["view"] == "expert0"].sort_values("epoch")
        theirs = published(preset=row["preset"], dataset="cifar10-lt", imbalance_factor=100)
        assert len(row["results"]) == len(theirs) >= 1
        for r, (_, paper) in zip(row["results"], theirs.iterrows()):
            assert r["view"] == "expert0" and r["paper"] == paper["value"] and r["source"] == paper["source"]
            assert r["paper_selection"] == "best_test"  # compat=official: the recipe's eval.selection
            assert r["last"] == pytest.approx(100 * expert0["top1"].iloc[-1])
            assert r["at_paper_selection"] == pytest.approx(100 * expert0["top1"].max())
            assert f"| {r['last']:.2f} | {r['at_paper_selection']:.2f} [best_test] | {paper['value']:.2f} |" in md
        assert f"| `{row['preset']}` | finished | 2/2 | expert0 |" in md
    assert "Short protocol: not comparable" in md
    assert "[rows] cifar10_lt_if100_ce expert0: ours" in done.stdout


def test_rows_that_do_not_fit_the_budget_are_not_started(tmp_path, capsys):
    data = tmp_path / "cifar10.parquet"
    data.write_bytes(b"")
    assert cli.main(["gpu-rows", "--cpu", "--budget", "30", "--min-row-s", "60", "--out", str(tmp_path),
                     "--data", str(data)]) == 0
    summary = json.loads((tmp_path / "rows.json").read_text())
    assert [r["preset"] for r in summary["rows"]] == list(ROWS)
    for row in summary["rows"]:
        assert row["status"] == "not started" and "under --min-row-s 60" in row["reason"]
        theirs = published(preset=row["preset"], dataset="cifar10-lt", imbalance_factor=100)
        assert [r["paper"] for r in row["results"]] == (list(theirs["value"]) or [None])
        assert all(r["last"] is None for r in row["results"])
    assert not (tmp_path / "runs").exists()
    assert "| `cifar10_lt_if100_balpoe` | not started" in (tmp_path / "rows.md").read_text()
    assert cli.main(["gpu-rows", "--cpu", "--out", str(tmp_path), "--data", str(tmp_path / "missing.parquet")]) == 2
    assert "error: --data" in capsys.readouterr().err


def test_a_row_is_judged_on_its_new_checkpoints_only(tmp_path):
    """A resumed row's old checkpoints (here 1-5) do not enter its pace: after 1.5 s of start-up it trains 0.1 s an
    epoch, which ends its 20 epochs well inside 10 s; timed from the old checkpoint, epoch 6 would take 1.6 s and the
    projection (about 24 s) would stop it."""
    for e in range(1, 6):
        (tmp_path / "run" / f"checkpoint_{e:06d}").mkdir(parents=True)
    resumed = FAKE_ROW.replace("range(1, epochs", "range(6, epochs").replace("run.mkdir(parents=True)", "time.sleep(1.5)")
    proc = subprocess.Popen([sys.executable, "-c", resumed, str(tmp_path / "run"), "20", "0.1", "0"],
                            start_new_session=True)
    assert watch(proc, tmp_path / "run", 20, time.monotonic() + 10, poll_s=0.02, min_pace_s=0.2) == ("finished", "")


def test_projected_end_carries_the_pace_between_checkpoints_to_the_last_epoch():
    assert projected_end([(10.0, 1)], 10) is None
    assert projected_end([(10.0, 1), (20.0, 3)], 10) == 20.0 + 5.0 * 7  # 5 s an epoch, 7 epochs to go
    assert projected_end([(10.0, 4), (14.0, 5), (18.0, 6)], 6) == 18.0


# A stand-in for a row's training: a checkpoint_<epoch> folder every STEP seconds up to EPOCHS, Ctrl-C noted.
FAKE_ROW = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    run, epochs, step, code = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    try:
        run.mkdir(parents=True)  # started (Ctrl-C is caught from here on)
        for e in range(1, epochs + 1):
            time.sleep(step)
            (run / f"checkpoint_{e:06d}").mkdir()
    except KeyboardInterrupt:
        (run / "interrupted").touch()
        sys.exit(130)
    sys.exit(code)
''')


def _fake(tmp_path: Path, epochs: int, step: float, code: int = 0) -> subprocess.Popen:
    """The stand-in, once it has started (its run folder exists)."""
    proc = subprocess.Popen([sys.executable, "-c", FAKE_ROW, str(tmp_path / "run"), str(epochs), str(step), str(code)],
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_a_row_whose_pace_misses_the_budget_is_stopped_with_ctrl_c(tmp_path):
    proc = _fake(tmp_path, epochs=1000, step=0.1)
    started = time.monotonic()
    status, reason = watch(proc, tmp_path / "run", 1000, deadline=started + 20, poll_s=0.05, min_pace_s=0.3)
    assert status == "unfinished" and "at its pace it would end" in reason, reason
    assert time.monotonic() - started < 10 and proc.returncode == 130 and (tmp_path / "run" / "interrupted").exists()
    assert len(list((tmp_path / "run").glob("checkpoint_*"))) >= 4  # judged on 0.3 s of pace, not on two checkpoints


def test_a_row_is_stopped_at_the_deadline_and_its_end_is_told_apart(tmp_path):
    proc = _fake(tmp_path, epochs=3, step=30)
    status, reason = watch(proc, tmp_path / "run", 3, deadline=time.monotonic() + 0.5, poll_s=0.05)
    assert (status, reason) == ("unfinished", "stopped at the budget after 0/3 epochs")
    assert (tmp_path / "run" / "interrupted").exists()
    assert watch(_fake(tmp_path / "a", 2, 0.01), tmp_path / "a" / "run", 2, time.monotonic() + 60, 0.05) == ("finished", "")
    assert watch(_fake(tmp_path / "b", 2, 0.01, code=3), tmp_path / "b" / "run", 2, time.monotonic() + 60, 0.05) \
        == ("failed", "exit status 3")
    # exit status 0 before the last epoch's checkpoint (a KeyboardInterrupt the row handled) is not a finished row
    assert watch(_fake(tmp_path / "c", 1, 0.01), tmp_path / "c" / "run", 2, time.monotonic() + 60, 0.05)[0] == "failed"
