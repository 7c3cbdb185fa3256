"""Representation probes on the frozen features of a finished run (docs/methods.md, MLLT "Feature accuracy").

Every probe maps frozen features (or frozen logits) to test-set scores ``[N, C]``:

- ``feature_accuracy``: MLLT §3.4 "upper bound" — one linear layer trained on the *test* features
  and labels, evaluated on those same features (SGD m 0.9, 200 epochs, lr 0.1, ×0.1 at 160/180).
- ``ncm``: nearest class mean — cosine similarity to the means of ℓ2-normalised train features.
- ``crt``: classifier re-training (Kang et al., ICLR 2020) — a fresh linear layer on the train
  features with class-balanced sampling.
- ``tau_norm``: τ-normalised classifier (Kang et al.) — ``W_j / ‖W_j‖^τ`` for linear heads.
- ``lws``: learnable weight scaling (Kang et al.) — one scale per class on the frozen classifier,
  learned on the train features with class-balanced sampling.
- ``feature_distance``: ECL eq. 12 — per class, the mean ℓ2 distance between two experts' features
  of the same test image.

:func:`run_probes` runs them on a run directory and writes ``RUN_DIR/probes.parquet``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader

from rayexperts.data import LTDataset, TransformedDataset, build_dataset, build_transform
from rayexperts.errors import InputError
from rayexperts.eval.tables import GROUPS
from rayexperts.methods import METHODS, Method
from rayexperts.models import find_experts
from rayexperts.models.heads import CosineClassifier
from rayexperts.rundir import RunDir, identity, load_model_state

PROBES = ("feature_accuracy", "ncm", "crt", "tau_norm", "lws", "feature_distance")
COLUMNS = [
    "probe", "expert", "top1", "top1_many", "top1_medium", "top1_few",
    "distance", "distance_many", "distance_medium", "distance_few", "note",
]
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # τ ∈ {0, 0.1, …, 2.0} when picked on val


class ProbeError(InputError, ValueError):
    """A run directory cannot be probed; the message names the directory or the probe."""


@dataclass(frozen=True)
class SGDSchedule:
    """Mini-batch SGD with momentum 0.9: ``milestones`` give ×0.1 steps, none a per-epoch cosine
    decay to 0."""

    epochs: int
    lr: float
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    weight_decay: float = 0.0

    def lr_at(self, epoch: int) -> float:
        if self.milestones:
            return self.lr * 0.1 ** sum(epoch >= m for m in self.milestones)
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))


@dataclass(frozen=True)
class ProbeOptions:
    # MLLT §3.4; the paper gives no batch size or weight decay: mini-batches of 128, no decay.
    feature_accuracy: SGDSchedule = SGDSchedule(200, 0.1, 128, (160, 180))
    # Kang et al. re-train for 10 epochs with cosine decay; wd as the CIFAR training recipes.
    crt: SGDSchedule = SGDSchedule(10, 0.1, 128, weight_decay=5e-4)
    lws: SGDSchedule = SGDSchedule(10, 0.1, 128)
    tau: float = 1.0
    tau_on_val: bool = False  # pick τ from TAU_GRID on the val split (when the run has one)
    seed: int = 0


# ----------------------------------------------------------------------------- features


@dataclass
class LoadedRun:
    """A trained model with its data set and method, rebuilt from a run directory (or handed over)."""

    cfg: DictConfig
    data: LTDataset
    method: Method
    model: nn.Module
    device: torch.device = torch.device("cpu")

    @property
    def groups(self) -> np.ndarray:
        return self.data.shot_groups(self.cfg.data.many_threshold, self.cfg.data.few_threshold)


@torch.no_grad()
def extract_features(run: LoadedRun, split: str = "test") -> dict[str, object]:
    """Per-expert ``features`` [N, d] and ``logits`` [N, C] (lists, CPU float32) and ``labels`` [N]
    of one split, through the test transform with the model in eval mode."""
    sources = {"train": run.data.train, "test": run.data.test, "val": run.data.val}
    if split not in sources:
        raise ValueError(f"unknown split '{split}': choose train, val or test")
    if sources[split] is None:
        raise ProbeError(f"data set '{run.data.name}' has no {split} split")
    transform = build_transform(run.data.image_kind, "none", train=False, image_size=int(run.cfg.data.image_size))
    loader = DataLoader(
        TransformedDataset(sources[split], transform),
        batch_size=int(run.cfg.data.test_batch_size),
        num_workers=int(run.cfg.data.num_workers),
    )
    run.model.eval()
    feats: list[list[Tensor]] = []
    logits: list[list[Tensor]] = []
    labels: list[Tensor] = []
    for images, targets in loader:
        _, out, _ = run.method.predict(run.model, images.to(run.device))
        feats.append([v.float().cpu() for v in out.features])
        logits.append([z.float().cpu() for z in out.logits])
        labels.append(torch.as_tensor(targets))
    return {
        "features": [torch.cat(f) for f in zip(*feats)],
        "logits": [torch.cat(z) for z in zip(*logits)],
        "labels": torch.cat(labels).long(),
    }


# ----------------------------------------------------------------------------- scoring


def top1_by_group(scores: Tensor, labels: Tensor, groups: np.ndarray) -> dict[str, float]:
    """``top1`` and ``top1_many/medium/few`` (NaN for an empty group) of ``argmax scores``;
    ``groups[c]`` is class c's shot group."""
    correct = (scores.argmax(1).cpu() == labels.cpu()).numpy()
    sample_group = np.asarray(groups)[labels.cpu().numpy()]
    out = {"top1": float(correct.mean()) if correct.size else math.nan}
    for g in GROUPS:
        sel = sample_group == g
        out[f"top1_{g}"] = float(correct[sel].mean()) if sel.any() else math.nan
    return out


