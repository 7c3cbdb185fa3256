"""The ``rayexperts`` command (:data:`COMMANDS`: train, cbd, sweep, reproduce, report, config, presets, ...): every
command's argument parsing, and the one place (:func:`main`) where errors become exit statuses.

``jobs/*.py`` are the same commands as scripts (what ``ray job submit -- python jobs/X.py`` runs; the maintainer
scripts are :data:`MAINTAINER_COMMANDS`), ``python -m rayexperts.data|models|eval`` too. Every job
takes ``--config PRESET_OR_YAML``, dotted ``key=value`` overrides and ``--print-config`` (the resolved config,
each value with the layer that set it; no Ray started). Errors are one line on stderr with exit status 2 (bad
input) or 1 (a run failed; its traceback is in the run directory's ``error.log``); Ctrl-C says how to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

RESULTS = ("Results go to run.storage_path/run.name/ (default ./runs/<method>-<data>-<hash>/, the hash of the "
           "settings that can change the result): config.yaml, metrics.parquet (0-based epochs, fractions), "
           "classes.parquet, checkpoints.")
RESUME = "Re-run the same command (the same settings, or the same run.name) to resume from the latest checkpoint; a " \
         "finished run is not trained again."


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + f"\n\n{RESULTS}\n{RESUME}"


def job_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """``[--config PRESET_OR_YAML] [--print-config] [key=value ...]``, shared by the jobs."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a shipped preset name (rayexperts presets lists them) or a YAML file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, each value with the layer that set it, and exit (no Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. train.epochs=15 model.num_experts=3")
    return parser


def _print_config(config: str | None, overrides: Sequence[str]) -> int:
    from rayexperts.config import explain

    print(explain(config, list(overrides)))
    return 0


# ------------------------------------------------------------------------------------------------ jobs


def train(argv: Sequence[str]) -> int:
    """One training run; a method with runs that must finish first (CBD's teachers, RIDE's experts for its
    router) trains them first, as ``rayexperts cbd`` does."""
    args = job_parser("rayexperts train", "One training run of any method: one worker in a Ray actor, "
                     "several through Ray Train; run.ray=false: one worker in this process, without Ray (pdb).",
                     _examples(
                         "rayexperts train                                    # the digits-lt demo (CE, 30 epochs)",
                         "rayexperts train --config cifar10_lt_if100_ncl data.root=/data/cifar-10-batches-py",
                         "rayexperts train --config cifar10_lt_if100_ce compat=official seed=1",
                         "rayexperts train method=mllt train.epochs=5 --print-config")).parse_args(list(argv))
    if args.print_config:
        return _print_config(args.config, args.overrides)
    from rayexperts.config import load_config
    from rayexperts.launch.ensemble import run_ensemble, summary_table
    from rayexperts.launch.train import announce, final_table, run_training
    from rayexperts.registry import METHODS
    from rayexperts.rundir import RunDir

    cfg = load_config(args.config, args.overrides)
    announce(cfg, "run directory")
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


def cbd(argv: Sequence[str]) -> int:
    """CBD / CBD_ENS: the teachers in parallel, then the class-balanced student (the digits demo by default)."""
    args = job_parser("rayexperts cbd", "CBD / CBD_ENS: teachers in parallel on Ray, then the class-balanced "
                     "student. With no arguments: the digits-lt demo (preset cbd_digits).", _examples(
                         "rayexperts cbd                                      # the digits-lt demo",
                         "rayexperts cbd --config cbd_cifar100_lt_if100 data.root=/data/cifar-100-python "
                         "cbd.teacher_gpus=0 scaling.use_gpu=false",
                         "rayexperts cbd --config cbd_imagenet_lt_r50 compat=official data.root=/data/imagenet "
                         "run.storage_path=/shared/runs")).parse_args(list(argv))
    if args.print_config:
        from rayexperts.launch.ensemble import DEMO_PRESET
        from rayexperts.config import parse_overrides

        flat = parse_overrides(list(args.overrides))
        preset = args.config or (DEMO_PRESET if flat.get("data.name", "digits-lt") == "digits-lt" else None)
        return _print_config(preset, [*args.overrides, "method=cbd"])

    from rayexperts.launch.ensemble import resolve_job_config, run_ensemble, summary_table
    from rayexperts.launch.train import announce

    cfg = resolve_job_config(args.config, args.overrides)
    announce(cfg, "job directory")
    out = run_ensemble(cfg)
    print(f"\njob directory: {out['path']}")
    print("test top-1 (%) per model:")
    print(summary_table(out["summary"]).to_string())
    return 0


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayexperts sweep", description="A Ray Tune sweep whose trials are training runs.",
        epilog="The trials print no epoch lines unless run.verbose is set (run.verbose=true). The sweep directory is "
               "run.storage_path/run.name (default sweep-<method>-<data>-<date>-<time>, new on every call): re-run "
               "with the same run.name to continue a sweep. python jobs/sweep.py takes the same arguments.")
    parser.add_argument("--space", help="a search space YAML (tune_spaces/*.yaml); required unless --print-config")
    parser.add_argument("--config", help="a shipped preset name or a YAML file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the trials' base config, each value with the layer that set it, and exit (no Ray; "
                             "--space not needed)")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. tune.num_samples=16 tune.scheduler=fifo")
    return parser


