"""The ``rayexperts`` command: ``rayexperts train|cbd|sweep|reproduce|report|config|presets|methods|models|data``.

``jobs/*.py`` are the same commands as scripts (what ``ray job submit -- python jobs/X.py`` runs). Every job
takes ``--config PRESET_OR_YAML``, dotted ``key=value`` overrides and ``--print-config`` (the resolved config,
each value with the layer that set it; no Ray started). Errors are one line on stderr with exit status 2 (bad
input) or 1 (a run failed; its traceback is in the run directory's ``error.log``); Ctrl-C says how to resume.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

RESULTS = ("Results go to run.storage_path/run.name/ (default ./runs/<method>-<data>-<hash>/, the hash of the "
           "settings that can change the result): config.yaml, metrics.parquet (0-based epochs, fractions), "
           "classes.parquet, checkpoints.")
RESUME = "Re-run the same command (the same settings, or the same run.name) to resume from the latest checkpoint; a " \
         "finished run is not trained again."


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + f"\n\n{RESULTS}\n{RESUME}"


def _errors() -> tuple[type[BaseException], ...]:
    from rayexperts.config import ConfigError
    from rayexperts.data.errors import DataError
    from rayexperts.launch.cluster import ClusterUnreachable
    from rayexperts.rundir import CheckpointMismatch, StorageError

    return ConfigError, DataError, CheckpointMismatch, StorageError, ClusterUnreachable


def _run(job: Callable[[], int], where: str = "") -> int:
    """Run a job: bad input is one line and status 2, a failed run one line and status 1, Ctrl-C one line."""
    from rayexperts.launch.ensemble import PrerequisiteFailed
    from rayexperts.launch.train import RunFailed

    try:
        return job()
    except _errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunFailed, PrerequisiteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume{where} from the latest checkpoint",
              file=sys.stderr)
        return 130


def _print_config(config: str | None, overrides: Sequence[str]) -> int:
    from rayexperts.config import explain

    print(explain(config, list(overrides)))
    return 0


# ------------------------------------------------------------------------------------------------ jobs


def train(argv: Sequence[str]) -> int:
    """One training run; a method with runs that must finish first (CBD's teachers, RIDE's experts for its
    router) trains them first, as ``rayexperts cbd`` does."""
    from rayexperts.launch.train import parse_cli

    args = parse_cli(argv, "rayexperts train", "One training run of any method: one worker in a Ray actor, "
                     "several through Ray Train; run.ray=false: one worker in this process, without Ray (pdb).",
                     _examples(
                         "rayexperts train                                    # the digits-lt demo (CE, 30 epochs)",
                         "rayexperts train --config cifar10_lt_if100_ncl data.root=/data/cifar-10-batches-py",
                         "rayexperts train --config cifar10_lt_if100_ce compat=official seed=1",
                         "rayexperts train method=mllt train.epochs=5 --print-config"))
    if args.print_config:
        return _run(lambda: _print_config(args.config, args.overrides))
    holder: dict = {}

    def job() -> int:
        from rayexperts.config import load_config
        from rayexperts.launch.ensemble import run_ensemble, summary_table
        from rayexperts.launch.train import announce, final_table, run_training
        from rayexperts.registry import METHODS
        from rayexperts.rundir import RunDir

        cfg = load_config(args.config, args.overrides)
        holder["dir"] = announce(cfg, "run directory")
        if METHODS.get(cfg.method).prerequisites(cfg):
            out = run_ensemble(cfg)
            print(f"\njob directory: {out['path']}")
            print(summary_table(out["summary"]).to_string())
            return 0
        out = run_training(cfg)
        metrics = RunDir(out["path"]).read_table("metrics.parquet")
        print(f"\nrun directory: {out['path']}")
        if metrics is not None:
            print("test top-1 (%) at the last epoch:")
            print(final_table(metrics).to_string())
        return 0

    return _run(job, " (same run.name)")


def cbd(argv: Sequence[str]) -> int:
    """CBD / CBD_ENS: the teachers in parallel, then the class-balanced student (the digits demo by default)."""
    from rayexperts.launch.train import parse_cli

    args = parse_cli(argv, "rayexperts cbd", "CBD / CBD_ENS: teachers in parallel on Ray, then the class-balanced "
                     "student. With no arguments: the digits-lt demo (preset cbd_digits).", _examples(
                         "rayexperts cbd                                      # the digits-lt demo",
                         "rayexperts cbd --config cbd_cifar100_lt_if100 data.root=/data/cifar-100-python "
                         "cbd.teacher_gpus=0 scaling.use_gpu=false",
                         "rayexperts cbd --config cbd_imagenet_lt_r50 compat=official data.root=/data/imagenet "
                         "run.storage_path=/shared/runs"))

    def config():
        from rayexperts.launch.ensemble import resolve_job_config

        return resolve_job_config(args.config, args.overrides)

    if args.print_config:
        from rayexperts.launch.ensemble import DEMO_PRESET
        from rayexperts.config import parse_overrides

        flat = parse_overrides(list(args.overrides))
        preset = args.config or (DEMO_PRESET if flat.get("data.name", "digits-lt") == "digits-lt" else None)
        return _run(lambda: _print_config(preset, [*args.overrides, "method=cbd"]))

    def job() -> int:
        from rayexperts.launch.ensemble import run_ensemble, summary_table
        from rayexperts.launch.train import announce

        cfg = config()
        announce(cfg, "job directory")
        out = run_ensemble(cfg)
        print(f"\njob directory: {out['path']}")
        print("test top-1 (%) per model:")
        print(summary_table(out["summary"]).to_string())
        return 0

    return _run(job)


def sweep(argv: Sequence[str]) -> int:
    if "--print-config" in argv:  # the trials' base config with each value's layer, before Ray Tune is imported
        import argparse

        parser = argparse.ArgumentParser(prog="rayexperts sweep")
        parser.add_argument("--space")
        parser.add_argument("--config")
        parser.add_argument("--print-config", action="store_true")
        parser.add_argument("overrides", nargs="*")
        args = parser.parse_args(list(argv))
        return _run(lambda: _print_config(args.config, args.overrides))
    from rayexperts.launch.tune import main

    return _run(lambda: main(list(argv)))


def reproduce(argv: Sequence[str]) -> int:
    from rayexperts.launch.reproduce import main

    return _run(lambda: main(list(argv)))


def report(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="rayexperts report",
                                     description="Tables and plots for a run, an ensemble job or a sweep, written "
                                                 "into DIR/report/ (report.md and PNG figures).")
    parser.add_argument("dir", help="a run directory, an ensemble job directory or a sweep directory")
    args = parser.parse_args(list(argv))

    def job() -> int:
        from rayexperts.report import write_report

        try:
            md = write_report(args.dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"report: {md}")
        return 0

    return _run(job)


# ------------------------------------------------------------------------------------------------ information


def config(argv: Sequence[str]) -> int:
    """``rayexperts config [--config X] [key=value ...]``: the resolved config with each value's layer."""
    import argparse

    parser = argparse.ArgumentParser(prog="rayexperts config", description="The resolved config, each value with the "
                                     "layer that set it (defaults, data set, method, preset, compat=official with its "
                                     "source, command line): what --print-config of the jobs prints.")
    parser.add_argument("--config", help="a shipped preset name (rayexperts presets lists them) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. train.epochs=15 model.num_experts=3")
    args = parser.parse_args(list(argv))
    return _run(lambda: _print_config(args.config, args.overrides))