# ----------------------------------------------------------------------------- training


def _batches(labels: Tensor, batch_size: int, balanced: bool, gen: torch.Generator) -> list[Tensor]:
    """One epoch of index batches (len(labels) draws): a permutation (instance sampling) or, when
    ``balanced``, a uniform class then a uniform sample of it (docs/methods.md "Samplers")."""
    n = len(labels)
    if balanced:
        order = torch.argsort(labels, stable=True)
        classes, counts = torch.unique(labels, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        pick = torch.randint(len(classes), (n,), generator=gen)
        offset = (torch.rand(n, generator=gen) * counts[pick]).long()
        idx = order[starts[pick] + offset]
    else:
        idx = torch.randperm(n, generator=gen)
    return list(idx.split(batch_size))


def fit(
    module: nn.Module, inputs: Tensor, labels: Tensor, schedule: SGDSchedule, *, balanced: bool = False, seed: int = 0
) -> nn.Module:
    """Train ``module`` (inputs → logits) with cross-entropy and mini-batch SGD."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=0.9, weight_decay=schedule.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    cpu_labels = labels.cpu()
    inputs = inputs.detach()
    module.train()
    with torch.enable_grad():
        for epoch in range(schedule.epochs):
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(epoch)
            for idx in _batches(cpu_labels, schedule.batch_size, balanced, gen):
                idx = idx.to(inputs.device)
                loss = F.cross_entropy(module(inputs[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return module.eval()


def train_linear(
    features: Tensor, labels: Tensor, num_classes: int, schedule: SGDSchedule, *, balanced: bool = False, seed: int = 0
) -> nn.Linear:
    """A zero-initialised ``nn.Linear`` trained on frozen features (softmax regression: convex, so no
    random initialisation is needed)."""
    layer = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return fit(layer, features, labels, schedule, balanced=balanced, seed=seed)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- probes


@torch.no_grad()
def _scores(layer: nn.Module, x: Tensor) -> Tensor:
    return layer(x)


def feature_accuracy(
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    schedule: SGDSchedule = ProbeOptions.feature_accuracy,
    seed: int = 0,
) -> Tensor:
    """MLLT §3.4: scores on the test features of a linear layer trained on those same test
    features and labels (instance sampling, mini-batches)."""
    layer = train_linear(test_features, test_labels, num_classes, schedule, seed=seed)
    return _scores(layer, test_features)


@torch.no_grad()
def ncm(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int) -> Tensor:
    """Nearest class mean (Kang et al. 2020): cosine similarity of each test feature to the
    means of the ℓ2-normalised train features of every class."""
    f = F.normalize(train_features.float(), dim=1)
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, train_labels, f)
    counts = torch.bincount(train_labels, minlength=num_classes).clamp(min=1).unsqueeze(1)
    return F.normalize(test_features.float(), dim=1) @ F.normalize(sums / counts, dim=1).T


def crt(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    schedule: SGDSchedule = ProbeOptions.crt,
    seed: int = 0,
) -> Tensor:
    """Classifier re-training (Kang et al. 2020): a fresh linear classifier trained on the frozen
    train features with class-balanced sampling; scores on the test features."""
    layer = train_linear(train_features, train_labels, num_classes, schedule, balanced=True, seed=seed)
    return _scores(layer, test_features)


@torch.no_grad()
def tau_norm(weight: Tensor, bias: Tensor | None, features: Tensor, tau: float = 1.0) -> Tensor:
    """τ-normalised classifier (Kang et al. 2020): ``z_j = (W_j / ‖W_j‖^τ) · v + b_j``.

    Kang et al. drop the bias; we keep the trained bias, so that τ = 0 is exactly the classifier.
    """
    w = weight / weight.norm(dim=1, keepdim=True).pow(tau)
    return F.linear(features, w, bias)


class _ClassScales(nn.Module):
    """``z_j ↦ f_j · z_j`` with one learnable scale per class, initialised to 1 (LWS)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes, device=device))

    def forward(self, logits: Tensor) -> Tensor:
        return logits * self.scales