def sweep(argv: Sequence[str]) -> int:
    parser = sweep_parser()
    args = parser.parse_args(list(argv))
    if args.print_config:  # the trials' base config with each value's layer, before Ray Tune is imported
        return _print_config(args.config, args.overrides)
    if not args.space:
        parser.error("the following arguments are required: --space")
    from rayexperts.launch.tune import sweep_command

    return sweep_command(args.space, args.config, args.overrides)


def reproduce_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayexperts reproduce",
        description="A published table re-run as one Ray job, beside the paper's numbers.",
        epilog="examples:\n  rayexperts reproduce --paper NCL --table 'Table 1' --dataset cifar100-lt --dry-run "
               "data.root=/data/cifar-100-python\n  rayexperts reproduce --paper NCL --table 'Table 1' "
               "--data-root cifar10-lt=/data/cifar-10-batches-py --data-root cifar100-lt=/data/cifar-100-python\n"
               "  rayexperts reproduce --catalog my_rows.csv --seeds 2 --epochs-scale 0.05\n"
               "(python jobs/reproduce.py takes the same arguments.)\n"
               "Results: run.storage_path/<job>/ (default ./runs/reproduce-<paper>-<table>/): "
               "reproduce.parquet, reproduce.md, reproduce.png; re-issue the same command to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", help="MLLT, NCL, ECL, CBD, SADE, RIDE (the catalogue's paper column)")
    p.add_argument("--table", help="e.g. 'Table 2'")
    p.add_argument("--dataset", help="e.g. cifar100-lt")
    p.add_argument("--method", help="a catalogue method, e.g. NCL")
    p.add_argument("--catalog", help="a CSV in the catalogue's format instead of the packaged one")
    p.add_argument("--data-root", action="append", metavar="DATASET=PATH",
                   help="the data of one data set (repeat it for a table over several, e.g. --data-root "
                        "cifar10-lt=/data/cifar-10-batches-py); data.root=PATH serves a plan over one data set")
    p.add_argument("--seeds", type=int, help="runs per setting (default: the paper's count, else 3)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated cost; train nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print each setting's resolved config (each value with its layer) and exit; no Ray")
    p.add_argument("--epochs-scale", type=float, help="short protocol: every epoch count times this")
    p.add_argument("--epochs", type=int, help="short protocol: this many epochs")
    p.add_argument("overrides", nargs="*", help="dotted config keys for every run, e.g. data.root=... run.storage_path=...")
    return p


def parse_reproduce(argv: Sequence[str]) -> argparse.Namespace:
    """``rayexperts reproduce``'s arguments, checked (argparse's usage error, exit status 2, otherwise)."""
    p = reproduce_parser()
    args = p.parse_args(list(argv))
    if not (args.paper or args.catalog):
        p.error("give --paper (and --table) or --catalog")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.epochs_scale is not None and not 0 < args.epochs_scale <= 1:
        p.error("--epochs-scale must lie in (0, 1]")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def reproduce(argv: Sequence[str]) -> int:
    args = parse_reproduce(argv)
    from rayexperts.launch.reproduce import main

    return main(args)


def report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rayexperts report",
                                     description="Tables and plots for a run, an ensemble job or a sweep, written "
                                                 "into DIR/report/ (report.md and PNG figures).")
    parser.add_argument("dir", help="a run directory, an ensemble job directory or a sweep directory")
    args = parser.parse_args(list(argv))

    from rayexperts.report import write_report

    print(f"report: {write_report(args.dir)}")
    return 0


