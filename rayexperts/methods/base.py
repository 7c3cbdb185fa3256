"""What a method provides: its config section, its model, its loss terms, its inference views.

The engine (``rayexperts.engine``) knows no method by name. It asks the method for a model,
feeds it batches, calls :meth:`Method.training_step` and :meth:`Method.predict`, and reports
the views :meth:`Method.views` names. A method module reads like its paper: an ``Options``
dataclass (its section ``<name>.*`` of the config, with the paper's defaults), the model it
assembles from ``rayexperts.models``, and its loss terms from ``rayexperts.losses``.

Adding a method is one module plus one preset (docs/development.md "Adding a method"; from your own
package: "Plugins")::

    from rayexperts.methods.base import LossOutput, Method, register_method

    @register_method("my_method")
    class MyMethod(Method):
        Options = MyOptions                      # the section cfg.my_method
        defaults = {"model.num_experts": 2}      # core keys it sets (a config layer)
        def build_model(self): ...
        def loss(self, out, targets): ...

Method modules import torch inside their functions: resolving a config imports the method's
module (its options and defaults), and that must not cost a torch import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rayexperts.registry import METHODS

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.models.output import ModelOutput

View = Callable[[Any], "Tensor"]  # inference output -> logits [B, C]


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class LossOutput:
    total: Tensor  # the scalar that is back-propagated
    terms: dict[str, Tensor] = field(default_factory=dict)  # weighted parts, logged as loss_<name>


@dataclass
class Batch:
    images: Tensor  # [B, ...] the (query) view
    targets: Tensor  # [B]
    key_images: Tensor | None = None  # the second (contrastive) view, when the method asks for it


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """``@register_method("name")``: register a :class:`Method` subclass under ``method=name``; it sets
    the class's ``name`` (its config section ``cfg.<name>``)."""
    return METHODS.register(name)  # type: ignore[return-value]