def _description(path) -> str:
    """A preset's one-line description: its leading comment up to the first ``: ``, ``; `` or end of sentence
    outside parentheses; a parenthesis is kept whole, or left out when it cites a source."""
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text.append(line.lstrip("# ").strip())
    comment, depth, kept, group = " ".join(text), 0, "", ""
    for i, char in enumerate(comment):
        if depth == 0 and char in ".:;" and comment[i + 1:i + 2] in (" ", ""):
            break
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth or char == ")":
            group += char
            if depth == 0:  # a parenthesis closed: kept unless it only cites (docs/methods.md, repository@commit)
                kept += "" if "docs/methods.md" in group or "@" in group else group
                group = ""
        else:
            kept += char
    return " ".join(kept.split()).replace(" ,", ",")


def presets(argv: Sequence[str]) -> int:
    import argparse

    from rayexperts.config import PRESET_DIR, list_presets

    parser = argparse.ArgumentParser(prog="rayexperts presets",
                                     description="Every shipped preset with its one-line description "
                                                 "(rayexperts train --config NAME; --print-config shows all keys).")
    parser.add_argument("--official", action="store_true",
                        help="the table of what compat=official changes per preset, with sources")
    args = parser.parse_args(list(argv))
    if args.official:
        from rayexperts.recipes import markdown

        print(markdown())
        return 0
    names = list_presets()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {_description(PRESET_DIR / f'{name}.yaml')}")
    return 0


