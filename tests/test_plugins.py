"""Plugins (docs/development.md "Plugins"): a package outside the repository adds a method through the
entry-point group ``rayexperts.plugins`` and trains through the console command with one worker, two Ray
Train workers and in a Tune sweep; a plugin that fails to import is one line and exit status 2 before Ray
starts; built-in methods are found without a hand-kept map. The ``ray job submit`` path is in
tests/test_cluster.py (``py_modules`` + ``run.plugins``)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

import rayexperts.methods as methods_package
from helpers import PLUGIN_MODULE as MODULE, PLUGIN_PACKAGE as PACKAGE, quick_overrides, write_plugin_package
from rayexperts.registry import METHODS, builtin_methods

BIN = Path(sys.executable).parent


def rayexperts(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([str(BIN / "rayexperts"), *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# -- registration and discovery (no Ray) ---------------------------------------------------------


def test_builtin_methods_are_found_by_reading_the_method_modules():
    """The registry's scan of rayexperts/methods/*.py names exactly what importing each module registers."""
    for info in pkgutil.iter_modules(methods_package.__path__):
        importlib.import_module(f"rayexperts.methods.{info.name}")
    modules = {n: METHODS.get(n).__module__ for n in METHODS.names()}
    registered = {n: m for n, m in modules.items() if m.startswith("rayexperts.methods.")}
    assert builtin_methods() == registered
    assert {"ce", "ride", "ride_ea"} <= set(registered) and registered["ride_ea"] == "rayexperts.methods.ride"
    assert METHODS.origin("ride_ea") == "built-in rayexperts.methods.ride"


