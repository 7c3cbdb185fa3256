"""Maintainer measurement (not a test): what ``rayexperts train`` runs before its first loss.

    python jobs/trace_first_loss.py [--list] [--config digits_ce] [key=value ...]

Runs ``rayexperts train`` in this process (``run.ray=false``: driver and worker are one process, so both
halves are seen; tiny settings by default: the digits preset, one epoch, batches of 16, a throw-away run
directory) under :func:`sys.setprofile`, and stops at the first call of a method's ``training_step`` or
``mixed_step`` (the engine's first loss, docs/architecture.md). Prints how many distinct ``rayexperts``
modules and functions ran on the way (a module counts when one of its functions ran; module and class bodies
run by imports are counted apart), the calls made, and how often the path entered each module from another one
("visits"). ``--list`` lists every module with its functions. Extra ``key=value`` overrides go to the
command. Which ``rayexperts`` is measured is the one imported (``PYTHONPATH=DIR`` measures another tree);
its path is printed. Threads are followed (:func:`threading.setprofile`); DataLoader worker processes not.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from pathlib import Path

STOP_AT = ("training_step", "mixed_step")


class FirstLoss(BaseException):
    """Raised from the profiler at the first loss: a BaseException, so no ``except Exception`` holds it."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the modules and functions")
    parser.add_argument("--config", default="digits_ce")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import rayexperts
    from rayexperts.cli import main as cli_main

    root = Path(rayexperts.__file__).resolve().parent
    prefix = str(root) + "/"
    functions: dict[str, Counter] = defaultdict(Counter)  # module -> {qualname: calls}
    visits: Counter = Counter()
    imported: set[str] = set()
    main_thread = threading.get_ident()

    def module_of(filename: str) -> str | None:
        if not filename.startswith(prefix):
            return None
        rel = filename[len(prefix):].removesuffix(".py").replace("/", ".")
        return "rayexperts" + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))

    def profile(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        module = module_of(code.co_filename)
        if module is None:
            return
        if not code.co_flags & inspect.CO_OPTIMIZED:  # a module or class body, run by an import
            imported.add(module)
            return
        if code.co_name in STOP_AT and module.startswith("rayexperts.methods.") and threading.get_ident() == main_thread:
            functions[module][code.co_qualname] += 1
            raise FirstLoss
        functions[module][code.co_qualname] += 1
        caller = frame.f_back
        if caller is None or module_of(caller.f_code.co_filename) != module:
            visits[module] += 1

    with tempfile.TemporaryDirectory(prefix="trace-first-loss-") as tmp:
        shown = ["train", "--config", args.config, "run.ray=false", "train.epochs=1", "train.batch_size=16",
                 *args.overrides]
        argv = [*shown, f"run.storage_path={tmp}", "run.name=trace"]
        threading.setprofile(profile)
        sys.setprofile(profile)
        try:
            rc = cli_main(argv)
        except FirstLoss:
            rc = None
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
    if rc is not None:
        print(f"rayexperts train returned {rc} without reaching a loss", file=sys.stderr)
        return 1

    n_functions = sum(len(f) for f in functions.values())
    n_calls = sum(sum(f.values()) for f in functions.values())
    print(f"rayexperts: {root}")
    print(f"command: rayexperts {' '.join(shown)} (run directory: a temporary one)")
    print(f"to the first loss: {len(functions)} modules, {n_functions} functions, {n_calls} calls, "
          f"{sum(visits.values())} module entries; {len(imported)} modules imported")
    if args.list:
        for module in sorted(functions, key=lambda m: -len(functions[m])):
            names = functions[module]
            print(f"\n{module}: {len(names)} functions, {sum(names.values())} calls, {visits[module]} visits")
            for name, calls in sorted(names.items()):
                print(f"    {name}  x{calls}")
        idle = sorted(imported - set(functions))
        print(f"\nimported, no function run ({len(idle)}): {', '.join(idle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
