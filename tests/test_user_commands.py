"""What a user types, as README.md and docs/ write it (issue 41): every documented command parses and resolves
(``--print-config``, no Ray, no data outside the repository), every flag of a documented script exists, the
preset list reads whole, ``reproduce`` checks its data roots before Ray, the default run name is the same for
the same settings, and one list of the keys that can change a result serves paper_table, reproduce and resume."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from rayexperts import cli
from rayexperts.analysis import paper_table
from rayexperts.config import (PRESET_DIR, is_result_key, list_presets, load_config, parse_overrides, result_settings,
                               with_overrides)
from rayexperts.launch import reproduce_cost, reproduce_plan
from rayexperts.launch.train import default_run_name
from rayexperts.rundir import IDENTITY_KEYS, SCHEDULE_KEYS, RunDir, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Files a documented command names that the user writes: the test writes a small one in their place.
USER_FILES = {"my_setting.yaml": "base: cifar10_lt_if100_ce\ntrain.epochs: 5\n"}
# Subcommands that resolve a config and would train: checked with --print-config (the config, no Ray, no data).
RESOLVING = ("train", "cbd", "sweep")
# Subcommands whose documented examples read a data set or a run directory (outside the repository): they must
# exist; their arguments are not resolved here.
READS_OUTSIDE = ("data", "report", "eval", "predict", "export", "serve")


def _shell_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a Markdown file, continuation lines joined."""
    return [m.group(1).replace("\\\n", " ") for m in re.finditer(r"```(?:bash|sh)\n(.*?)```", path.read_text(), re.S)]


# `python jobs/X.py` is `rayexperts COMMAND` (what `ray job submit` runs).
JOBS = {"train": "train", "cbd_ens": "cbd", "sweep": "sweep", "reproduce": "reproduce", "report": "report"}


def _documented_commands() -> list[tuple[str, str]]:
    """(file, command line) of every ``rayexperts`` command (or ``python jobs/X.py`` job, as the command it is) in
    a shell block of README.md and docs/."""
    out = []
    for path in DOCS:
        for block in _shell_blocks(path):
            for line in block.splitlines():
                job = re.search(r"python jobs/(\w+)\.py (.*)", line)
                if line.strip().startswith("rayexperts "):
                    out.append((path.name, line.strip()))
                elif job and job.group(1) in JOBS:
                    out.append((path.name, f"rayexperts {JOBS[job.group(1)]} {job.group(2)}"))
    return out


def _heredocs(path: Path) -> dict[str, str]:
    """Files a doc's shell blocks write with ``cat > NAME <<'EOF'``."""
    return {m.group(1): m.group(2) for m in re.finditer(r"cat > (\S+) <<'EOF'\n(.*?)\nEOF", path.read_text(), re.S)}


@pytest.mark.parametrize("where,line", _documented_commands(),
                         ids=[f"{w}:{' '.join(line.split()[1:3])}" for w, line in _documented_commands()])
def test_every_documented_rayexperts_command_resolves(where, line, tmp_path, monkeypatch, capsys):
    """Each command as written: a job resolves its config with --print-config (a table over several data sets
    with one data.root is refused there); the information commands run."""
    monkeypatch.chdir(tmp_path)
    for name, text in {**USER_FILES, **{k: v for path in DOCS for k, v in _heredocs(path).items()}}.items():
        (tmp_path / name).write_text(text + "\n")
    argv = shlex.split(line, comments=True)[1:]
    if argv[0] in READS_OUTSIDE or "my_package" in line:  # a data set, a run directory, a package of your own
        assert argv[0] in cli.COMMANDS, f"{where}: {line}: no command {argv[0]!r}"
        return
    if argv[0] == "reproduce":  # its arguments, its rows and the data roots they need (each --print-config is slow)
        args = cli.parse_reproduce(argv[1:])
        overrides = parse_overrides(args.overrides)
        rows = reproduce_plan.select_rows(args)
        reproduce_plan.check_roots(rows[rows["preset"].astype(str).str.strip() != ""],
                              reproduce_plan.data_roots(args.data_root or []), "data.root" in overrides)
        return
    if argv[:2] == ["models", "summary"]:  # building and measuring a paper's model takes seconds: its config
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        load_config(config, [a for a in argv[2:] if "=" in a])
        return
    if argv[0] in RESOLVING:
        argv = [a for a in argv if a != "--dry-run"] + ["--print-config"]
    try:
        code = cli.main(argv)
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    assert code == 0, f"{where}: {line}\n{captured.err}"
    assert not list(tmp_path.glob("runs")), "a --print-config wrote a run directory"


