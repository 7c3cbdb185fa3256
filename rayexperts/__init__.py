"""rayexperts: long-tailed recognition with multiple experts (MLLT, NCL, ECL, CBD) on Ray.

Importing the package costs nothing: subpackages are imported where they are used.
"""

from __future__ import annotations

from pathlib import Path

from rayexperts.errors import InputError

__version__ = "0.2.0"

PACKAGE_DIR = Path(__file__).resolve().parent
# What a complete copy of the package holds (an upload whose excludes dropped one of these is not).
REQUIRED = ("config", "registry.py", "rundir.py", "losses", "data", "models", "methods", "engine", "eval",
            "launch", "presets")


def __getattr__(name: str):
    """``rayexperts.load`` (:func:`rayexperts.inference.load.load`), imported on first use: ``import rayexperts``
    imports neither torch nor Ray."""
    if name == "load":  # by name: the layers below (engine, launch) import this package, never inference
        import importlib

        return importlib.import_module("rayexperts.inference.load").load
    raise AttributeError(f"module 'rayexperts' has no attribute {name!r}")


class IncompletePackage(InputError, RuntimeError):
    """The imported rayexperts lacks files it needs (typically an upload whose excludes removed them)."""


def check_install() -> Path:
    """Stop with a clear message when the imported package is incomplete; returns its folder.

    ``ray job submit --working-dir .`` uploads the repository, and the job imports the uploaded
    copy. A gitignore-style exclude such as ``data/`` also matches ``rayexperts/data/``, and
    ``*.yaml`` the presets: such an upload would run with parts of the package missing.
    """
    missing = [name for name in REQUIRED if not (PACKAGE_DIR / name).exists()]
    if not missing and not any((PACKAGE_DIR / "presets").glob("*.yaml")):
        missing = ["presets/*.yaml"]
    if missing:
        raise IncompletePackage(
            f"the rayexperts package imported from {PACKAGE_DIR} is incomplete: "
            f"{', '.join('rayexperts/' + m for m in missing)} missing. With `ray job submit --working-dir .`, "
            "an exclude pattern removed it: anchor patterns to the repository root (\"/data/\", \"/runs/\"), "
            "as the README's command does."
        )
    return PACKAGE_DIR
