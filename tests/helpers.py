"""Small helpers shared by tests (importable as ``helpers``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

# The short CBD demo job every CBD test and the cluster test run (dotted overrides of preset cbd_digits):
# two teachers of 10 epochs at once, then a 1-epoch student.
CBD_TEACHERS = "[{type: standard, seed: 0}, {type: data_aug, seed: 1}]"
CBD_JOB = ["train.epochs=1", "cbd.teacher_epochs=10", "cbd.teacher_cpus=1", f"cbd.teachers={CBD_TEACHERS}",
           "run.name=job"]
VOLATILE = ("timestamp", "images_per_sec", "train_seconds")  # metrics columns that measure time


def quick_overrides(tmp_path: Path, name: str, **extra) -> list[str]:
    """Overrides for a few-second digits-lt run."""
    base = {
        "run.storage_path": str(tmp_path / "runs"),
        "run.name": name,
        "train.epochs": 2,
        "train.batch_size": 64,
        "run.verbose": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def metrics_without_time(run_dir: Path):
    """A run's metrics.parquet without the columns that measure time, in (epoch, view) order."""
    import pandas as pd

    df = pd.read_parquet(Path(run_dir) / "metrics.parquet")
    return df.drop(columns=[c for c in VOLATILE if c in df]).sort_values(["epoch", "view"], ignore_index=True)


# A plugin package from outside the repository (docs/development.md "Plugins"): method ``plugdemo``
# and data set ``plugdemo-digits``.
PLUGIN_PACKAGE = "rx-plugdemo"  # the distribution's name
PLUGIN_MODULE = "rx_plugdemo.methods"  # what its entry point names

PLUGIN_METHOD = '''
"""Label-smoothed experts: a method from outside rayexperts."""
from dataclasses import dataclass

from rayexperts.data.digits import DEFAULTS, build_digits
from rayexperts.data.lt_dataset import DataSetEntry
from rayexperts.methods.base import LossOutput, Method, register_method
from rayexperts.registry import DATASETS

# a data set: the digits under a name of the plugin's own
DATASETS.register("plugdemo-digits", DataSetEntry(build_digits, DEFAULTS, num_classes=10, in_channels=1,
                                                  needs_root=False))


@dataclass
class SmoothingOptions:
    smoothing: float = 0.1  # label smoothing of each expert's cross-entropy


@register_method("plugdemo")
class PlugDemo(Method):
    """K independent networks with label-smoothed cross-entropy (a plugin)."""

    Options = SmoothingOptions
    defaults = {"model.num_experts": 2}
    primary_view = "ensemble"

    def build_model(self):
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False)

    def loss(self, out, targets):
        import torch.nn.functional as F

        eps = float(self.opts.smoothing)
        ce = sum(F.cross_entropy(z.float(), targets, label_smoothing=eps) for z in out.logits)
        return LossOutput(ce, {"ce": ce.detach()})
'''


def write_plugin_package(root: Path) -> Path:
    """A pip-installable package (src layout, ``root/src/rx_plugdemo``) whose entry point in the group
    ``rayexperts.plugins`` names PLUGIN_MODULE (tests/test_plugins.py, tests/test_cluster.py)."""
    (root / "src" / "rx_plugdemo").mkdir(parents=True)
    (root / "src" / "rx_plugdemo" / "__init__.py").write_text("")
    (root / "src" / "rx_plugdemo" / "methods.py").write_text(PLUGIN_METHOD)
    (root / "pyproject.toml").write_text(textwrap.dedent(f'''\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{PLUGIN_PACKAGE}"
        version = "0.1"

        [project.entry-points."rayexperts.plugins"]
        plugdemo = "{PLUGIN_MODULE}"

        [tool.setuptools.packages.find]
        where = ["src"]
        '''))
    return root


# A sitecustomize that makes Ray unimportable for a child interpreter (a machine without Ray, like a lent GPU
# machine): every attempt to import it is recorded in the file $RAY_ATTEMPTS and fails as a missing module.
NO_RAY_SITECUSTOMIZE = '''
import os
import sys


class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            with open(os.environ["RAY_ATTEMPTS"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NoRay())
'''


def without_ray(tmp_path: Path, *pythonpath: str) -> tuple[dict[str, str], Path]:
    """(an environment whose interpreters cannot import Ray, with ``pythonpath`` after the blocker; the file that
    lists every attempt to import it: absent while there was none)."""
    import os

    site = tmp_path / "no-ray-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_RAY_SITECUSTOMIZE)
    attempts = tmp_path / "ray-import-attempts.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *pythonpath]), "RAY_ATTEMPTS": str(attempts)}
    return env, attempts
