"""Our run beside the authors' code run on the same data (docs/compare.md): per-epoch test top-1 of both, last
and best, and the shot groups / per-class accuracy at the end where both have them; one Markdown table and one
plot. The authors' log format is read by a parser per code base (``FORMATS``).

    python jobs/compare_official.py --code CHECKOUT --ours RUN_DIR --log THEIR_LOG [--out DIR] [--view expert0]
        [--one-step]
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rayexperts.data.imbalance import shot_group
from rayexperts.errors import InputError


class CompareError(InputError, ValueError):
    """Bad input to the comparison: one line naming the file and what is wrong with it."""


# -- the authors' logs ------------------------------------------------------------------------------------------------

_LDAM_RESULT = re.compile(r"^(\w+) Results: Prec@1 ([\d.]+) Prec@5 ([\d.]+) Loss ([-\d.eE+naif]+)")
_LDAM_CLASSES = re.compile(r"^(\w+) Class Accuracy: \[([^\]]*)\]")


def ldam_log_file(path: Path) -> Path:
    """``log_test.csv`` of an LDAM-DRW run: the file itself, its folder ``log/<store_name>``, or the run's working
    directory holding ``log/`` (which must then hold exactly one run)."""
    if path.is_file():
        return path
    if (path / "log_test.csv").is_file():
        return path / "log_test.csv"
    found = sorted(path.glob("log/*/log_test.csv"))
    if len(found) == 1:
        return found[0]
    runs = ", ".join(str(f.parent.name) for f in found)
    what = f"{len(found)} runs ({runs})" if found else "no log/*/log_test.csv"
    raise CompareError(f"'{path}': expected LDAM-DRW's log_test.csv, its folder, or a folder with one log/*/; "
                       f"found {what}")


def parse_ldam_drw(path: Path) -> tuple[pd.DataFrame, dict]:
    """kaidic/LDAM-DRW's ``log_test.csv`` (cifar_train.py ``validate``): per evaluated epoch a ``val Results: Prec@1
    .. Prec@5 .. Loss ..`` line, a ``val Class Accuracy: [..]`` line and ``Best Prec@1: ..``. The k-th results line
    is epoch k (0-based: the code evaluates after every epoch, from ``--start-epoch``, 0 unless resumed). Returns
    (``epoch``, ``top1``, ``top5``, ``loss``, ``class_acc`` as fractions; one row per epoch) and what ``args.txt``
    beside it says (``cls_num_list``, ``start_epoch``, ...; empty without it)."""
    file = ldam_log_file(path)
    args = _ldam_args(file.parent / "args.txt")
    start = int(args.get("start_epoch", 0))
    rows: list[dict] = []
    for n, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
        if m := _LDAM_RESULT.match(line):
            if m.group(1) != "val":
                continue
            rows.append({"epoch": start + len(rows), "top1": float(m.group(2)) / 100, "top5": float(m.group(3)) / 100,
                         "loss": float(m.group(4)), "class_acc": None})
        elif m := _LDAM_CLASSES.match(line):
            if m.group(1) != "val":
                continue
            if not rows or rows[-1]["class_acc"] is not None:
                raise CompareError(f"'{file}' line {n}: a class-accuracy line without its 'val Results' line")
            rows[-1]["class_acc"] = [float(v) for v in m.group(2).split(",") if v.strip()]
    if not rows:
        raise CompareError(f"'{file}': no 'val Results: Prec@1 ...' line (is it LDAM-DRW's log_test.csv?)")
    return pd.DataFrame(rows), args


def _ldam_args(path: Path) -> dict:
    """The literal values of ``Namespace(...)`` in ``args.txt`` (numbers, strings, lists); {} without the file."""
    if not path.is_file():
        return {}
    text = path.read_text()
    out = {}
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise CompareError(f"'{path}': not the Namespace(...) that LDAM-DRW writes ({e.msg})") from e
    for kw in getattr(call, "keywords", []):
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            continue
    return out


FORMATS: dict[str, Callable[[Path], tuple[pd.DataFrame, dict]]] = {"ldam-drw": parse_ldam_drw}


def read_segments(fmt: str, logs: Sequence[Path]) -> tuple[pd.DataFrame, dict]:
    """Their run from the logs of its segments, in order: a run resumed from its own checkpoint (the authors'
    ``--resume``) starts a new log at the checkpoint's epoch, and an epoch logged twice keeps the later segment's
    row. The arguments are the first segment's, with the ``start_epoch`` of each segment."""
    parts, first = [], None
    for log in logs:
        df, args = FORMATS[fmt](Path(log))
        parts.append(df)
        first = first if first is not None else {**args, "segments": []}
        first["segments"].append(int(df["epoch"].iloc[0]))
    table = pd.concat(parts, ignore_index=True).drop_duplicates("epoch", keep="last")
    return table.sort_values("epoch", ignore_index=True), first


