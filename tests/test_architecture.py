"""The architecture the project promises: dependencies point one way (import-linter contracts in
pyproject.toml), the config and the engine name no method, and adding a method is one module plus
one preset: a method defined in this file trains and evaluates through the jobs' own code path."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rayexperts.methods import LossOutput, Method, register_method
from rayexperts.registry import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "5 kept, 0 broken" in done.stdout


def test_the_train_and_cbd_drivers_import_no_torch():
    """The drivers of jobs/train.py and jobs/cbd_ens.py parse the config, check the run directory and print
    tables without torch (about 3 s of imports on 2 cores): only their Ray workers import it."""
    code = ("import sys; import rayexperts.launch.train, rayexperts.launch.ensemble; "
            "from rayexperts.config import load_config; from rayexperts.rundir import RunDir; "
            "cfg = load_config('cbd_digits', []); RunDir.of(sys.argv[1], 'x').holds_run_of(cfg); "
            "print(sorted(m for m in ('torch', 'torchvision', 'rayexperts.engine') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "runs-never-written")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_config_registry_and_engine_name_no_method():
    names = [n for n in METHODS.names()]
    sources = [*sorted((REPO / "rayexperts" / "config").glob("*.py")),
               *sorted((REPO / "rayexperts" / "engine").glob("*.py"))]
    for path in sources:
        code = re.sub(r"#.*", "", path.read_text())
        for name in names:
            assert not re.search(rf"[\"']{name}[\"']|\b{name}\.", code), f"{path.name} names method {name!r}"


# -- a method added from outside the package ----------------------------------------------------


@dataclass
class SmoothingOptions:
    smoothing: float = 0.1  # label smoothing ε of each expert's cross-entropy


@register_method("toy_smoothing")
class LabelSmoothingExperts(Method):
    """K independent networks, each trained with label-smoothed cross-entropy."""

    Options = SmoothingOptions
    defaults = {"model.num_experts": 2}
    primary_view = "ensemble"

    def build_model(self):
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)

    def loss(self, out, targets):
        import torch.nn.functional as F

        ce = sum(F.cross_entropy(z.float(), targets, label_smoothing=float(self.opts.smoothing)) for z in out.logits)
        return LossOutput(ce, {"ce": ce.detach()})


def test_a_plugin_method_has_its_own_config_section():
    from rayexperts.config import load_config

    cfg = load_config(None, ["method=toy_smoothing", "toy_smoothing.smoothing=0.2"])
    assert cfg.toy_smoothing.smoothing == 0.2 and cfg.model.num_experts == 2
    assert "method toy_smoothing defaults" in cfg.layers
    assert "toy_smoothing" in METHODS.plugins()


@pytest.mark.ray
def test_a_method_defined_here_trains_through_the_jobs_code_path(ray_cluster, tmp_path, capsys):
    from rayexperts.cli import train as main

    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({
        "method": "toy_smoothing", "toy_smoothing": {"smoothing": 0.05}, "data": {"name": "digits-lt"},
        "train": {"epochs": 3}, "run": {"storage_path": str(tmp_path / "runs"), "name": "toy", "verbose": False},
    }))
    assert main(["--config", str(preset)]) == 0
    run = tmp_path / "runs" / "toy"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "toy_smoothing" and saved["toy_smoothing"] == {"smoothing": 0.05}
    assert saved["layers"][-1] == f"file {preset}"
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert sorted(metrics["view"].unique()) == ["ensemble", "expert0", "expert1"]
    assert "loss_ce" in metrics and metrics["epoch"].max() == 2
    assert (metrics[metrics["epoch"] == 2]["top1"] > 0.3).all()  # 10 classes: chance is 0.1
    assert "ensemble" in capsys.readouterr().out


def test_no_module_imports_itself_through_others():
    """No import circle anywhere in the package (module-level and function-level imports alike)."""
    import grimp

    graph = grimp.build_graph("rayexperts")
    modules = sorted(graph.modules)
    edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(modules)) for m in modules}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for nxt in edges[module]:
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