# ------------------------------------------------------------------------------------------------ information


def config(argv: Sequence[str]) -> int:
    """``rayexperts config [--config X] [key=value ...]``: the resolved config with each value's layer."""
    parser = argparse.ArgumentParser(prog="rayexperts config", description="The resolved config, each value with the "
                                     "layer that set it (defaults, data set, method, preset, compat=official with its "
                                     "source, command line): what --print-config of the jobs prints.")
    parser.add_argument("--config", help="a shipped preset name (rayexperts presets lists them) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. train.epochs=15 model.num_experts=3")
    args = parser.parse_args(list(argv))
    return _print_config(args.config, args.overrides)


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
    import importlib

    from rayexperts.registry import METHODS, load_plugins

    argparse.ArgumentParser(prog="rayexperts methods", description="Every registered method (method=NAME) with "
                            "its paper and where it comes from (built-in module, or plugin package and module: "
                            "entry-point group rayexperts.plugins).").parse_args(list(argv))

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


def models(argv: Sequence[str]) -> int:
    from rayexperts.models.__main__ import main

    return main(list(argv), prog="rayexperts models")


def data(argv: Sequence[str]) -> int:
    from rayexperts.data.__main__ import main

    return main(list(argv))


# ------------------------------------------------------------------------------------------------ trained models


Option = tuple[str, dict]  # an argparse option: its flag and add_argument's keywords


