"""The project's two kinds of error (rayexperts/errors.py): every error class derives from one of them, and only the
command line (``rayexperts.cli.main``) turns them into one line on stderr and an exit status (bad input 2, a failed
run 1, Ctrl-C 130)."""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

from rayexperts import cli
from rayexperts.errors import InputError, RunError

PACKAGE = Path(__file__).resolve().parents[1] / "rayexperts"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every exception class defined in the package, found in the source (a class whose base is
    a built-in exception or another such class), so a new one cannot be missed."""
    defined: dict[str, tuple[str, list[str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))]
                defined[node.name] = (module, bases)
    builtin = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
               and issubclass(getattr(builtins, n), BaseException)}
    errors: set[str] = set()
    while True:
        found = {name for name, (_, bases) in defined.items() if any(b in builtin or b in errors for b in bases)}
        if found == errors:
            return sorted((defined[name][0], name) for name in errors)
        errors = found


ERRORS = _error_classes()


def test_every_error_class_is_bad_input_or_a_failed_run():
    names = {name for _, name in ERRORS}
    assert {"ConfigError", "DataError", "StorageError", "PrerequisiteFailed", "RunFailed"} <= names  # the scan works
    for module, name in ERRORS:
        cls = getattr(importlib.import_module(module), name)
        if cls in (InputError, RunError):
            continue
        assert issubclass(cls, InputError) != issubclass(cls, RunError), f"{module}.{name}: one of the two, not both"


@pytest.mark.parametrize("module,name", ERRORS, ids=[name for _, name in ERRORS])
def test_each_error_family_is_one_line_and_its_status_from_the_command_line(module, name, monkeypatch, capsys):
    cls = getattr(importlib.import_module(module), name)

    def command(argv):
        raise cls("run.storage_path='/nowhere': what went wrong")

    monkeypatch.setitem(cli.COMMANDS, "failing", (command, "a command that fails"))
    assert cli.main(["failing"]) == (2 if issubclass(cls, InputError) else 1)
    captured = capsys.readouterr()
    assert captured.err == "error: run.storage_path='/nowhere': what went wrong\n" and captured.out == ""


def test_ctrl_c_says_how_to_resume_a_job_and_nothing_more_elsewhere(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", (interrupted, ""))
    monkeypatch.setitem(cli.COMMANDS, "presets", (interrupted, ""))
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: run the same command again to resume (same run.name) "
                                               "from the latest checkpoint")
    assert cli.main(["presets"]) == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_a_run_that_fails_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    """The real path: a run failing in the worker becomes RunFailed in the driver (launch/train.py), naming the run
    and its traceback file; the command line gives status 1."""
    import rayexperts.launch.train as launch_train

    def fails(cfg):
        raise ZeroDivisionError("in the worker")

    monkeypatch.setattr(launch_train, "train_in_process", fails)
    code = cli.main(["train", "run.ray=false", f"run.storage_path={tmp_path}", "run.name=r", "run.verbose=false"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err == f"error: run r failed: ZeroDivisionError: in the worker (traceback: {tmp_path}/r/error.log)"
    assert "ZeroDivisionError" in (tmp_path / "r" / "error.log").read_text()


def test_the_maintainer_scripts_go_through_the_command_line(capsys):
    """jobs/gpu_rows.py and jobs/compare_official.py are run_job(...) of a maintainer command: their --help, and
    their bad input (an error of theirs) one line with status 2."""
    for command in cli.MAINTAINER_COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out
        script = (PACKAGE.parent / "jobs" / f"{command.replace('-', '_')}.py").read_text()
        assert f'run_job("{command}")' in script
    assert cli.main(["gpu-rows", "--cpu", "--data", "/nowhere/cifar.parquet"]) == 2
    assert capsys.readouterr().err == "error: --data /nowhere/cifar.parquet: no such file (the CIFAR-10 Parquet file)\n"
