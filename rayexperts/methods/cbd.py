"""``cbd``: Class-Balanced Distillation, CBD and CBD_ENS (Iscen et al., BMVC 2021; docs/methods.md "CBD").

Stage 1, the teachers (``cbd.teachers``): K runs of other methods trained with instance
sampling; :meth:`ClassBalancedDistillation.prerequisites` gives their configs, and
``jobs/cbd_ens.py`` trains them in parallel. Stage 2, the student: a new single network trained
from scratch with class-balanced sampling (:attr:`sampler`), distilling the features of the K
frozen teachers, which see the same augmented batch:

    CBD:     L = (1−α) CE(z, y) + α β (1 − cos(v, v̂))                          # eq. 2, K = 1
    CBD_ENS: L = (1−α) CE(z, y) + α β (1 − cos(h(v), [v̂¹ … v̂ᴷ]))              # eq. 4, K > 1

α = ``cbd.distill_mix``, β = ``cbd.distill_scale``; batch mean instead of the paper's sum over i
(as every method here). ``h: R^d → R^{Σ_k d_k}`` (``cbd.projection``) is a linear layer (the text,
default) or the authors' code's Dense → ReLU → ℓ2-normalise (``mlp``; with ``compat=official``, which
also fixes the cosine classifier's scale at 20), and the student's cosine classifier sits on ``h(v)``;
with one teacher there is no ``h`` and ``v`` must have the teacher's width.

Teachers are the run directories in ``cbd.teacher_runs`` (paths or URIs; each its ``config.yaml``
and latest checkpoint, through :class:`~rayexperts.rundir.RunDir`), of any registered method.
They are held by the method, not the student model: frozen (``requires_grad=False``), in eval
mode, outside the optimizer and DDP. A multi-expert teacher (MLLT, NCL, ECL, ``ce`` with K
experts) gives every expert's feature as one part of the target, i.e. each of its experts counts
as one teacher in eq. 4 (ℓ2-normalised, then concatenated); its logits are the mean of its
experts' logits.

Views: ``teacher<k>`` (teacher k's raw logits), ``teacher_ensemble`` (the mean of the teachers'
logits, the paper's "Teacher Ensemble") and ``student``. Logged terms: ``ce`` (= (1−α)·CE) and
``distill`` (= αβ·(1 − cos)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rayexperts.config import check_gpu_share, compose, flatten, method_layers, settings, with_overrides
from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, View, register_method
from rayexperts.registry import METHODS
from rayexperts.rundir import CHECKPOINT_FILE, RunDir, identity, load_model_state

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.methods.base import Batch
    from rayexperts.models import ModelOutput

# Teacher method aliases: the paper's teacher is cross-entropy on a cosine classifier (instance sampling).
TEACHER_METHODS = {"ce_cosine": {"method": "ce", "model.classifier": "cosine"}}
TEACHER_RUNS = "cbd.teacher_runs"


@dataclass
class TeacherSpec:
    type: Literal["standard", "data_aug"] = "standard"  # data_aug: + colour jitter and Gaussian noise
    seed: int = 0
    method: str = "ce_cosine"  # a registered method, or ce_cosine (CE on a cosine classifier)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys for this teacher only


def _default_teachers() -> list[TeacherSpec]:
    return [TeacherSpec("standard", 0), TeacherSpec("standard", 1), TeacherSpec("data_aug", 2),
            TeacherSpec("data_aug", 3)]


@dataclass
class CBDOptions:
    distill_mix: float = 0.4  # α: L = (1−α)·CE + α·β·(1 − cos)  (eq. 2, 4)
    distill_scale: float = 100.0  # β
    projection: Literal["linear", "mlp"] = "linear"  # h: a linear layer (the text) or Dense-ReLU-l2norm (the code)
    # What the data-augmentation teachers add to the standard crop: colour jitter 0.4 and Gaussian noise 0.01
    # (data_aug, the text) or SimCLR's colour jitter of strength 1 with p 0.8 then grayscale p 0.2 (the code)
    data_aug_augment: Literal["data_aug", "data_aug_simclr"] = "data_aug"
    teachers: list[TeacherSpec] = field(default_factory=_default_teachers)  # stage 1 (jobs/cbd_ens.py)
    teacher_runs: list[str] = field(default_factory=list)  # the student's teachers: run directories (paths or URIs)
    teacher_cpus: float = 1.0  # per teacher worker
    teacher_gpus: float = 0.0
    teacher_workers: int = 1
    teacher_epochs: int = 0  # 0: train.epochs
    student_backbone: str = ""  # empty: model.backbone


def teacher_config(cfg: DictConfig, i: int) -> DictConfig:
    """Teacher ``i``'s run config: the job's core settings → its method's defaults → type, seed, resources,
    run dir ``<job>/teachers/teacher<i>`` → its own ``overrides``."""
    spec, where, c = cfg.cbd.teachers[i], f"cbd.teachers[{i}]", cfg.cbd
    alias = TEACHER_METHODS.get(spec.method, {"method": spec.method})
    if alias["method"] not in METHODS or alias["method"] == "cbd":
        choices = ", ".join([*TEACHER_METHODS, *(m for m in METHODS.names() if m != "cbd")])
        raise ConfigError(f"{where}.method={spec.method!r}: choose one of {choices}")
    core = {k: v for k, v in settings(cfg).items() if k not in ("cbd", "method")}
    fixed = {
        **alias,
        "seed": int(spec.seed),
        "data.augment": str(c.data_aug_augment) if spec.type == "data_aug" else "standard",
        "data.sampler": "auto",
        "train.epochs": int(c.teacher_epochs) or int(cfg.train.epochs),
        "scaling.num_workers": int(c.teacher_workers),
        "scaling.cpus_per_worker": float(c.teacher_cpus),
        "scaling.use_gpu": float(c.teacher_gpus) > 0,
        **({"scaling.gpus_per_worker": float(c.teacher_gpus)} if float(c.teacher_gpus) > 0 else {}),
        "run.storage_path": RunDir.for_config(cfg).child("teachers").uri,
        "run.name": f"teacher{i}",
    }
    layers = [(f"cbd job {cfg.run.name}", {"method": alias["method"], **core}),
              *method_layers(alias["method"], str(cfg.compat)), (where, fixed)]
    if spec.overrides:
        layers.append((f"{where}.overrides", flatten(dict(spec.overrides))))
    out = compose(layers, resolve_paths=False)
    given = set(fixed) | set(flatten(dict(spec.overrides or {})))
    job_sources = dict(cfg.sources)
    sources = {k: v for k, v in job_sources.items() if not k.startswith("cbd.") and k not in given}
    if spec.type == "data_aug" and "cbd.data_aug_augment" in job_sources:
        sources["data.augment"] = job_sources["cbd.data_aug_augment"]
    out.sources = sources
    return out


def load_teacher(run: str, class_counts: Tensor, in_channels: int, data_name: str) -> nn.Module:
    """Teacher model of run directory ``run``: built by its own method, latest weights, frozen, eval mode."""
    import torch

    rundir = RunDir(run)
    cfg = rundir.config()
    if cfg is None:
        raise FileNotFoundError(f"teacher run {run} has no config.yaml (not a training run directory?)")
    if cfg.method == "cbd":
        raise ValueError(f"teacher run {run} is a CBD student; a teacher must be a stage-1 run of another method")
    if cfg.data.name != data_name:
        raise ValueError(f"teacher run {run} was trained on data.name={cfg.data.name!r}, the student on {data_name!r}")
    method = METHODS.get(cfg.method)(cfg, class_counts.cpu(), in_channels)
    with torch.random.fork_rng(devices=[]):  # the student's initial weights stay those of its seed
        model = method.build_model()
    state = rundir.load_checkpoint(identity(cfg, int(class_counts.numel())))
    if state is None:
        raise FileNotFoundError(f"teacher run {run} has no checkpoint_*/{CHECKPOINT_FILE}: train it first")
    load_model_state(model, state["model"])
    model.requires_grad_(False)
    return model.eval()


@register_method("cbd")
class ClassBalancedDistillation(Method):
    Options = CBDOptions
    defaults = {"model.num_experts": 1, "model.classifier": "cosine"}
    official = {  # docs/methods.md "Checked against the official code", row 5
        "cbd.projection": ("mlp", "google-research/google-research:class_balanced_distillation/resnet.py "
                           "(h = Dense-ReLU-l2-normalise; the text: a linear layer)", "P", "projection h"),
        "model.cosine_scale": (20.0, "google-research/google-research:class_balanced_distillation/resnet.py "
                               "(CosineLayer sigma = 20)", "P", "cosine classifier"),
    }
    renamed = {"loss.cbd_alpha": "distill_mix", "loss.cbd_beta": "distill_scale", "teachers": "teachers"}
    path_keys = (TEACHER_RUNS,)
    epoch_keys = ("cbd.teacher_epochs",)
    sampler = "class_balanced"
    primary_view = "student"

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.teacher_runs = [str(r) for r in self.opts.teacher_runs]
        self._teachers: list[nn.Module] | None = None

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        if int(cfg.model.num_experts) != 1:
            raise ConfigError(f"the CBD student is one network: model.num_experts must be 1, got {cfg.model.num_experts}")
        c = cfg.cbd
        check_gpu_share("cbd", float(c.teacher_gpus) > 0, float(c.teacher_gpus), int(c.teacher_workers),
                        keys=("teacher_gpus", "teacher_gpus", "teacher_workers"))

    # -- stage 1 ---------------------------------------------------------------------------
    @classmethod
    def prerequisites(cls, cfg: DictConfig) -> list[DictConfig]:
        if cfg.cbd.teacher_runs:
            return []
        if not cfg.cbd.teachers:
            raise ConfigError("'cbd.teachers' is empty: give at least one teacher spec (or cbd.teacher_runs)")
        return [teacher_config(cfg, i) for i in range(len(cfg.cbd.teachers))]

    @classmethod
    def after_prerequisites(cls, cfg: DictConfig, run_dirs: list[str]) -> DictConfig:
        """The student's config: the job's, with the teachers and run dir ``<job>/student``."""
        return with_overrides(cfg, {
            "model.backbone": str(cfg.cbd.student_backbone or cfg.model.backbone),
            TEACHER_RUNS: list(run_dirs),
            "run.storage_path": RunDir.for_config(cfg).uri,
            "run.name": "student",
        }, "cbd student")

    @classmethod
    def summary_views(cls) -> tuple[str, ...]:
        return ("teacher_ensemble", "student")

    # -- teachers --------------------------------------------------------------------------
    @property
    def teachers(self) -> list[nn.Module]:
        """The frozen teachers, loaded on first use (CPU until :meth:`setup`); never submodules of the student."""
        if not self.teacher_runs:
            raise ConfigError("method=cbd trains against its teachers: set cbd.teacher_runs to stage-1 run "
                              "directories, or run jobs/cbd_ens.py, which trains them")
        if self._teachers is None:
            self._teachers = [load_teacher(run, self.class_counts, self.in_channels, str(self.cfg.data.name))
                              for run in self.teacher_runs]
        return self._teachers

    def teacher_feature_dims(self) -> list[int]:
        """Width of every part of the distillation target: one per teacher expert. Without teacher runs
        (``python -m rayexperts.models summary``): those of the ``cbd.teachers`` the job would train."""
        import torch

        from rayexperts.models import find_experts

        if self.teacher_runs:
            teachers = self.teachers
        else:
            configs = [teacher_config(self.cfg, i) for i in range(len(self.opts.teachers))]
            with torch.random.fork_rng(devices=[]):
                teachers = [METHODS.get(c.method)(c, self.class_counts.cpu(), self.in_channels).build_model()
                            for c in configs]
        return [find_experts(t).feature_dim for t in teachers for _ in range(find_experts(t).num_experts)]

    def build_model(self) -> nn.Module:
        from torch import nn

        from rayexperts.models import build_experts

        from rayexperts.models import L2Normalize

        dims = self.teacher_feature_dims()
        proj = sum(dims) if len(dims) > 1 else 0  # h: R^d → R^{Σd_k} (eq. 4); none for plain CBD (eq. 2)

        def h(d: int) -> tuple[nn.Module, int]:
            if self.opts.projection == "mlp":
                return nn.Sequential(nn.Linear(d, proj), nn.ReLU(), L2Normalize()), proj
            return nn.Linear(d, proj), proj

        neck = h if proj else None
        model = build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=False, neck=neck)
        if not proj and model.feature_dim != dims[0]:
            raise ValueError(
                f"CBD with one teacher distils v directly (eq. 2): the student's feature width {model.feature_dim} "
                f"({self.cfg.model.backbone}) must equal the teacher's {dims[0]} ({self.teacher_runs[0]})"
            )
        return model

    def setup(self, device: torch.device, memory_format: torch.memory_format) -> None:
        super().setup(device, memory_format)
        for t in self.teachers:
            t.to(device, memory_format=memory_format)

    def teacher_outputs(self, images: Tensor) -> list[ModelOutput]:
        import torch

        with torch.no_grad():
            return [t(images) for t in self.teachers]

    # -- loss ------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Student and teachers see the same augmented batch; the teachers without gradient."""
        out = model(batch.images)
        target = [v for t in self.teacher_outputs(batch.images) for v in t.features]
        return self.loss(out, batch.targets, target)

    def loss(self, out: ModelOutput, targets: Tensor, teacher_features: list[Tensor] | None = None) -> LossOutput:
        """Eq. 2 / eq. 4 from the student's output and the teachers' features (one tensor per part)."""
        import torch.nn.functional as F

        from rayexperts.losses import cbd_distillation_loss

        if teacher_features is None:
            raise ValueError("the CBD loss needs the teachers' features of the same batch: call training_step")
        alpha, beta = float(self.opts.distill_mix), float(self.opts.distill_scale)
        terms = {
            "ce": (1 - alpha) * F.cross_entropy(out.logits[0].float(), targets),
            "distill": alpha * beta * cbd_distillation_loss(out.features[0].float(),
                                                            [v.float() for v in teacher_features]),
        }
        return LossOutput(terms["ce"] + terms["distill"], {k: v.detach() for k, v in terms.items()})

    # -- inference -------------------------------------------------------------------------
    def infer(self, model: nn.Module, images: Tensor) -> tuple[ModelOutput, list[ModelOutput]]:
        return model(images), self.teacher_outputs(images)

    def views(self) -> dict[str, View]:
        import torch

        def teacher(k: int) -> View:
            return lambda out: torch.stack(list(out[1][k].logits)).mean(0)

        views: dict[str, View] = {f"teacher{k}": teacher(k) for k in range(len(self.teacher_runs))}
        views["teacher_ensemble"] = lambda out: torch.stack(
            [torch.stack(list(t.logits)).mean(0) for t in out[1]]).mean(0)
        views["student"] = lambda out: out[0].logits[0]
        return views

    def model_output(self, out: tuple[ModelOutput, list[ModelOutput]]) -> ModelOutput:
        return out[0]

    # -- sweeps: cbd.teacher_runs is searched as lists of teacher names ----------------------
    @classmethod
    def _teacher_names(cls, cfg: DictConfig) -> list[str]:
        return [f"teacher{i}" for i in range(len(cfg.cbd.teacher_runs) or len(cfg.cbd.teachers))]

    @classmethod
    def check_search_space(cls, key: str, distribution: dict[str, list], cfg: DictConfig, where: str) -> None:
        """``cbd.teacher_runs`` is searched as lists of teacher names ``teacher<i>``, ``i`` indexing
        ``cbd.teacher_runs`` when given, else ``cbd.teachers`` (which the sweep trains first)."""
        if key != TEACHER_RUNS:
            return
        (kind, values), = distribution.items()
        names = cls._teacher_names(cfg)
        if kind not in ("choice", "grid"):
            raise ConfigError(f"{where}: searched as {{choice: [[teacher0, ...], ...]}}")
        for v in values:
            if not isinstance(v, list) or not v or any(name not in names for name in v):
                raise ConfigError(f"{where}: {v!r} is not a non-empty list of teacher names ({', '.join(names)})")

    @classmethod
    def search_value(cls, key: str, value: Any, cfg: DictConfig) -> Any:
        """Teacher names → the run directories the (student) base config lists."""
        if key != TEACHER_RUNS:
            return value
        runs = list(cfg.cbd.teacher_runs)
        return [runs[int(str(name).removeprefix("teacher"))] for name in value]

    @classmethod
    def probe_values(cls, key: str, values: list[Any], cfg: DictConfig) -> list[Any]:
        return [] if key == TEACHER_RUNS else super().probe_values(key, values, cfg)
