"""``cbd``: Class-Balanced Distillation, CBD and CBD_ENS (Iscen et al., BMVC 2021; METHODS.md "CBD").

Stage 2, the student: a new single network trained from scratch with class-balanced sampling
(``default_sampler``), distilling the features of K frozen teachers (stage 1, instance sampling),
which see the same augmented batch:

    CBD:     L = (1−α) CE(z, y) + α β (1 − cos(v, v̂))                          # eq. 2, K = 1
    CBD_ENS: L = (1−α) CE(z, y) + α β (1 − cos(h(v), [v̂¹ … v̂ᴷ]))              # eq. 4, K > 1

α = ``loss.cbd_alpha``, β = ``loss.cbd_beta``; batch mean instead of the paper's sum over i (as
every method here). ``h`` is a linear ``d → Σ_k d_k`` layer and the student's cosine classifier sits
on ``h(v)``; with one teacher there is no ``h`` and ``v`` must have the teacher's width.

Teachers are the run directories in ``cbd.teacher_runs`` (paths or URIs; each its ``config.yaml`` and
latest checkpoint, loaded with ``weights_only=True``), of any registered method. They are held by
the method, not the student model: frozen (``requires_grad=False``), in eval mode, outside the
optimizer and DDP. A multi-expert teacher (MLLT, NCL, ECL, ``ce`` with K experts) gives every
expert's feature as one part of the target, i.e. each of its experts counts as one teacher in
eq. 4 (ℓ2-normalised, then concatenated); its logits are the mean of its experts' logits.

Views: ``teacher<k>`` (teacher k's raw logits), ``teacher_ensemble`` (the mean of the teachers'
logits, the paper's "Teacher Ensemble") and ``student``. Logged terms: ``ce`` (= (1−α)·CE) and
``distill`` (= αβ·(1 − cos)).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from rayexperts.engine.checkpoint import CHECKPOINT_FILE, identity, latest_checkpoint_dir, load_checkpoint
from rayexperts.engine.results import resolve_storage
from rayexperts.losses import cbd_distillation_loss
from rayexperts.methods.base import Batch, LossOutput, Method
from rayexperts.models import MultiExpertNet, build_model
from rayexperts.models.output import ModelOutput


def read_run_config(run: str) -> DictConfig:
    """The resolved ``config.yaml`` of run directory ``run`` (a path or URI)."""
    from rayexperts.config import from_dict

    fs, path = resolve_storage(run)
    try:
        with fs.open_input_stream(f"{path}/config.yaml") as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"run directory {run} has no config.yaml (not a finished training run?)") from e
    return from_dict(OmegaConf.to_container(OmegaConf.create(text)))  # type: ignore[arg-type]


def read_latest_checkpoint(run: str, ident: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The latest checkpoint of run directory ``run`` (a path or URI), or None when it has none.

    The rule of ``engine.checkpoint.latest_checkpoint_dir`` (the one Ray Train registered last, else the
    newest ``checkpoint_*``); a URI's file is copied to a local temp dir. Loaded on the CPU with
    ``weights_only=True``; ``ident`` refuses a checkpoint of another configuration.
    """
    fs, path = resolve_storage(run)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            return load_checkpoint(latest_checkpoint_dir(path), ident)
        except FileNotFoundError:
            return None
    latest = _remote_latest_checkpoint_dir(fs, path)
    if latest is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(f"{latest}/{CHECKPOINT_FILE}", str(Path(tmp) / CHECKPOINT_FILE), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(tmp, ident)


def _remote_latest_checkpoint_dir(fs: pafs.FileSystem, path: str) -> str | None:
    def has_file(p: str) -> bool:
        return fs.get_file_info(p).type == pafs.FileType.File

    snapshot = f"{path}/checkpoint_manager_snapshot.json"
    if has_file(snapshot):
        with fs.open_input_stream(snapshot) as f:
            latest = (json.loads(f.read()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest and has_file(f"{path}/{latest}/{CHECKPOINT_FILE}"):
            return f"{path}/{latest}"
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    dirs = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.base_name.startswith("checkpoint_") and has_file(f"{i.path}/{CHECKPOINT_FILE}"))
    return dirs[-1] if dirs else None


def load_teacher(run: str, class_counts: Tensor, in_channels: int, data_name: str) -> MultiExpertNet:
    """Teacher model of run directory ``run``: built by its own method, latest weights, frozen, eval mode."""
    from rayexperts.methods import get_method

    cfg = read_run_config(run)
    if cfg.method == "cbd":
        raise ValueError(f"teacher run {run} is a CBD student; a teacher must be a stage-1 run of another method")
    if cfg.data.name != data_name:
        raise ValueError(f"teacher run {run} was trained on data.name={cfg.data.name!r}, the student on {data_name!r}")
    method = get_method(cfg.method)(cfg, class_counts.cpu(), in_channels)
    with torch.random.fork_rng(devices=[]):  # the student's initial weights stay those of its seed
        model = method.build_model()
    state = read_latest_checkpoint(run, identity(cfg, int(class_counts.numel())))
    if state is None:
        raise FileNotFoundError(f"teacher run {run} has no checkpoint_*/{CHECKPOINT_FILE}: train it first")
    model.load_state_dict(state["model"])
    model.requires_grad_(False)
    return model.eval()


class ClassBalancedDistillation(Method):
    name = "cbd"
    default_sampler = "class_balanced"
    primary_view = "student"

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.teacher_runs = [str(r) for r in cfg.cbd.teacher_runs]
        if not self.teacher_runs:
            raise ValueError("method=cbd needs its teachers: set cbd.teacher_runs to stage-1 run directories, "
                             "or run jobs/cbd_ens.py, which trains them")
        if int(cfg.model.num_experts) != 1:
            raise ValueError(f"the CBD student is one network: model.num_experts must be 1, got {cfg.model.num_experts}")
        self._teachers: list[MultiExpertNet] | None = None

    @property
    def teachers(self) -> list[MultiExpertNet]:
        """The frozen teachers, loaded on first use (CPU until :meth:`setup`); never submodules of the student."""
        if self._teachers is None:
            self._teachers = [
                load_teacher(run, self.class_counts, self.in_channels, str(self.cfg.data.name))
                for run in self.teacher_runs
            ]
        return self._teachers

    def teacher_feature_dims(self) -> list[int]:
        """Width of every part of the distillation target: one per teacher expert."""
        return [t.feature_dim for t in self.teachers for _ in range(t.num_experts)]

    def build_model(self) -> nn.Module:
        dims = self.teacher_feature_dims()
        proj = sum(dims) if len(dims) > 1 else 0  # h: R^d → R^{Σd_k} (eq. 4); none for plain CBD (eq. 2)
        model = build_model(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False,
                            feature_proj_dim=proj)
        if proj == 0 and model.feature_dim != dims[0]:
            raise ValueError(
                f"CBD with one teacher distils v directly (eq. 2): the student's feature width {model.feature_dim} "
                f"({self.cfg.model.backbone}) must equal the teacher's {dims[0]} ({self.teacher_runs[0]})"
            )
        return model

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        fmt = torch.channels_last if device.type == "cuda" and self.cfg.model.channels_last else torch.preserve_format
        for t in self.teachers:
            t.to(device, memory_format=fmt)

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor) -> list[ModelOutput]:
        return [t(images) for t in self.teachers]

    def training_step(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Student and teachers see the same augmented batch; the teachers without gradient."""
        out = model(batch.images)
        target = [v for t in self.teacher_outputs(batch.images) for v in t.features]
        return self.loss(out, batch.targets, target)

    def loss(self, out: ModelOutput, targets: Tensor, teacher_features: list[Tensor] | None = None) -> LossOutput:
        """Eq. 2 / eq. 4 from the student's output and the teachers' features (one tensor per part)."""
        if teacher_features is None:
            raise ValueError("the CBD loss needs the teachers' features of the same batch: call training_step")
        alpha, beta = float(self.cfg.loss.cbd_alpha), float(self.cfg.loss.cbd_beta)
        terms = {
            "ce": (1 - alpha) * F.cross_entropy(out.logits[0].float(), targets),
            "distill": alpha * beta * cbd_distillation_loss(out.features[0].float(),
                                                            [v.float() for v in teacher_features]),
        }
        return LossOutput(terms["ce"] + terms["distill"], {k: v.detach() for k, v in terms.items()})

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> tuple[dict[str, Tensor], ModelOutput]:
        out = model(images)
        teacher_logits = [torch.stack(t.logits).mean(0) for t in self.teacher_outputs(images)]
        views = {f"teacher{k}": z for k, z in enumerate(teacher_logits)}
        views["teacher_ensemble"] = torch.stack(teacher_logits).mean(0)
        views["student"] = out.logits[0]
        return views, out

    def view_names(self) -> list[str]:
        return [f"teacher{k}" for k in range(len(self.teacher_runs))] + ["teacher_ensemble", "student"]
