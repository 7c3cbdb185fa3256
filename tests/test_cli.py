"""The ``rayexperts`` command as a newcomer meets it: subcommands, --help on every entry, --print-config without
Ray, one-line errors with exit status 2 and nothing written, an honest resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rayexperts import cli
from rayexperts.config import load_config
from rayexperts.rundir import RunDir, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_subcommand_answers_help(capsys):
    for name in cli.COMMANDS:
        try:
            code = cli.main([name, "--help"])
        except SystemExit as done:  # argparse's --help
            code = done.code
        assert code == 0, name
    out = capsys.readouterr().out
    assert "Results go to run.storage_path" in out and "resume" in out and "examples:" in out
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["trian"]) == 2 and "did you mean train" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["rayexperts.data", "rayexperts.models", "rayexperts.eval", "rayexperts.recipes",
                                    "rayexperts.cli"])
def test_every_python_m_entry_answers_help(module, tmp_path):
    done = _python(["-m", module, "--help"], tmp_path)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr


def test_the_console_entry_point_is_installed():
    import shutil
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rayexperts": "rayexperts.cli:main"}
    exe = shutil.which("rayexperts") or str(Path(sys.executable).with_name("rayexperts"))
    done = subprocess.run([exe, "presets"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "cifar100_lt_if100_ncl" in done.stdout and "CIFAR100-LT IF 100, ResNet-32, NCL" in done.stdout


def test_print_config_names_each_values_layer_without_ray(tmp_path):
    done = _python([str(REPO / "jobs" / "train.py"), "--config", "cifar10_lt_if100_ce", "compat=official", "seed=4",
                    "--print-config"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["seed"].startswith("4  # command line")
    assert lines["data.name"] == "cifar10-lt  # preset cifar10_lt_if100_ce"
    assert lines["train.weight_decay"].startswith("0.0002  # compat official (preset cifar100_lt_if100_ce); kaidic/LDAM-DRW")
    assert "Started a local Ray" not in done.stdout + done.stderr and not (tmp_path / "runs").exists()
    for command in (["cbd"], ["sweep", "--space", "tune_spaces/ncl.yaml", "method=ncl"],
                    ["reproduce", "--paper", "NCL", "--table", "Table 1", "--dataset", "cifar10-lt"]):
        out = _python(["-m", "rayexperts.cli", *command, "--print-config"], REPO)
        assert out.returncode == 0 and "# " in out.stdout and "method: " in out.stdout, (command, out.stderr)


@pytest.mark.parametrize("args, message", [
    (["train.lr=-0.1"], "error: 'train.lr' must be > 0, got -0.1"),
    (["train.momentum=1.5"], "error: 'train.momentum' must be in [0, 1), got 1.5"),
    (["data.name=cifar10-lt", "data.root=/nonexistent/x.parquet"],
     "error: data.root='/nonexistent/x.parquet' does not exist (data set cifar10-lt)"),
    (["data.name=cifar10-lt"], "error: data set cifar10-lt needs data.root"),
    (["lr=0.1"], "did you mean train.lr?"),
    (["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.5"],
     "error: scaling.num_workers=2 with scaling.gpus_per_worker=0.5: several GPU workers of one run cannot share a GPU"),
    (["scaling.use_gpu=true", "scaling.gpus_per_worker=0"], "a GPU run needs a GPU share > 0"),
    (["train.mixup_alpha=0.4", "method=ncl"], "method ncl cannot take mixup"),
])
def test_bad_input_is_one_line_status_2_and_nothing_written(args, message, tmp_path):
    done = _python([str(REPO / "jobs" / "train.py"), f"run.storage_path={tmp_path / 'runs'}", *args], tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def _finished_run(tmp_path: Path, epochs: int = 2):
    """A run directory as a finished ``epochs``-epoch run leaves it (config, metrics, last checkpoint)."""
    import pandas as pd

    from rayexperts.engine.run import Run

    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.name=r", f"train.epochs={epochs}"])
    run = Run(cfg)
    rundir = RunDir.of(str(tmp_path), "r")
    rundir.write_config(cfg)
    save_checkpoint(tmp_path, model=run.model, optimizer=run.optimizer, epoch=epochs, ident=run.ident)
    rundir.put_checkpoint(str(tmp_path), epochs, 2)
    rows = [{"epoch": e, "view": v, "top1": 0.5, "top1_many": 0.5, "top1_medium": 0.5, "top1_few": 0.5, "ece": 0.1,
             "timestamp": 1.0} for e in range(epochs) for v in ("expert0", "expert0_pc")]
    rundir.write_table("metrics.parquet", pd.DataFrame(rows))
    return rundir


def test_a_finished_run_is_not_trained_again_and_a_changed_schedule_is_refused(tmp_path, capsys, monkeypatch):
    import rayexperts.launch.train as launch_train

    def no_ray(**_):
        raise AssertionError("Ray was started for a finished run")

    monkeypatch.setattr(launch_train, "ensure_ray", no_ray)
    _finished_run(tmp_path)
    base = [f"run.storage_path={tmp_path}", "run.name=r"]
    assert cli.main(["train", *base, "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "r: already finished (2/2 epochs)" in out and "test top-1 (%) at the last epoch" in out
    assert cli.main(["train", *base, "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs=2 there, 3 now" in err and "run.allow_extend=true" in err


def test_load_runs_skips_a_run_marked_failed(tmp_path):
    from rayexperts.analysis import find_runs

    rundir = _finished_run(tmp_path)
    assert find_runs(tmp_path)
    rundir.delete("metrics.parquet")
    rundir.mark_failed("DataError: x")
    assert (tmp_path / "r" / "FAILED").read_text().startswith("DataError")
    assert not find_runs(tmp_path)


def test_cbd_teachers_cannot_share_a_gpu_across_workers(tmp_path):
    done = _python([str(REPO / "jobs" / "cbd_ens.py"), "cbd.teacher_workers=2", "cbd.teacher_gpus=0.5",
                    f"run.storage_path={tmp_path / 'runs'}"], tmp_path)
    assert done.returncode == 2 and "cbd.teacher_workers=2 with cbd.teacher_gpus=0.5" in done.stderr, done.stderr