class Method:
    """Base class: one or K networks' logits as views (override what differs)."""

    name: ClassVar[str] = ""  # set by register_method; also the name of its config section
    Options: ClassVar[type] = NoOptions  # the dataclass of the section cfg.<name>
    defaults: ClassVar[Mapping[str, Any]] = {}  # dotted core keys this method sets (its defaults layer)
    # dotted key -> (value, source[, status, item]): what compat=official switches wherever the method runs
    # (docs/methods.md "Checked against the official code"); recipe items live in each preset's ``official:`` block
    official: ClassVar[Mapping[str, tuple]] = {}
    renamed: ClassVar[Mapping[str, str]] = {}  # removed key -> its new key (in this section, or dotted)
    path_keys: ClassVar[tuple[str, ...]] = ()  # keys holding local paths, made absolute by load_config
    # keys of this method's section counted in epochs (a short protocol scales them with train.epochs)
    epoch_keys: ClassVar[tuple[str, ...]] = ()
    sampler: ClassVar[str] = "instance"  # the sampler of data.sampler=auto
    pc_views: ClassVar[bool] = False  # add ``<view>_pc`` (PC softmax) for every view
    primary_view: ClassVar[str] = "expert0"  # the view reported to Ray Train / Tune by default
    # The loss can be taken against two target sets of one (mixed) batch: train.mixup_alpha > 0 is allowed
    # (:meth:`mixed_step`). A method whose step is more than forward + loss(out, targets) says False.
    supports_mixup: ClassVar[bool] = False
    # Overrides (``key=value``) that let the method run on the tiny 8x8 digits-lt set with the default model where
    # it cannot (e.g. it needs a timm ViT): what the tests and diagnostics that run every registered method add
    # (``rayexperts.diagnostics.runs.run_config``). Empty: the defaults run.
    demo_overrides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        self.cfg = cfg
        self.opts = cfg[self.name]
        self.class_counts = class_counts.float()
        self.num_classes = int(class_counts.numel())
        self.in_channels = in_channels

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        """Checks of ``cfg`` that the option types cannot express; raise ConfigError naming the key."""

    @classmethod
    def check_engine_options(cls, cfg: DictConfig) -> None:
        """The engine options this method cannot take (mixup), refused before anything starts."""
        from rayexperts.errors import ConfigError

        if float(cfg.train.mixup_alpha) > 0 and not cls.supports_mixup:
            raise ConfigError(f"train.mixup_alpha={cfg.train.mixup_alpha}: method {cls.name} cannot take mixup (its "
                              "loss is not a function of one output and one target set); use train.mixup_alpha=0")

    # -- model -------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(self.cfg.model.num_experts)

    @property
    def uses_key_view(self) -> bool:
        """True when the data loader must yield a second (contrastive) view."""
        return False

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def setup(self, device: torch.device, memory_format: torch.memory_format) -> None:
        """Move method-held state (class counts, frozen teachers) to ``device``."""
        self.class_counts = self.class_counts.to(device)

    # -- training ----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> Any:
        if self.uses_key_view:
            return model(batch.images, batch.key_images)
        return model(batch.images)

    def training_step(self, model: nn.Module, batch: Batch) -> LossOutput:
        return self.loss(self.forward(model, batch), batch.targets)

    def mixed_step(self, model: nn.Module, batch: Batch, lam: float, perm: Tensor) -> LossOutput:
        """Mixup (the engine's ``train.mixup_alpha``): the model sees ``λ·x + (1 − λ)·x[perm]`` once, and the
        loss is ``λ·L(y) + (1 − λ)·L(y[perm])``, term by term."""
        import dataclasses

        mixed = dataclasses.replace(batch, images=batch.images * lam + batch.images[perm] * (1 - lam))
        out = self.forward(model, mixed)
        a, b = self.loss(out, batch.targets), self.loss(out, batch.targets[perm])
        terms = {k: lam * a.terms[k] + (1 - lam) * b.terms[k] for k in a.terms}
        return LossOutput(lam * a.total + (1 - lam) * b.total, terms)

    def on_epoch(self, epoch: int) -> None:
        """Called by the engine before training epoch ``epoch`` (0-indexed; also after a resume), so a method
        whose loss changes with the epoch (DRW's re-weighting, RIDE's temperatures) can switch; a pure function
        of the epoch keeps resume exact. No-op by default."""

    def loss(self, out: Any, targets: Tensor) -> LossOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step; no-op by default."""

    # -- inference ---------------------------------------------------------------------
    def infer(self, model: nn.Module, images: Tensor) -> Any:
        """The evaluation forward pass; every view is a function of what it returns."""
        return model(images)

    def views(self) -> dict[str, View]:
        """The inference views, by name: ``expert0..K-1``, ``ensemble`` (mean of the experts' logits)
        for K > 1, and ``<view>_pc`` (PC softmax) when :attr:`pc_views`. The one definition: the
        engine evaluates exactly these names."""
        k = self.num_experts
        views: dict[str, View] = {f"expert{i}": _expert(i) for i in range(k)}
        if k > 1:
            views["ensemble"] = mean_logits
        if self.pc_views:
            for name, view in list(views.items()):
                views[f"{name}_pc"] = self._pc(view)
        return views

    def _pc(self, view: View) -> View:
        from rayexperts.losses import pc_softmax_logits

        return lambda out: pc_softmax_logits(view(out), self.class_counts)

    def view_names(self) -> list[str]:
        return list(self.views())

    @classmethod
    def logits_view(cls, cfg: DictConfig) -> str:
        """The view of the mean of the experts' raw logits (a CBD teacher's own accuracy)."""
        return "ensemble" if int(cfg.model.num_experts) > 1 else "expert0"

    def predict(self, model: nn.Module, images: Tensor, extra_views: Mapping[str, View] | None = None,
                ) -> tuple[dict[str, Tensor], ModelOutput, Any]:
        """Logits of every view (and of ``extra_views``, functions of the same output), the trained model's
        output (features, per-expert logits) and what :meth:`infer` returned."""
        import torch

        with torch.no_grad():
            out = self.infer(model, images)
            views = {**self.views(), **(extra_views or {})}
            return {name: view(out) for name, view in views.items()}, self.model_output(out), out

    def sample_statistics(self, out: Any) -> dict[str, Tensor]:
        """Per-sample numbers (``[B]``) of an evaluation output that the engine averages overall and per shot
        group into the primary view's metrics row (RIDE's router: ``experts_per_sample``). None by default."""
        return {}

    def test_time_steps(self) -> dict[str, Any]:
        """Views that learn on the unlabelled test images before they are evaluated (SADE's test-time
        aggregation): name → :class:`rayexperts.engine.test_time.TestTimeStep`. Transductive: the engine marks
        their rows ``transductive=True``. None by default."""
        return {}

    def model_output(self, out: Any) -> ModelOutput:
        """The trained model's :class:`ModelOutput` inside what :meth:`infer` returns."""
        return out

    def expert_logits_for_kl(self, out: ModelOutput) -> list[Tensor]:
        """The experts whose disagreement is logged as ``expert_kl`` (NCL Fig. 1/5b)."""
        return list(out.logits)

    # -- runs that must finish first (CBD's teachers) --------------------------------------
    @classmethod
    def prerequisites(cls, cfg: DictConfig) -> list[DictConfig]:
        """Configs of runs that must finish before this one can start (trained in parallel)."""
        return []

    @classmethod
    def after_prerequisites(cls, cfg: DictConfig, run_dirs: list[str]) -> DictConfig:
        """This method's config once its prerequisites have finished in ``run_dirs``."""
        return cfg

    @classmethod
    def primary_view_for(cls, cfg: DictConfig) -> str:
        """The headline view of a run with config ``cfg`` (reported to Ray Train / Tune, shown first): the
        class's ``primary_view``; override it when the view depends on the config (e.g. on K)."""
        return cls.primary_view

    @classmethod
    def summary_views(cls) -> tuple[str, ...]:
        """The views a two-stage job's summary reports for this method's own run."""
        return (cls.primary_view,)

    # -- sweeps ----------------------------------------------------------------------------
    @classmethod
    def check_search_space(cls, key: str, distribution: Mapping[str, list], cfg: DictConfig, where: str) -> None:
        """Refuse a searched ``key`` that this method gives a meaning of its own; no-op by default."""

    @classmethod
    def search_value(cls, key: str, value: Any, cfg: DictConfig) -> Any:
        """A sampled value as the config takes it (e.g. CBD's teacher names → run directories)."""
        return value

    @classmethod
    def probe_values(cls, key: str, values: list[Any], cfg: DictConfig) -> list[Any]:
        """Values of a searched key to check against the config before a sweep starts."""
        return [cls.search_value(key, v, cfg) for v in values]


def _expert(i: int) -> View:
    return lambda out: out.logits[i]


def mean_logits(out: ModelOutput) -> Tensor:
    """The mean of the experts' logits (every method's ``ensemble`` view)."""
    import torch

    return torch.stack(list(out.logits)).mean(0)