# -- our run ---------------------------------------------------------------------------------------------------------


def read_ours(run_dir: Path, view: str) -> pd.DataFrame:
    """``epoch``, ``top1``, ``top1_many``, ``top1_medium``, ``top1_few`` of ``view`` from the run's metrics.parquet."""
    file = run_dir / "metrics.parquet" if run_dir.is_dir() else run_dir
    if not file.is_file():
        raise CompareError(f"'{file}' does not exist (--ours: a run directory with metrics.parquet)")
    m = pd.read_parquet(file)
    if "view" not in m or "top1" not in m:
        raise CompareError(f"'{file}' has no 'view'/'top1' columns: not a rayexperts metrics.parquet")
    if view not in set(m["view"]):
        raise CompareError(f"'{file}' has no view '{view}'; its views: {', '.join(map(str, m['view'].unique()))}")
    if "transductive" in m:
        m = m[~m["transductive"].fillna(False).astype(bool)]
    cols = ["epoch", "top1"] + [c for c in ("top1_many", "top1_medium", "top1_few") if c in m]
    return m[m["view"] == view][cols].sort_values("epoch").reset_index(drop=True)


# -- the comparison --------------------------------------------------------------------------------------------------


def side_by_side(ours: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch that either code evaluated: ``epoch`` (0-based), ``ours``, ``theirs`` (top-1 fractions;
    NaN where that code has no evaluation), ``diff`` = ours − theirs."""
    t = theirs[["epoch", "top1"]].rename(columns={"top1": "theirs"})
    o = ours[["epoch", "top1"]].rename(columns={"top1": "ours"})
    df = o.merge(t, on="epoch", how="outer").sort_values("epoch").reset_index(drop=True)
    df["diff"] = df["ours"] - df["theirs"]
    return df


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per code: epochs evaluated, last (epoch, top-1), best (epoch, top-1) over its own evaluations, and the same
    restricted to the epochs both evaluated."""
    both = table.dropna(subset=["ours", "theirs"])
    rows = []
    for code in ("ours", "theirs"):
        for scope, part in (("own evaluations", table.dropna(subset=[code])), ("common epochs", both)):
            if part.empty:
                continue
            best = part.loc[part[code].idxmax()]
            rows.append({"code": code, "over": scope, "evaluations": len(part),
                         "last_epoch": int(part["epoch"].iloc[-1]), "last_top1": float(part[code].iloc[-1]),
                         "best_epoch": int(best["epoch"]), "best_top1": float(best[code])})
    return pd.DataFrame(rows)


def groups_at(ours: pd.DataFrame, theirs: pd.DataFrame, epoch: int, train_counts: list[int] | None,
              many: int = 100, few: int = 20) -> pd.DataFrame | None:
    """Shot-group top-1 at ``epoch`` for both codes (theirs: the mean of its per-class accuracies over each group,
    exact for a balanced test set), from ``train_counts`` (LDAM-DRW's ``cls_num_list``); None where either lacks it."""
    o, t = ours[ours["epoch"] == epoch], theirs[theirs["epoch"] == epoch]
    if train_counts is None or o.empty or t.empty or t["class_acc"].iloc[0] is None:
        return None
    acc = np.asarray(t["class_acc"].iloc[0], dtype=float)
    if len(acc) != len(train_counts):
        raise CompareError(f"{len(acc)} per-class accuracies at epoch {epoch} but {len(train_counts)} class counts")
    group = shot_group(np.asarray(train_counts), many, few)
    rows = []
    for g in ("many", "medium", "few"):
        n = int((group == g).sum())
        col = f"top1_{g}"
        rows.append({"group": g, "classes": n, "ours": float(o[col].iloc[0]) if col in o and n else np.nan,
                     "theirs": float(acc[group == g].mean()) if n else np.nan})
    return pd.DataFrame(rows)


# -- one training step of both codes on the same batch and weights -------------------------------------------------


def ldam_key(key: str) -> str:
    """Our single-expert CIFAR ResNet's state-dict key → LDAM-DRW's ``ResNet_s`` key (``conv1``, ``bn1``,
    ``layer1..3``, ``linear``)."""
    key = re.sub(r"^experts\.0\.stem\.0\.", "conv1.", key)
    key = re.sub(r"^experts\.0\.stem\.1\.", "bn1.", key)
    key = re.sub(r"^experts\.0\.stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
    return re.sub(r"^heads\.0\.", "linear.", key)


def _load_file(path: Path, name: str):
    import importlib.util

    if not path.is_file():
        raise CompareError(f"'{path}' does not exist: --code must be the authors' checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _their_schedule(code: Path) -> Callable:
    """``adjust_learning_rate(optimizer, epoch, args)`` from the checkout's ``cifar_train.py``, alone (the rest of the
    script, its imports included, is not run)."""
    file = code / "cifar_train.py"
    tree = ast.parse(file.read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "adjust_learning_rate"), None)
    if fn is None:
        raise CompareError(f"'{file}' defines no adjust_learning_rate")
    space: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), str(file), "exec"), space)  # noqa: S102 - the user's checkout
    return space["adjust_learning_rate"]