def lws(
    train_logits: Tensor,
    train_labels: Tensor,
    test_logits: Tensor,
    schedule: SGDSchedule = ProbeOptions.lws,
    seed: int = 0,
) -> Tensor:
    """Learnable weight scaling (Kang et al. 2020): ``z̃_j = f_j · z_j`` on the frozen classifier's
    logits (``f_j W_j v + f_j b_j`` for a linear head, as the public implementations, e.g. MiSLAS, scale
    the classifier's output), ``f`` learned with class-balanced sampling of the train features. It
    works on logits, so it applies to linear and cosine heads alike."""
    scales = _ClassScales(train_logits.shape[1], train_logits.device)
    fit(scales, train_logits, train_labels, schedule, balanced=True, seed=seed)
    return _scores(scales, test_logits)


@torch.no_grad()
def feature_distance(features_m: Tensor, features_n: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """ECL eq. 12 (Xu et al., "Class-wise Average Feature Distance"), per class i:
    ``D_i^{m,n} = 1/|A_i| Σ_{t ∈ A_i} ‖v_t^m − v_t^n‖_2`` over the test images ``A_i`` of class i
    (NaN for a class without images). It is the mean of per-image distances between the two
    experts' features of the same image, not the distance between their class means."""
    d = (features_m.float() - features_n.float()).norm(dim=1).double()
    sums = torch.bincount(labels, weights=d, minlength=num_classes)
    counts = torch.bincount(labels, minlength=num_classes).double()
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))


def distance_by_group(per_class: Tensor, groups: np.ndarray) -> dict[str, float]:
    """Mean over classes (all, and per shot group) of a per-class distance."""
    d = per_class.cpu().numpy()
    out = {"distance": float(np.nanmean(d))}
    for g in GROUPS:
        sel = np.asarray(groups) == g
        out[f"distance_{g}"] = float(np.nanmean(d[sel])) if sel.any() and not np.isnan(d[sel]).all() else math.nan
    return out