def _documented_script_flags() -> list[tuple[str, str]]:
    """(script, --flag) for every ``python jobs/X.py ... --flag`` and ``python -m rayexperts.X ... --flag`` in
    README.md and docs/ (blocks and inline)."""
    found = set()
    for path in DOCS:
        text = path.read_text().replace("\\\n", " ")
        for m in re.finditer(r"python (?:jobs/(\w+)\.py|-m (rayexperts[\w.]*))([^`\n|#]*)", text):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", m.group(3)):
                found.add((m.group(1) or m.group(2), flag))
    return sorted(found)


def _script_options(script: str, capsys) -> str:
    """The options a ``jobs/`` script accepts: the --help of the command it runs, or the add_argument calls of its
    own source and of the rayexperts modules it imports (``from rayexperts.launch.rows import main``)."""
    if script.startswith("rayexperts"):  # python -m rayexperts.X: its __main__
        source = (REPO / script.replace(".", "/") / "__main__.py").read_text()
    else:
        source = (REPO / "jobs" / f"{script}.py").read_text()
    job = re.search(r"run_job\(\"([\w-]+)\"\)", source)  # a jobs/ script is the command it runs
    if job:
        with pytest.raises(SystemExit):
            cli.main([job.group(1), "--help"])
        return capsys.readouterr().out
    shown = ""
    command = re.search(r"sys\.argv\[1:1?\] = \[\"([\w-]+)\"", source)  # python -m rayexperts.X runs a command
    if command and command.group(1) in cli.COMMANDS:
        try:
            cli.main([command.group(1), "--help"])
        except SystemExit:
            pass
        shown = capsys.readouterr().out
    for module in re.findall(r"^from (rayexperts[\w.]*) import", source, re.M):
        path = REPO / (module.replace(".", "/") + ".py")
        source += path.read_text() if path.is_file() else ""
    return " ".join(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", source)) + " --help " + shown


def test_every_flag_of_a_documented_script_exists(capsys):
    """`python jobs/mutation_score.py --every 8` was documented after the flag was gone: every flag the docs
    give a script is one it accepts."""
    flags = _documented_script_flags()
    assert ("mutation_score", "--sample") in flags and ("rayexperts.eval", "--tau-on-val") in flags
    options = {script: _script_options(script, capsys) for script in {s for s, _ in flags}}
    missing = [f"{s} {flag}" for s, flag in flags if not re.search(rf"{flag}(?![\w-])", options[s])]
    assert not missing, f"documented but not accepted: {missing}"
    assert "--every" not in _script_options("mutation_score", capsys)


def test_every_preset_description_is_whole():
    """`rayexperts presets` printed 22 of 65 descriptions cut inside a parenthesis."""
    for name in list_presets():
        text = cli._description(PRESET_DIR / f"{name}.yaml")
        assert text[:1].isalnum(), (name, text)
        depth = 0
        for char in text:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, (name, text)
        assert depth == 0, (name, text)
        assert not text.endswith((",", ";", ":", "(", " ")), (name, text)
    # the cut is at the first sentence's end outside parentheses; a parenthesis citing a source is left out
    assert cli._description(PRESET_DIR / "cbd_imagenet_lt_r50.yaml") == "ImageNet-LT, ResNet-50, CBD_ENS"
    assert cli._description(PRESET_DIR / "digits_ce.yaml") == \
        "Quick demo on the embedded digits-lt (about a minute on 2 CPU cores)"


# ------------------------------------------------------------------------------------------------ help texts


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_texts_name_the_command_and_its_real_options(capsys):
    sweep = _help(["sweep"], capsys)
    assert sweep.startswith("usage: rayexperts sweep") and "--print-config" in sweep and "run.name" in sweep
    assert _help(["reproduce"], capsys).startswith("usage: rayexperts reproduce")
    config = _help(["config"], capsys)  # config prints the config: no --print-config option that does nothing
    assert "[--print-config]" not in config and not re.search(r"^\s+--print-config", config, re.M)
    models = _help(["models"], capsys)
    assert models.startswith("usage: rayexperts models") and "``" not in models and "multiply-accumulates" in models


# ------------------------------------------------------------------------------------------------ reproduce


def _reproduce(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(["reproduce", *argv])
    except SystemExit as done:
        code = done.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_reproduce_with_a_wrong_data_root_fails_in_one_line_before_ray(tmp_path, capsys):
    code, out, err = _reproduce(["--paper", "NCL", "--table", "Table 1", "--dataset", "cifar100-lt", "--method", "NCL",
                                 f"data.root={tmp_path}/nowhere", f"run.storage_path={tmp_path}/runs"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"error: data.root='{tmp_path}/nowhere' does not exist (data set cifar100-lt)\n"
    assert "[reproduce]" not in out and not (tmp_path / "runs" / "reproduce-ncl-table-1").exists()
    code, _, err = _reproduce(["--catalog", str(tmp_path / "none.csv")], capsys)
    assert code == 2 and err == f"error: --catalog {tmp_path}/none.csv: no such file\n"


def test_a_table_over_two_data_sets_needs_dataset_or_one_root_each(tmp_path, capsys):
    code, _, err = _reproduce(["--paper", "NCL", "--table", "Table 1", "data.root=/data/cifar-100-python",
                               "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "cifar10-lt: 6 settings, cifar100-lt: 6 settings" in err and "--dataset (cifar10-lt or cifar100-lt)" in err
    ten, hundred = tmp_path / "c10", tmp_path / "c100"
    args = cli.parse_reproduce(["--paper", "NCL", "--table", "Table 1", "--method", "NCL", "--seeds", "1",
                            "--data-root", f"cifar10-lt={ten}", "--data-root", f"cifar100-lt={hundred}"])
    settings, _, _ = reproduce_plan.plan(reproduce_plan.select_rows(args), args, {})
    roots = {(c.data.name, c.data.root) for s in settings for c in s.configs}
    assert roots == {("cifar10-lt", str(ten)), ("cifar100-lt", str(hundred))} and len(settings) == 4
    code, _, err = _reproduce(["--paper", "NCL", "--table", "Table 1", "--dataset", "cifar10-lt",
                               "--data-root", f"cifar100-lt={hundred}", "--print-config"], capsys)
    assert code == 2 and "no selected row trains on cifar100-lt" in err
    code, _, err = _reproduce(["--paper", "NCL", "--table", "Table 1", "--data-root", "cifar10-lt"], capsys)
    assert code == 2 and "give DATASET=PATH" in err
    code, _, err = _reproduce(["--paper", "NCL", "--table", "Table 1", "--data-root", f"cifar10-lt={ten}",
                               f"data.root={ten}"], capsys)
    assert code == 2 and "not both" in err


def test_reproduce_run_names_ignore_paths_and_resources(tmp_path):
    """The same rows with another data.root or CPU share reuse the same run directories; a key that can change
    the result names other ones."""
    args = cli.parse_reproduce(["--paper", "NCL", "--table", "Table 1", "--dataset", "cifar10-lt", "--method", "NCL",
                            "--seeds", "1"])
    table = reproduce_plan.select_rows(args)

    def names(*overrides: str) -> list[str]:
        settings, _, _ = reproduce_plan.plan(table, args, parse_overrides(list(overrides)))
        return [c.run.name for s in settings for c in s.configs]

    plain = names()
    assert names(f"data.root={tmp_path}", "scaling.cpus_per_worker=2", "run.storage_path=/elsewhere") == plain
    assert names("train.lr=0.05") != plain


def test_dry_run_resources_read_as_words(capsys):
    args = cli.parse_reproduce(["--paper", "NCL", "--table", "Table 1", "--dataset", "cifar10-lt", "--method", "NCL",
                            "--seeds", "1"])
    settings, skipped, _ = reproduce_plan.plan(reproduce_plan.select_rows(args), args, {})
    settings = settings[:2]
    for s in settings:
        s.configs = [with_overrides(c, {"scaling.cpus_per_worker": 0.0}) for c in s.configs]
    settings[1].configs = [with_overrides(c, {"scaling.cpus_per_worker": 2.0}) for c in settings[1].configs]
    reproduce_cost.print_plan(settings, skipped.iloc[:0], {}, "CPU")
    out = capsys.readouterr().out
    assert "(0: a share)" not in out and "a share of the CPUs" in out and " 2 CPU " in out


# ------------------------------------------------------------------------------------------------ run names


def test_the_default_run_name_is_stable_and_follows_the_result_keys(tmp_path):
    def name(*overrides: str) -> str:
        return default_run_name(load_config("cifar10_lt_if100_ncl", list(overrides)))

    first = name("seed=1")
    assert first == name("seed=1") and re.fullmatch(r"ncl-cifar10-lt-[0-9a-f]{8}", first)
    assert name("seed=1", f"data.root={tmp_path}", f"run.storage_path={tmp_path}", "tune.num_samples=3",
                "scaling.cpus_per_worker=2", "run.verbose=false") == first
    assert name("seed=2") != first and name("seed=1", "ncl.hard_ratio=0.25") != first
    # the *_ride_ea presets: the same command names the same job, whose experts/ stage 1 it finds again
    assert default_run_name(load_config("cifar100_lt_if100_ride_ea")) == \
        default_run_name(load_config("cifar100_lt_if100_ride_ea"))


# ------------------------------------------------------------------------------------------------ result keys


def test_one_list_of_result_keys():
    for key in ("run.name", "run.storage_path", "run.verbose", "tune.num_samples", "tune.metric", "data.root",
                "scaling.cpus_per_worker", "scaling.gpus_per_worker", "layers", "sources"):
        assert not is_result_key(key), key
    for key in ("seed", "method", "compat", "train.lr", "data.name", "data.root_x", "scaling.num_workers",
                "scaling.use_gpu", "ncl.hard_ratio", "runner.x", "tuned"):
        assert is_result_key(key), key
    assert all(is_result_key(k) for k in (*SCHEDULE_KEYS, *IDENTITY_KEYS))
    flat = result_settings(load_config("digits_ce"))
    assert "train.lr" in flat and not any(k.startswith(("run.", "tune.")) for k in flat) and "data.root" not in flat


def _runs(**differ) -> pd.DataFrame:
    """Two runs' last-epoch rows, the same but for ``differ`` (key: (value of run a, value of run b))."""
    rows = []
    for i, run in enumerate(("a", "b")):
        rows.append({"run": run, "epoch": 4, "view": "expert0", "top1": 0.5 + 0.1 * i, "top1_many": 0.6,
                     "top1_medium": 0.5, "top1_few": 0.4, "method": "ce", "seed": i, "train.lr": 0.1,
                     **{k: v[i] for k, v in differ.items()}})
    df = pd.DataFrame(rows)
    df.attrs["config_columns"] = [c for c in df.columns if c == "method" or c == "seed" or "." in c]
    return df


def test_paper_table_averages_a_plain_run_with_an_identical_sweep_trial():
    df = _runs(**{"run.name": ("ce-x", "trial_0"), "run.storage_path": ("/a", "/b/sweep"),
                  "tune.num_samples": (8, 16), "scaling.cpus_per_worker": (0.0, 1.0), "data.root": ("/d", "/e")})
    table = paper_table(df, by=("method", "view"), seeds="seed")
    assert table.loc[("ce", "expert0"), "All"] == "55.00 ± 7.07" and table.loc[("ce", "expert0"), "seeds"] == 2


def test_paper_tables_refusal_marks_values_it_leaves_out():
    df = pd.concat([_runs(**{"train.lr": (0.1, 0.2)}),
                    _runs(**{"train.lr": (0.3, 0.4)}).assign(run=lambda d: d["run"] + "2")], ignore_index=True)
    df.attrs["config_columns"] = ["method", "seed", "train.lr"]
    with pytest.raises(ValueError, match=re.escape("train.lr (0.1, 0.2, 0.3, …)")):
        paper_table(df, by=("method", "view"), seeds="seed")
    with pytest.raises(ValueError, match=r"train\.lr \(0\.1, 0\.2\): a row"):  # all shown: no ellipsis
        paper_table(_runs(**{"train.lr": (0.1, 0.2)}), by=("method", "view"), seeds="seed")


def test_resume_refuses_a_new_schedule_and_notes_other_changed_result_keys(tmp_path, capsys):
    cfg = load_config("digits_ce", [f"run.storage_path={tmp_path}", "run.name=r"])
    rundir = RunDir.for_config(cfg)
    rundir.write_config(cfg)
    import torch

    model = torch.nn.Linear(2, 2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint(ckpt, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1, ident={})
    rundir.put_checkpoint(str(ckpt), 1, keep=2)
    rundir.check_schedule(with_overrides(cfg, {"data.root": str(tmp_path), "scaling.cpus_per_worker": 2.0,
                                               "run.verbose": False}))
    assert capsys.readouterr().out == ""  # paths, resources and run.* are no change
    rundir.check_schedule(with_overrides(cfg, {"data.sampler": "class_balanced"}))
    assert "changed settings (data.sampler='auto' there, 'class_balanced' now)" in capsys.readouterr().out
    from rayexperts.rundir import ScheduleChanged

    with pytest.raises(ScheduleChanged, match="train.lr=0.05 there, 0.2 now"):
        rundir.check_schedule(with_overrides(cfg, {"train.lr": 0.2}))


# ------------------------------------------------------------------------------------------------ progress


def test_the_epoch_line_carries_the_whole_runs_eta():
    from rayexperts.engine.results import duration, progress_line, time_left

    rows = [{"view": "expert0", "top1": 0.5, "loss": 1.0, "lr": 0.1, "images_per_sec": 100.0}]
    assert progress_line(2, 30, rows, "expert0", eta=27 * 60.0).endswith("expert0 50.00% | run ETA 27.0 min")
    assert "ETA" not in progress_line(29, 30, rows, "expert0", eta=0.0)  # the last epoch: nothing left
    # epoch 3 of 10 (0-based 2), step 40 of 100 at 0.5 s a step: 60 steps (30 s) left in it, then 7 epochs of 50 s
    assert time_left(40, 100, 2, 10, 0.5) == (30.0, 30.0 + 7 * 50.0)
    assert time_left(100, 100, 9, 10, 0.5) == (0.0, 0.0)
    assert [duration(s) for s in (45, 119.6, 120, 7199, 7200, 11520)] == ["45 s", "120 s", "2.0 min", "120.0 min",
                                                                          "2.0 h", "3.2 h"]