def test_the_registry_decorator_sets_the_name_too(tmp_path):
    """``@METHODS.register("name")`` (the form older docstrings showed) names the method's config section,
    as ``@register_method`` does; an empty name is refused."""
    code = textwrap.dedent('''
        from dataclasses import dataclass
        from rayexperts.config import load_config
        from rayexperts.errors import ConfigError
        from rayexperts.methods.base import Method
        from rayexperts.registry import METHODS

        @dataclass
        class Opts:
            w: float = 1.0

        @METHODS.register("via_registry")
        class ViaRegistry(Method):
            Options = Opts

        cfg = load_config(None, ["method=via_registry", "via_registry.w=2"])
        print(ViaRegistry.name, cfg.via_registry.w, METHODS.origin("via_registry"))
        try:
            METHODS.register("", ViaRegistry)
        except ConfigError as e:
            print(e)
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["via_registry 2.0 script __main__",
                                        "a method registers under a non-empty name: register('', ...)"]


def test_a_plugin_that_fails_to_import_is_one_line_and_status_2(tmp_path):
    """``run.plugins`` naming a missing module, and an installed entry point whose module raises: one line naming
    the plugin, exit status 2, nothing started or written."""
    done = rayexperts(["train", "run.plugins=[no_such_plugin]", f"run.storage_path={tmp_path / 'runs'}"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: plugin 'no_such_plugin' (run.plugins) failed to import: "
                                   "ModuleNotFoundError: No module named 'no_such_plugin'")
    assert not (tmp_path / "runs").exists()

    site = tmp_path / "site"  # a distribution found by importlib.metadata on PYTHONPATH, its module broken
    (site / "rx_broken-0.1.dist-info").mkdir(parents=True)
    (site / "rx_broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: rx-broken\nVersion: 0.1\n")
    (site / "rx_broken-0.1.dist-info" / "entry_points.txt").write_text("[rayexperts.plugins]\nbroken = rx_broken\n")
    (site / "rx_broken.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    done = rayexperts(["train", f"run.storage_path={tmp_path / 'runs'}"], tmp_path, env={"PYTHONPATH": str(site)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == ("error: plugin 'rx_broken' (entry point 'broken' of package rx-broken, group "
                                   "rayexperts.plugins) failed to import: RuntimeError: needs a GPU driver")
    assert not (tmp_path / "runs").exists()


def test_a_worker_that_cannot_import_the_drivers_plugin_names_it():
    """What a Ray worker gets from the driver (``registry.ship()``) names the plugin modules; one the worker cannot
    import is an error that says how to carry it."""
    from rayexperts.errors import ConfigError
    from rayexperts.registry import load_plugins, ship

    shipped = ship()
    assert set(shipped) == {"modules", "entries"} and set(shipped["entries"]) == {"method", "data.name",
                                                                                 "model.backbone"}
    with pytest.raises(ConfigError) as e:
        load_plugins(shipped={"modules": {"rx_not_on_this_node": "plugin rx-x (rx_not_on_this_node)"}})
    assert str(e.value) == ("plugin 'rx_not_on_this_node' (a plugin of the driver: install its package on every node "
                            "or ship it with the runtime environment's py_modules) failed to import: "
                            "ModuleNotFoundError: No module named 'rx_not_on_this_node'")


def test_the_primary_view_may_depend_on_the_config(tmp_path):
    """A method whose headline view depends on K overrides ``primary_view_for``; what reads a run's view (the
    report here, the engine's progress and Tune's metric the same way) gets the view of that run's config."""
    from rayexperts.config import load_config
    from rayexperts.methods.base import Method, register_method
    from rayexperts.report import _primary_view
    from rayexperts.rundir import RunDir

    @register_method("kview_probe")
    class KView(Method):
        @classmethod
        def primary_view_for(cls, cfg):
            return "ensemble" if int(cfg.model.num_experts) > 1 else "expert0"

    views = {}
    for k in (1, 3):
        cfg = load_config(None, ["method=kview_probe", f"model.num_experts={k}"])
        RunDir.of(str(tmp_path), f"k{k}").write_config(cfg)
        views[k] = _primary_view({"method": "kview_probe"}, tmp_path / f"k{k}")
    assert views == {1: "expert0", 3: "ensemble"} and KView.primary_view == "expert0"  # the class default stays


# -- an installed plugin package trains everywhere -------------------------------------------------


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The plugin package, built outside the repository and pip-installed into this environment (no build
    isolation, no dependencies: a few seconds); uninstalled afterwards."""
    root = write_plugin_package(tmp_path_factory.mktemp("plugin_pkg"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(root)], check=True,
                   capture_output=True, timeout=300)
    try:
        yield root
    finally:
        subprocess.run([*pip, "uninstall", "-y", PACKAGE], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def on_cluster(ray_cluster) -> dict[str, str]:
    """The environment of a command that joins the session's Ray cluster (no start-up of its own)."""
    return {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


@pytest.mark.slow
def test_rayexperts_methods_names_the_plugin_package(installed_plugin, tmp_path):
    done = rayexperts(["methods"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert rows["plugdemo"].endswith(f"plugin {PACKAGE} ({MODULE})")
    assert "K independent networks" in rows["plugdemo"]
    assert rows["ncl"].endswith("built-in rayexperts.methods.ncl")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_an_installed_plugin_method_trains_through_the_console_command(installed_plugin, on_cluster, tmp_path,
                                                                      workers):
    """``rayexperts train method=plugdemo data.name=plugdemo-digits`` (the plugin's method, option and data
    set): one worker in a Ray actor, or two Ray Train workers; the plugin is imported in each of those processes."""
    args = quick_overrides(tmp_path, "plug", **{"method": "plugdemo", "plugdemo.smoothing": 0.05,
                                                "data.name": "plugdemo-digits",
                                                "train.epochs": 1, "scaling.num_workers": workers,
                                                "scaling.cpus_per_worker": 1})
    done = rayexperts(["train", *args], tmp_path, env=on_cluster)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "plug"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "plugdemo" and saved["plugdemo"] == {"smoothing": 0.05}
    assert saved["data"]["name"] == "plugdemo-digits"
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert sorted(metrics["view"].unique()) == ["ensemble", "expert0", "expert1"] and "loss_ce" in metrics
    assert "ensemble" in done.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_an_installed_plugin_method_is_swept_over_its_own_option(installed_plugin, on_cluster, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("plugdemo.smoothing: {choice: [0.0, 0.2]}\n")
    args = ["--space", str(space), "method=plugdemo", "tune.num_samples=2", "tune.scheduler=fifo",
            *quick_overrides(tmp_path, "plugsweep", **{"train.epochs": 1, "scaling.cpus_per_worker": 1})]
    done = rayexperts(["sweep", *args], tmp_path, env=on_cluster)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "runs" / "plugsweep" / "trials.parquet")
    assert sorted(trials["plugdemo.smoothing"]) == [0.0, 0.2]
    for run in trials["run"]:  # each trial trained the plugin's method
        saved = yaml.safe_load((tmp_path / "runs" / "plugsweep" / run / "config.yaml").read_text())
        assert saved["method"] == "plugdemo"