def _model_args(argv: Sequence[str], prog: str, description: str, examples: Sequence[str], options: Sequence[Option],
                view: bool = True) -> argparse.Namespace:
    """The arguments of a command on a trained model: ``RUN_DIR``, ``--checkpoint``, ``--view`` (unless ``view`` is
    false) and the command's own ``options``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_examples(*examples).split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (an ensemble job's: its student/ or "
                        "teachers/teacherK)")
    parser.add_argument("--checkpoint", default="last",
                        help="last (default), best_test (selected on the test set) or a checkpoint_* directory name")
    if view:
        parser.add_argument("--view", help="the view (default: the method's primary view)")
    for flag, keywords in options:
        parser.add_argument(flag, **keywords)
    return parser.parse_args(list(argv))


def evaluate(argv: Sequence[str]) -> int:
    """``rayexperts eval RUN_DIR [key=value ...]`` (docs/inference.md)."""
    args = _model_args(argv, "rayexperts eval", "A run's checkpoint evaluated on another data set, split or test "
                       "distribution: every view's Many/Medium/Few/All and ECE (%), written to "
                       "RUN_DIR/eval/<name>.parquet (the metrics.parquet columns); the run's own files untouched.",
                       ["rayexperts eval runs/my-run                                  # the run's test split again",
                        "rayexperts eval runs/my-run 'eval.test_distributions=[forward50,backward50]'",
                        "rayexperts eval runs/my-run data.root=/data/other.parquet --name other"],
                       [("overrides", dict(nargs="*", help="dotted data.* / eval.* keys")),
                        ("--name", dict(help="the evaluation's file name (default: from the overrides, or test)"))],
                       view=False)
    from rayexperts.inference.evaluate import main

    return main(args.run_dir, args.overrides, args.checkpoint, args.name)


def predict(argv: Sequence[str]) -> int:
    """``rayexperts predict RUN_DIR --input PATH --out FILE.parquet`` on Ray Data (docs/inference.md)."""
    args = _model_args(argv, "rayexperts predict", "Batch prediction on Ray Data: an image folder, a text file of "
                       "image paths, or a Parquet file with an 'image' column of encoded images (local or a URI) "
                       "-> one Parquet row per input (id or path, label, class_name, prob, topk_labels, "
                       "topk_probs, error).",
                       ["rayexperts predict runs/my-run --input photos/ --out predictions.parquet",
                        "rayexperts predict runs/my-run --input s3://bucket/images.parquet --out "
                        "s3://bucket/pred.parquet --workers 4"],
                       [("--input", dict(required=True, help="image folder, list file or Parquet (local or URI)")),
                        ("--out", dict(required=True, help="the output Parquet file (written atomically)")),
                        ("--top-k", dict(type=int, default=5, help="labels and probabilities kept per image "
                                         "(default 5)")),
                        ("--workers", dict(type=int, default=1, help="model actors (a GPU each when the cluster has "
                                           "them)")),
                        ("--batch-size", dict(type=int, default=256, help="images per forward pass (default 256)")),
                        ("--cpus-per-worker", dict(type=float, default=1.0, help="CPUs each model actor holds "
                                                   "(default 1)")),
                        ("--all-views", dict(action="store_true", help="also every view's logits (logits_<view>)"))])
    from rayexperts.inference.predict import predict as run_predict

    out = run_predict(args.run_dir, args.input, args.out, args.view, args.top_k, args.workers, args.checkpoint,
                      args.all_views, args.batch_size, args.cpus_per_worker)
    print(f"{out['out']}: {out['rows']} rows ({out['errors']} unreadable), view {out['view']} "
          f"({out['selection']}), {out['images_per_sec']:.0f} images/s")
    return 0


def export(argv: Sequence[str]) -> int:
    """``rayexperts export RUN_DIR --format torchscript|onnx|safetensors`` (docs/inference.md)."""
    args = _model_args(argv, "rayexperts export", "The view's whole computation as a standalone model, checked "
                       "against load() (refused above 1e-4), with export.json (classes, preprocessing, provenance).",
                       ["rayexperts export runs/my-run --format onnx",
                        "rayexperts export runs/my-run --format torchscript --view ensemble --out exported/"],
                       [("--format", dict(required=True, choices=("torchscript", "onnx", "safetensors"))),
                        ("--out", dict(help="the folder (default: RUN_DIR/export/<view>-<format>)"))])
    from rayexperts.inference.export import main

    return main(args.run_dir, args.format, args.view, args.out, args.checkpoint)


def serve(argv: Sequence[str]) -> int:
    """``rayexperts serve RUN_DIR [--view V] [--port P]``: a Ray Serve application (docs/inference.md)."""
    args = _model_args(argv, "rayexperts serve", "A Ray Serve application on 127.0.0.1:PORT: POST / with an image's "
                       "bytes (or JSON {\"image\": BASE64} / {\"images\": [...]}) answers JSON {label, class_name, "
                       "prob, probs}; GET /health.",
                       ["rayexperts serve runs/my-run --port 8000", "curl --data-binary @cat.png http://127.0.0.1:8000/"],
                       [("--port", dict(type=int, default=8000)),
                        ("--gpus", dict(type=float, default=0.0, help="GPUs the replica holds (default 0)"))])
    from rayexperts.inference.serve import main

    return main(args.run_dir, args.view, args.port, args.checkpoint, args.gpus)


def probes(argv: Sequence[str]) -> int:
    """``rayexperts probes RUN_DIR`` (``python -m rayexperts.eval probes RUN_DIR``): representation probes of a
    finished run (docs/methods.md "Evaluation every run should be able to report")."""
    p = argparse.ArgumentParser(prog="rayexperts probes", description="Representation probes of a finished run: "
                                "feature accuracy, NCM, cRT, tau-norm, LWS and ECL feature distance, written to "
                                "RUN_DIR/probes.parquet (also python -m rayexperts.eval probes RUN_DIR).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with config.yaml and a checkpoint")
    p.add_argument("--probes", help="comma-separated subset of feature_accuracy,ncm,crt,tau_norm,lws,feature_distance"
                   " (default: all)")
    p.add_argument("--device", default="cpu", help="torch device for features and probes (default cpu)")
    p.add_argument("--tau", type=float, default=1.0, help="tau of tau_norm (default 1.0)")
    p.add_argument("--tau-on-val", action="store_true", help="pick tau in 0..2 on the val split when there is one")
    p.add_argument("--feature-accuracy-epochs", type=int, help="default 200 (MLLT)")
    p.add_argument("--crt-epochs", type=int, help="default 10")
    p.add_argument("--lws-epochs", type=int, help="default 10")
    args = p.parse_args(list(argv))
    from rayexperts.eval.__main__ import main

    return main(args)


# ------------------------------------------------------------------------------------------------ maintainer tools


def gpu_rows(argv: Sequence[str]) -> int:
    """``jobs/gpu_rows.py``: the CIFAR-10-LT IF 100 paper rows on a GPU under a time budget (docs/gpu.md)."""
    from rayexperts.launch import rows

    p = argparse.ArgumentParser(prog="jobs/gpu_rows.py", description=rows.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_rows", help="rows.json, rows.md, rows.log and the run directories (runs/)")
    p.add_argument("--data", default=str(rows.PACKAGE_ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"),
                   help="the CIFAR-10 Parquet file (data.root)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all rows")
    p.add_argument("--rows", default=",".join(rows.ROWS), help="presets, in the order to train them")
    p.add_argument("--min-row-s", type=float, default=60.0, help="a row starts only with this many seconds left")
    p.add_argument("--epochs", type=int, default=None, help="a short protocol: this many epochs (not the paper's)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (the test suite's rehearsal)")
    p.add_argument("overrides", nargs="*", help="dotted keys for every row, e.g. model.backbone=resnet8 train.compile=off")
    return rows.main(p.parse_args(list(argv)))


def compare_official(argv: Sequence[str]) -> int:
    """``jobs/compare_official.py``: our run beside the authors' code run on the same data (docs/compare.md)."""
    from pathlib import Path

    from rayexperts.launch import compare

    p = argparse.ArgumentParser(prog="compare_official", description=(compare.__doc__ or "").split("\n\n")[0])
    p.add_argument("--code", required=True, type=Path, help="the authors' checkout (its commit is recorded)")
    p.add_argument("--ours", required=True, type=Path, help="our run directory (metrics.parquet)")
    p.add_argument("--log", required=True, type=Path, nargs="+",
                   help="their log (LDAM-DRW: log_test.csv, its folder, or the run folder); a run resumed from its "
                        "checkpoints: each segment's log, in order (a later segment's epochs win)")
    p.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default ./compare)")
    p.add_argument("--view", default="expert0", help="our view to compare (default expert0: the plain softmax)")
    p.add_argument("--format", default="ldam-drw", choices=sorted(compare.FORMATS), help="their log format")
    p.add_argument("--one-step", action="store_true",
                   help="also train one step of both codes from the same weights on the same batch (LDAM-DRW's "
                        "models/resnet_cifar.py and cifar_train.py's schedule, our run's config.yaml)")
    return compare.main(p.parse_args(list(argv)))


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
    "probes": (probes, "representation probes of a finished run (NCM, cRT, tau-norm, LWS, ...)"),
}