def one_step(code: Path, cfg, their_args: dict, steps: int = 3, batch_size: int = 128, seed: int = 0,
             init_draws: int = 3) -> dict:
    """LDAM-DRW's ResNet-32 (``code``/models/resnet_cifar.py) and ours (``cfg``, a resolved config of a CE preset)
    from the same weights (ours copied into theirs), trained ``steps`` SGD steps of epoch 0 on the same random
    batch, each with its own optimizer and lr schedule: theirs ``torch.optim.SGD`` with ``their_args``' lr, momentum
    and weight decay (a run's ``args.txt``), ``adjust_learning_rate`` from ``cifar_train.py`` and the mean cross-entropy
    (their ``nn.CrossEntropyLoss()`` for ``--loss_type CE --train_rule None``); ours
    :func:`~rayexperts.engine.schedule.build_optimizer`, :class:`~rayexperts.engine.schedule.StepSchedule` and the
    engine's :func:`~rayexperts.engine.loop.train_step` (contiguous memory, as theirs). Returns per step the loss
    |difference|, max |gradient difference| and max |weight/buffer difference| after the step, the lr schedules'
    max |difference| over all epochs, and the init statistics (mean, std over ``init_draws`` seeds) of both for each
    parameter kind."""
    import dataclasses
    import types

    import torch

    from rayexperts.data.augment.batched.core import BatchRng
    from rayexperts.data.augment.batched.pipelines import batch_transform
    from rayexperts.engine.loop import LoopOptions, train_step
    from rayexperts.engine.schedule import StepSchedule, build_optimizer, set_lr
    from rayexperts.methods import METHODS
    from rayexperts.methods.base import Batch

    models = _load_file(code / "models" / "resnet_cifar.py", "_their_resnet_cifar")
    adjust = _their_schedule(code)
    args = types.SimpleNamespace(**their_args)
    counts = torch.as_tensor(their_args.get("cls_num_list") or [100] * 10, dtype=torch.float32)
    classes = len(counts)
    method = METHODS.get(cfg.method)(cfg, counts, 3)
    init: dict[str, tuple[float, float, float, float]] = {}
    kinds = {"conv weights": r"conv\d\.weight$", "BN weights": r"bn\d\.weight$", "BN biases": r"bn\d\.bias$",
             "linear weights": r"^linear\.weight$", "linear bias": r"^linear\.bias$"}
    for kind, pattern in kinds.items():
        o, t = [], []
        for s in range(init_draws):
            torch.manual_seed(seed + s)
            mine = {ldam_key(k): v for k, v in method.build_model().state_dict().items()}
            torch.manual_seed(seed + s)
            theirs_sd = models.resnet32(num_classes=classes).state_dict()
            for k, v in theirs_sd.items():
                if re.search(pattern, k):
                    o.append(mine[k].flatten().float())
                    t.append(v.flatten().float())
        o_, t_ = torch.cat(o), torch.cat(t)
        init[kind] = (o_.mean().item(), o_.std().item(), t_.mean().item(), t_.std().item())
    torch.manual_seed(seed)
    ours = method.build_model()
    theirs = models.resnet32(num_classes=classes)
    mapped = {ldam_key(k): v for k, v in ours.state_dict().items()}
    if set(mapped) != set(theirs.state_dict()):
        raise CompareError(f"our state dict does not map onto '{code}'s resnet32: "
                           f"{sorted(set(mapped) ^ set(theirs.state_dict()))[:4]} ...")
    theirs.load_state_dict(mapped)
    g = torch.Generator().manual_seed(seed)
    x8 = torch.randint(0, 256, (batch_size, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    x = batch_transform("cifar", "none", train=False)(x8, BatchRng(seed, torch.device("cpu")))
    opts = dataclasses.replace(LoopOptions.from_config(cfg, torch.device("cpu")), channels_last=False)
    opt_o = build_optimizer([p for p in ours.parameters() if p.requires_grad], cfg.train)
    opt_t = torch.optim.SGD(theirs.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = StepSchedule(cfg.train)
    per_epoch = math.ceil(int(counts.sum()) / int(cfg.train.batch_size))
    lr_diff = 0.0
    for e in range(int(args.epochs)):
        adjust(opt_t, e, args)
        lr_diff = max(lr_diff, *(abs(opt_t.param_groups[0]["lr"] - sched(e, i, per_epoch)) for i in (0, per_epoch - 1)))
    adjust(opt_t, 0, args)
    rows = []
    for step in range(steps):
        ours.train()
        theirs.train()
        set_lr(opt_o, sched(0, step, per_epoch))
        loss_t = torch.nn.functional.cross_entropy(theirs(x), y)
        opt_t.zero_grad()
        loss_t.backward()
        grads_t = {n: p.grad.clone() for n, p in theirs.named_parameters()}
        opt_t.step()
        out = train_step(method, ours, opt_o, Batch(x, y), opts)
        grads_o = {ldam_key(n): p.grad for n, p in ours.named_parameters()}
        after = {ldam_key(k): v for k, v in ours.state_dict().items()}
        rows.append({
            "step": step, "loss_ours": out.total.item(), "loss_theirs": loss_t.item(),
            "loss_diff": abs(out.total.item() - loss_t.item()),
            "grad_diff": max(float((grads_o[n] - g_).abs().max()) for n, g_ in grads_t.items()),
            "grad_max": max(float(g_.abs().max()) for g_ in grads_t.values()),
            "weight_diff": max(float((after[k].float() - v.float()).abs().max())
                               for k, v in theirs.state_dict().items() if not k.endswith("num_batches_tracked")),
        })
    return {"steps": pd.DataFrame(rows), "lr_max_diff": lr_diff, "init": init}


def one_step_report(res: dict) -> str:
    """The one-step comparison as Markdown."""
    lines = ["## One training step of both codes (same weights, same batch; CPU float32)", "",
             "| step | loss ours | loss theirs | loss diff | max grad diff (max grad) | max weight diff after |",
             "|---|---|---|---|---|---|"]
    for r in res["steps"].itertuples(index=False):
        lines.append(f"| {r.step + 1} | {r.loss_ours:.7f} | {r.loss_theirs:.7f} | {r.loss_diff:.1e} "
                     f"| {r.grad_diff:.1e} ({r.grad_max:.2f}) | {r.weight_diff:.1e} |")
    lines += ["", f"lr schedule, every epoch: max |ours − theirs| = {res['lr_max_diff']:.1e}", "",
              "| initialisation | ours mean | ours std | theirs mean | theirs std |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {om:+.4f} | {os_:.4f} | {tm:+.4f} | {ts:.4f} |" for k, (om, os_, tm, ts) in res["init"].items()]
    return "\n".join(lines) + "\n"


def run_preset_config(run_dir: Path):
    """The run's preset and ``compat`` (its ``config.yaml``: the last ``preset`` layer) resolved by this version of
    the package, with the run's seed: what the engine would train now for that run."""
    from omegaconf import OmegaConf

    from rayexperts.config import ConfigError, load_config

    file = run_dir / "config.yaml"
    if not file.is_file():
        raise CompareError(f"'{file}' does not exist: --one-step builds our model from the run's config.yaml")
    saved = OmegaConf.load(file)
    presets = [str(x).split(" ", 1)[1] for x in saved.get("layers", []) if str(x).startswith("preset ")]
    if not presets:
        raise CompareError(f"'{file}' names no preset layer: --one-step needs a run made from a preset")
    try:
        return load_config(presets[-1], [f"compat={saved.get('compat', 'paper')}", f"seed={saved.get('seed', 0)}"])
    except ConfigError as e:
        raise CompareError(f"'{file}': {e}") from e


def code_commit(checkout: Path) -> str:
    """The checkout's commit (``git rev-parse HEAD``), or 'unknown' outside a git work tree."""
    if not checkout.is_dir():
        raise CompareError(f"'{checkout}' (--code) is not a directory: give the authors' checkout")
    try:
        done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.2f}"


def report(table: pd.DataFrame, summ: pd.DataFrame, groups: pd.DataFrame | None, class_acc: list[float] | None,
           header: dict[str, str]) -> str:
    """``compare.md``: the sources, last and best of both, shot groups and per-class accuracy at the last common
    epoch, then every epoch (people read 1-based epochs and %)."""
    lines = ["# Our run beside the authors' code on the same data", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["## Last and best (test top-1, %)", "",
              "| code | over | evaluations | last epoch | last | best epoch | best |", "|---|---|---|---|---|---|---|"]
    for r in summ.itertuples(index=False):
        lines.append(f"| {r.code} | {r.over} | {r.evaluations} | {r.last_epoch + 1} | {pct(r.last_top1)} "
                     f"| {r.best_epoch + 1} | {pct(r.best_top1)} |")
    both = table.dropna(subset=["ours", "theirs"])
    if groups is not None and not both.empty:
        e = int(both["epoch"].iloc[-1])
        lines += ["", f"## Shot groups at epoch {e + 1} (the last both evaluated; top-1, %)", "",
                  "| group | classes | ours | theirs |", "|---|---|---|---|"]
        lines += [f"| {g.group} | {g.classes} | {pct(g.ours)} | {pct(g.theirs)} |"
                  for g in groups.itertuples(index=False)]
    if class_acc is not None:
        lines += ["", "Their per-class top-1 at that epoch (%): " + ", ".join(f"{100 * a:.1f}" for a in class_acc)]
    lines += ["", "## Every evaluated epoch (test top-1, %)", "", "| epoch | ours | theirs | ours − theirs |",
              "|---|---|---|---|"]
    lines += [f"| {int(r.epoch) + 1} | {pct(r.ours)} | {pct(r.theirs)} | {pct(r.diff)} |"
              for r in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path, labels: tuple[str, str]) -> None:
    """``compare.png``: both codes' test top-1 (%) against the 1-based epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for col, label, style in (("ours", labels[0], "o-"), ("theirs", labels[1], ".-")):
        part = table.dropna(subset=[col])
        ax.plot(part["epoch"] + 1, 100 * part[col], style, markersize=3, linewidth=1, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def compare(code: Path, ours_dir: Path, log: Path | Sequence[Path], out: Path, view: str = "expert0",
            fmt: str = "ldam-drw", one_step_cfg=None) -> Path:
    """Write ``compare.md``, ``compare.png`` and ``compare.parquet`` (per epoch) under ``out``; returns the Markdown.
    ``log``: their log, or the logs of a resumed run's segments in order (:func:`read_segments`). With
    ``one_step_cfg`` (our run's resolved config) ``compare.md`` also gets :func:`one_step` (LDAM-DRW's code)."""
    if fmt not in FORMATS:
        raise CompareError(f"unknown --format {fmt!r}: choose {', '.join(FORMATS)}")
    commit = code_commit(code)
    ours = read_ours(ours_dir, view)
    logs = [log] if isinstance(log, (str, Path)) else list(log)
    theirs, args = read_segments(fmt, logs)
    log = ", ".join(map(str, logs)) + (f" (segments from epochs {args['segments']}, 0-based)" if len(logs) > 1 else "")
    table = side_by_side(ours, theirs)
    summ = summary(table)
    both = table.dropna(subset=["ours", "theirs"])
    groups = class_acc = None
    if not both.empty:
        e = int(both["epoch"].iloc[-1])
        counts = args.get("cls_num_list")
        groups = groups_at(ours, theirs, e, list(counts) if counts else None)
        class_acc = theirs.loc[theirs["epoch"] == e, "class_acc"].iloc[0]
    header = {"ours": f"{ours_dir} (view {view})", "theirs": f"{log} ({fmt} log; code {code} at {commit})"}
    out.mkdir(parents=True, exist_ok=True)
    md = out / "compare.md"
    text = report(table, summ, groups, class_acc, header)
    if one_step_cfg is not None:
        text += "\n" + one_step_report(one_step(code, one_step_cfg, args))
    md.write_text(text)
    table.to_parquet(out / "compare.parquet", index=False)
    theirs_label = f"authors' code ({fmt}" + (f", {commit[:7]})" if commit != "unknown" else ")")
    plot(table, out / "compare.png", (f"rayexperts ({view})", theirs_label))
    return md


def main(a: argparse.Namespace) -> int:
    """``jobs/compare_official.py`` once its arguments are parsed (:func:`rayexperts.cli.compare_official`)."""
    cfg = run_preset_config(a.ours) if a.one_step else None
    md = compare(a.code, a.ours, a.log, a.out, a.view, a.format, cfg)
    print(md.read_text())
    print(f"wrote {md}, {md.with_suffix('.png')}, {md.with_suffix('.parquet')}")
    return 0