# ----------------------------------------------------------------------------- a run


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild a finished run from ``config.yaml`` and its latest checkpoint (its method builds the model)."""
    path = Path(run_dir)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"device '{device}' was asked for, but CUDA is not available")
    if not path.is_dir():
        raise ProbeError(f"run directory {path} does not exist")
    rundir = RunDir(str(path))
    cfg = rundir.config()
    if cfg is None:
        raise ProbeError(f"no config.yaml in run directory {path}")
    data = build_dataset(cfg.data)
    method = METHODS.get(cfg.method)(cfg, torch.as_tensor(data.train_counts, dtype=torch.float32), data.in_channels)
    model = method.build_model()
    state = rundir.load_checkpoint(identity(cfg, data.num_classes))
    if state is None:
        raise ProbeError(f"no checkpoint_*/checkpoint.pt under run directory {path}: nothing to probe")
    load_model_state(model, state["model"])
    dev = torch.device(device)
    model.to(dev).eval()
    method.setup(dev, torch.contiguous_format)
    return LoadedRun(cfg, data, method, model, dev)


def _linear_head(head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(W, b)`` of a linear classifier head, None for a cosine one."""
    if isinstance(head, CosineClassifier):
        return None
    return head.weight.detach(), (head.bias.detach() if head.bias is not None else None)


def _pick_tau(weight: Tensor, bias: Tensor | None, val: tuple[Tensor, Tensor]) -> float:
    """The τ of TAU_GRID with the best val top-1 (the first on ties)."""
    feats, labels = val
    accs = [(tau_norm(weight, bias, feats, t).argmax(1) == labels).float().mean().item() for t in TAU_GRID]
    return TAU_GRID[int(np.argmax(accs))]


def probe_table(run: LoadedRun, probes: Sequence[str] = PROBES, options: ProbeOptions = ProbeOptions()) -> pd.DataFrame:
    """Run ``probes`` on ``run``'s current weights: one row per probe × expert (columns :data:`COLUMNS`).

    Experts are ``expert0…K-1`` and, for K > 1, ``concat`` (feature_accuracy, crt: the concatenated
    features; ncm: the per-expert ℓ2-normalised features, concatenated) or ``ensemble`` (tau_norm,
    lws: the mean of the experts' adjusted logits, like the methods' ``ensemble`` view).
    feature_distance (K > 1 only) has a row per expert pair and ``mean`` (over pairs), in ``distance*``.
    """
    _check_names(probes)
    dev, nc, opt = run.device, run.data.num_classes, options
    say = lambda text: print(f"[probes] {text}", flush=True)  # noqa: E731 - long, silent steps say what they do
    say(f"features of the test split ({len(run.data.test)} images)")
    test = _to(extract_features(run, "test"), dev)
    if {"ncm", "crt", "lws"} & set(probes):
        say(f"features of the training split ({len(run.data.train)} images)")
    train = _to(extract_features(run, "train"), dev) if {"ncm", "crt", "lws"} & set(probes) else None
    want_val = "tau_norm" in probes and opt.tau_on_val and run.data.val is not None
    val = _to(extract_features(run, "val"), dev) if want_val else None
    k, y = len(test["features"]), test["labels"]
    names = [f"expert{i}" for i in range(k)]
    rows: list[dict[str, object]] = []

    def add(probe: str, expert: str, scores: Tensor | None, note: str = "") -> None:
        acc = top1_by_group(scores, y, run.groups) if scores is not None else _NAN_TOP1
        rows.append({"probe": probe, "expert": expert, **acc, "note": note})

    def per_expert_and_concat(probe: str, fit_on: dict, score, normalise: bool = False, note: str = "") -> None:
        """Rows for each expert and, with K > 1, the concatenated (optionally ℓ2-normalised) features."""
        pairs = list(zip(fit_on["features"], test["features"]))
        if k > 1:
            cat = [torch.cat([F.normalize(f, dim=1) if normalise else f for f in fs], 1) for fs in zip(*pairs)]
            pairs.append((cat[0], cat[1]))
        for name, (fit_f, test_f) in zip(names + ["concat"], pairs):
            add(probe, name, score(fit_f, test_f), note)

    if "feature_accuracy" in probes:
        schedule = opt.feature_accuracy
        say(f"feature_accuracy: a linear layer trained on the TEST features for {schedule.epochs} epochs (MLLT's "
            "upper bound of what the features hold, not a test accuracy)")
        per_expert_and_concat("feature_accuracy", test, lambda _, f: feature_accuracy(f, y, nc, schedule, opt.seed),
                              note="trained on the test features: an upper bound, not a test accuracy")
    if "ncm" in probes:
        say("ncm: nearest class mean of the training features")
        per_expert_and_concat("ncm", train, lambda tr, te: ncm(tr, train["labels"], te, nc), normalise=True)
    if "crt" in probes:
        say(f"crt: the classifier retrained with class-balanced sampling for {opt.crt.epochs} epochs")
        per_expert_and_concat("crt", train, lambda tr, te: crt(tr, train["labels"], te, nc, opt.crt, opt.seed))
    if "tau_norm" in probes:
        _tau_norm_rows(run, test, val, opt, add)
    if "lws" in probes:
        say(f"lws: learnable weight scaling for {opt.lws.epochs} epochs")
        scores = [lws(tr, train["labels"], te, opt.lws, opt.seed) for tr, te in zip(train["logits"], test["logits"])]
        for name, s in zip(names, scores):
            add("lws", name, s)
        if k > 1:
            add("lws", "ensemble", torch.stack(scores).mean(0))
    if "feature_distance" in probes and k > 1:
        f = test["features"]
        pairs = itertools.combinations(range(k), 2)
        per_pair = {f"expert{m}-expert{n}": feature_distance(f[m], f[n], y, nc) for m, n in pairs}
        per_pair["mean"] = torch.stack(list(per_pair.values())).mean(0)
        for name, d in per_pair.items():
            row = {"probe": "feature_distance", "expert": name, **distance_by_group(d, run.groups)}
            rows.append({**row, "note": "ECL eq. 12"})
    return pd.DataFrame(rows, columns=COLUMNS)