# jobs/ scripts that are not user commands: reached through main (the same errors, the same exit statuses)
MAINTAINER_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "gpu-rows": (gpu_rows, "the CIFAR-10-LT paper rows on a GPU under a time budget (jobs/gpu_rows.py)"),
    "compare-official": (compare_official, "our run beside the authors' code (jobs/compare_official.py)"),
}
# Ctrl-C during these says how to resume (the text goes after "resume")
RESUMABLE = {"train": " (same run.name)", "cbd": "", "sweep": "", "reproduce": ""}


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


def main(argv: Sequence[str] | None = None, check_install: bool = False) -> int:
    """Run ``rayexperts COMMAND ...``: the only place that turns the project's errors into an exit status (bad input,
    :class:`~rayexperts.errors.InputError`: 2; a failed run, :class:`~rayexperts.errors.RunError`: 1; each one line
    on stderr) and Ctrl-C into 130 with how to resume. ``check_install``: first check that the imported package is
    complete (:func:`rayexperts.check_install`; the ``jobs/`` scripts, whose upload may have lost files)."""
    import rayexperts
    from rayexperts.errors import InputError, RunError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS and command not in MAINTAINER_COMMANDS:
        from rayexperts.registry import did_you_mean

        print(f"error: unknown command {command!r}{did_you_mean(command, COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        if check_install:  # an upload without the presets stops here, not halfway through a run
            rayexperts.check_install()
        return {**COMMANDS, **MAINTAINER_COMMANDS}[command][0](rest)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = RESUMABLE.get(command)
        print("\ninterrupted" + ("" if resume is None else f": run the same command again to resume{resume} from the "
                                 "latest checkpoint"), file=sys.stderr)
        return 130


def run_job(command: str) -> int:
    """What a ``jobs/`` script does: ``rayexperts COMMAND`` with the script's arguments, the package checked first,
    with the trace marks of :mod:`rayexperts.trace`."""
    from rayexperts.trace import mark

    mark("imports done")
    code = main([command, *sys.argv[1:]], check_install=True)
    mark("exit")
    return code


if __name__ == "__main__":
    sys.exit(main())