def methods(argv: Sequence[str]) -> int:
    import argparse
    import importlib

    from rayexperts.registry import METHODS, load_plugins

    argparse.ArgumentParser(prog="rayexperts methods", description="Every registered method (method=NAME) with "
                            "its paper and where it comes from (built-in module, or plugin package and module: "
                            "entry-point group rayexperts.plugins).").parse_args(list(argv))

    def job() -> int:
        load_plugins()
        rows = []
        for name in METHODS.names():
            cls = METHODS.get(name)
            own = cls.__dict__.get("__doc__") or ""
            doc = ((own or importlib.import_module(cls.__module__).__doc__ or "").strip().splitlines() or [""])[0]
            line = doc.split(":", 1)[-1].strip() if not own else doc
            line = line.split("; docs/methods.md")[0].rstrip(" ,.")
            rows.append((name, line + ")" if line.count("(") > line.count(")") else line, METHODS.origin(name)))
        width = max(len(r[0]) for r in rows)
        text = max(len(r[1]) for r in rows)
        for name, line, origin in rows:
            print(f"{name:<{width}}  {line:<{text}}  {origin}")
        return 0

    return _run(job)


def models(argv: Sequence[str]) -> int:
    from rayexperts.models.__main__ import main

    return main(list(argv), prog="rayexperts models")


def data(argv: Sequence[str]) -> int:
    from rayexperts.data.__main__ import main

    return main(list(argv))


# ------------------------------------------------------------------------------------------------ trained models


def _model_parser(prog: str, description: str, *examples: str):
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_examples(*examples).split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (an ensemble job's: its student/ or "
                        "teachers/teacherK)")
    parser.add_argument("--checkpoint", default="last",
                        help="last (default), best_test (selected on the test set) or a checkpoint_* directory name")
    return parser


def evaluate(argv: Sequence[str]) -> int:
    """``rayexperts eval RUN_DIR [key=value ...]`` (docs/inference.md)."""
    parser = _model_parser("rayexperts eval", "A run's checkpoint evaluated on another data set, split or test "
                           "distribution: every view's Many/Medium/Few/All and ECE (%), written to "
                           "RUN_DIR/eval/<name>.parquet (the metrics.parquet columns); the run's own files untouched.",
                           "rayexperts eval runs/my-run                                  # the run's test split again",
                           "rayexperts eval runs/my-run 'eval.test_distributions=[forward50,backward50]'",
                           "rayexperts eval runs/my-run data.root=/data/other.parquet --name other")
    parser.add_argument("overrides", nargs="*", help="dotted data.* / eval.* keys")
    parser.add_argument("--name", help="the evaluation's file name (default: from the overrides, or test)")
    args = parser.parse_args(list(argv))

    def job() -> int:
        from rayexperts.inference.evaluate import main

        return main(args.run_dir, args.overrides, args.checkpoint, args.name)

    return _run(job)


def predict(argv: Sequence[str]) -> int:
    """``rayexperts predict RUN_DIR --input PATH --out FILE.parquet`` on Ray Data (docs/inference.md)."""
    parser = _model_parser("rayexperts predict", "Batch prediction on Ray Data: an image folder, a text file of "
                           "image paths, or a Parquet file with an 'image' column of encoded images (local or a URI) "
                           "-> one Parquet row per input (id or path, label, class_name, prob, topk_labels, "
                           "topk_probs, error).",
                           "rayexperts predict runs/my-run --input photos/ --out predictions.parquet",
                           "rayexperts predict runs/my-run --input s3://bucket/images.parquet --out "
                           "s3://bucket/pred.parquet --workers 4")
    parser.add_argument("--input", required=True, help="image folder, list file or Parquet (local or URI)")
    parser.add_argument("--out", required=True, help="the output Parquet file (written atomically)")
    parser.add_argument("--view", help="the view (default: the method's primary view)")
    parser.add_argument("--top-k", type=int, default=5, help="labels and probabilities kept per image (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (a GPU each when the cluster has them)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each model actor holds (default 1)")
    parser.add_argument("--all-views", action="store_true", help="also every view's logits (logits_<view>)")
    args = parser.parse_args(list(argv))

    def job() -> int:
        from rayexperts.inference.predict import predict as run_predict

        out = run_predict(args.run_dir, args.input, args.out, args.view, args.top_k, args.workers, args.checkpoint,
                          args.all_views, args.batch_size, args.cpus_per_worker)
        print(f"{out['out']}: {out['rows']} rows ({out['errors']} unreadable), view {out['view']} "
              f"({out['selection']}), {out['images_per_sec']:.0f} images/s")
        return 0

    return _run(job)