_NAN_TOP1 = {"top1": math.nan, **{f"top1_{g}": math.nan for g in GROUPS}}


def _to(split: dict, device: torch.device) -> dict:
    return {key: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for key, v in split.items()}


def _tau_norm_rows(run: LoadedRun, test: dict, val: dict | None, opt: ProbeOptions, add) -> None:
    """τ-norm per expert (+ ensemble); NaN rows for cosine heads, already normalised."""
    heads = [_linear_head(h) for h in find_experts(run.model).heads]
    k = len(heads)
    names = [f"expert{i}" for i in range(k)] + (["ensemble"] if k > 1 else [])
    if any(h is None for h in heads):
        for name in names:
            add("tau_norm", name, None, "cosine classifier: weights already normalised")
        return
    scores = []
    for i, (w, b) in enumerate(heads):  # type: ignore[misc]
        tau, how = opt.tau, "fixed" if not opt.tau_on_val else "fixed: no val split"
        if val is not None:
            tau, how = _pick_tau(w, b, (val["features"][i], val["labels"])), "picked on val"
        scores.append(tau_norm(w, b, test["features"][i], tau))
        add("tau_norm", names[i], scores[-1], f"tau={tau:g} ({how})")
    if k > 1:
        add("tau_norm", "ensemble", torch.stack(scores).mean(0), "mean of the experts' tau-normalised logits")


def _check_names(probes: Sequence[str]) -> None:
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ProbeError(f"unknown probe(s) {', '.join(unknown)}: choose from {', '.join(PROBES)}")


def run_probes(
    run_dir: str | Path, probes: Sequence[str] = PROBES, device: str = "cpu", options: ProbeOptions = ProbeOptions()
) -> pd.DataFrame:
    """Probe a finished run's latest checkpoint; write and return ``RUN_DIR/probes.parquet``
    (one row per probe × expert, columns :data:`COLUMNS`; top-1 as fractions)."""
    _check_names(probes)  # before the (slow) run is built
    run = load_run(run_dir, device)
    df = probe_table(run, probes, options)
    RunDir(str(Path(run_dir).resolve())).write_table("probes.parquet", df)
    return df