def export(argv: Sequence[str]) -> int:
    """``rayexperts export RUN_DIR --format torchscript|onnx|safetensors`` (docs/inference.md)."""
    parser = _model_parser("rayexperts export", "The view's whole computation as a standalone model, checked "
                           "against load() (refused above 1e-4), with export.json (classes, preprocessing, "
                           "provenance).",
                           "rayexperts export runs/my-run --format onnx",
                           "rayexperts export runs/my-run --format torchscript --view ensemble --out exported/")
    parser.add_argument("--format", required=True, choices=("torchscript", "onnx", "safetensors"))
    parser.add_argument("--view", help="the view (default: the method's primary view)")
    parser.add_argument("--out", help="the folder (default: RUN_DIR/export/<view>-<format>)")
    args = parser.parse_args(list(argv))

    def job() -> int:
        from rayexperts.inference.export import main

        return main(args.run_dir, args.format, args.view, args.out, args.checkpoint)

    return _run(job)


def serve(argv: Sequence[str]) -> int:
    """``rayexperts serve RUN_DIR [--view V] [--port P]``: a Ray Serve application (docs/inference.md)."""
    parser = _model_parser("rayexperts serve", "A Ray Serve application on 127.0.0.1:PORT: POST / with an image's "
                           "bytes (or JSON {\"image\": BASE64} / {\"images\": [...]}) answers JSON {label, "
                           "class_name, prob, probs}; GET /health.",
                           "rayexperts serve runs/my-run --port 8000",
                           "curl --data-binary @cat.png http://127.0.0.1:8000/")
    parser.add_argument("--view", help="the view (default: the method's primary view)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs the replica holds (default 0)")
    args = parser.parse_args(list(argv))

    def job() -> int:
        from rayexperts.inference.serve import main

        return main(args.run_dir, args.view, args.port, args.checkpoint, args.gpus)

    return _run(job)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (train, "one training run of any method (jobs/train.py)"),
    "cbd": (cbd, "CBD / CBD_ENS: teachers in parallel, then the student (jobs/cbd_ens.py)"),
    "sweep": (sweep, "a Ray Tune sweep over a search space (jobs/sweep.py)"),
    "reproduce": (reproduce, "a published table re-run beside the paper's numbers (jobs/reproduce.py)"),
    "report": (report, "tables and plots of a run, job or sweep directory (jobs/report.py)"),
    "config": (config, "the resolved config with each value's layer"),
    "presets": (presets, "the shipped presets (paper settings and demos)"),
    "methods": (methods, "the registered methods"),
    "models": (models, "models summary: parameters and multiply-accumulates of a config's model"),
    "data": (data, "data describe: a data set's per-class counts and shot groups"),
    "eval": (evaluate, "a run's checkpoint on another data set, split or test distribution"),
    "predict": (predict, "batch prediction over images on Ray Data"),
    "export": (export, "a view as TorchScript, ONNX or safetensors, with export.json"),
    "serve": (serve, "a Ray Serve endpoint of a trained view"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: rayexperts COMMAND [options] [key=value ...]", "",
             "Long-tailed recognition with multiple experts on Ray (MLLT, NCL, ECL, CBD, LDAM-DRW, RIDE, SADE, "
             "BalPoE).", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "rayexperts COMMAND --help for its options and examples.",
              "Maintainer tools (benchmarks, mutation score): jobs/bench_*.py, jobs/mutation_score.py, "
              "jobs/gpu_check.py."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        from rayexperts.registry import did_you_mean

        print(f"error: unknown command {command!r}{did_you_mean(command, COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[command][0](rest)


def run_job(command: str) -> int:
    """What a ``jobs/`` script does: check the package, then ``rayexperts COMMAND`` with the script's arguments,
    with the trace marks of :mod:`rayexperts.trace`."""
    import rayexperts

    rayexperts.check_install_or_exit()  # an upload without the presets stops here, not halfway through a run
    from rayexperts.trace import mark

    mark("imports done")
    code = main([command, *sys.argv[1:]])
    mark("exit")
    return code


if __name__ == "__main__":
    sys.exit(main())
