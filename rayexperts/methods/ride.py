"""``ride`` and ``ride_ea``: Routing Diverse Distribution-Aware Experts (Wang et al., ICLR 2021; docs/methods.md §2,
as frank-xwang/RIDE-LongTailRecognition@ab8be5c computes it).

Stage 1 (``ride``): a shared trunk (CIFAR: stem + stage 1; ImageNet: stem + stages 1-2) and E experts of the
remaining stages at 0.75 width (``model.expert_width``; 24/48 channels on CIFAR, 192/384 planes on ImageNet),
each with a NormedLinear classifier at scale 30 inside the model (logits ``z_e = 30·cos_e``):

    L = Σ_e [ CE_w(z_e − s·m_y·1[y], y) + λ_div · T̄² · KL(softmax(z̄/T) ‖ softmax(z_e/T)) ]      # ride_loss

summed over experts, z̄ the mean of the expert logits (detached in the KL target), λ_div = ``ride.diversity_factor``
(negative: maximise diversity). After the reweight epoch (strictly ``epoch > reweight_epoch``, the code's 1-indexed
epoch, so from 0-indexed epoch ``reweight_epoch``) the DRW weights and per-class temperatures are on (the
engine's epoch hook). Views: each expert and ``ensemble``, the mean of the expert logits (the code's output).

Stage 2 (``ride_ea``): the expert-assignment router (docs/methods.md §2.4) on a finished stage-1 run (the way CBD's
student loads its teachers): every stage-1 weight frozen, BatchNorm in eval mode, only the routers trained with
the class-balanced sampler and BCE(pos_weight). At test time expert 0 always runs; expert i+1 runs for the
samples whose router i says so (sigmoid > 0.5), and the prediction is the per-sample mean of the experts that
ran. Views: ``router`` (that prediction) and ``ensemble`` (all experts); the statistic ``experts_per_sample``
(overall and per shot group) says how many experts the router used, which is what it is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayexperts.config import with_overrides
from rayexperts.errors import ConfigError
from rayexperts.methods.base import LossOutput, Method, View, mean_logits, register_method
from rayexperts.rundir import RunDir

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import Tensor, nn

    from rayexperts.methods.base import Batch
    from rayexperts.models import ModelOutput


@dataclass
class RIDEOptions:
    diversity_factor: float = -0.2  # λ_div (additional_diversity_factor): negative, the KL is maximised
    reweight_factor: float = 0.05  # f of the per-class diversity temperatures
    reweight_epoch: int = 160  # re-weighting and temperatures on when the 1-indexed epoch > this
    base_temperature: float = 1.0
    max_m: float = 0.5  # LDAM margins
    scale: float = 30.0  # s: the logits are s·cos inside the model, the margin is s·m
    # The code's quirk (docs/methods.md §2.1): with diversity_factor = 0 the CE term uses the mean logits z̄.
    mean_logits_ce_when_no_diversity: bool = False


@register_method("ride")
class RIDE(Method):
    Options = RIDEOptions
    defaults = {"model.num_experts": 3, "model.expert_width": 0.75, "model.classifier": "normed_linear",
                "model.cosine_scale": 30.0}
    official = {"ride.mean_logits_ce_when_no_diversity": (
        True, "frank-xwang/RIDE-LongTailRecognition@ab8be5c:model/loss.py:224 (CE on the mean logits when the "
        "diversity factor is 0)", "P", "loss")}
    supports_mixup = True
    primary_view = "ensemble"
    epoch_keys = ("ride.reweight_epoch",)

    def __init__(self, cfg: DictConfig, class_counts: Tensor, in_channels: int = 3) -> None:
        super().__init__(cfg, class_counts, in_channels)
        self.reweighted = False

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        o, m = cfg.ride, cfg.model
        if m.classifier == "linear" or abs(float(m.cosine_scale) - float(o.scale)) > 1e-9:
            raise ConfigError(f"RIDE's logits are s·cos inside the model: model.cosine_scale must equal {cls.name}.scale "
                              f"({o.scale}) with a cosine classifier, got model.classifier={m.classifier} "
                              f"model.cosine_scale={m.cosine_scale}")
        if not 0 <= o.reweight_factor <= 1:
            raise ConfigError(f"'{cls.name}.reweight_factor' must lie in [0, 1], got {o.reweight_factor}")

    def build_model(self) -> nn.Module:
        from rayexperts.models import build_experts

        return build_experts(self.cfg.model, self.num_classes, self.in_channels, shared_trunk=True)

    def on_epoch(self, epoch: int) -> None:
        """``_hook_before_epoch(epoch)`` with the code's 1-indexed epoch: on when ``epoch + 1 > reweight_epoch``."""
        self.reweighted = epoch + 1 > int(self.opts.reweight_epoch)

    def loss(self, out: ModelOutput, targets: Tensor) -> LossOutput:
        from rayexperts.losses import ride_loss

        o = self.opts
        loss = ride_loss([z.float() for z in out.logits], targets, self.class_counts, self.reweighted,
                         float(o.diversity_factor), float(o.reweight_factor), float(o.base_temperature),
                         float(o.max_m), float(o.scale),
                         mean_logits_ce_when_no_diversity=bool(o.mean_logits_ce_when_no_diversity))
        return LossOutput(loss, {"ride": loss.detach()})


# ---------------------------------------------------------------------------------------------- stage 2


@dataclass
class RIDEEAOptions:
    experts_run: str = ""  # the finished stage-1 RIDE run directory (empty: the job trains stage 1 first)
    stage1: str = ""  # the preset (or YAML) stage 1 trains with, when experts_run is empty
    top_choices: int = 30  # k: the top-k sorted mean logits a router sees
    hidden: int = 16  # width of each router's feature projection
    pos_weight: float = 100.0  # BCE's positive weight ("this expert helps")


# What stage 1 takes from the router job: where the data are, how to run; its recipe is its own preset's.
_SHARED_WITH_STAGE1 = ("data.root", "data.train_split", "data.val_split", "data.test_split", "data.cache",
                       "data.cache_limit_mb", "data.decode", "data.num_workers", "data.val_per_class", "seed", "compat",
                       "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
                       "run.verbose", "run.dashboard", "run.tensorboard", "run.checkpoint_every", "run.num_to_keep",
                       "run.max_failures")


@register_method("ride_ea")
class RIDERouter(Method):
    """RIDE's expert-assignment router, trained on a frozen stage-1 RIDE run (docs/methods.md §2.4)."""

    Options = RIDEEAOptions
    defaults = {"model.num_experts": 3, "model.expert_width": 0.75, "model.classifier": "normed_linear",
                "model.cosine_scale": 30.0}
    path_keys = ("ride_ea.experts_run",)
    sampler = "class_balanced"
    primary_view = "router"

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        if int(cfg.model.num_experts) < 2:
            raise ConfigError(f"the router chooses among experts: model.num_experts must be at least 2, got "
                              f"{cfg.model.num_experts}")
        if cfg.ride_ea.top_choices < 1 or cfg.ride_ea.pos_weight <= 0:
            raise ConfigError("ride_ea: top_choices must be >= 1 and pos_weight > 0")

    # -- stage 1 --------------------------------------------------------------------------------------------
    @classmethod
    def prerequisites(cls, cfg: DictConfig) -> list[DictConfig]:
        """Stage 1, when no finished run is given: ``ride_ea.stage1`` (a RIDE preset) with this job's data and
        resources, under ``<job>/experts``."""
        if cfg.ride_ea.experts_run:
            return []
        if not cfg.ride_ea.stage1:
            raise ConfigError("method=ride_ea needs a stage-1 RIDE run: set ride_ea.experts_run to a finished run "
                              "directory, or ride_ea.stage1 to the RIDE preset to train first")
        from omegaconf import OmegaConf

        from rayexperts.config import load_config

        shared = {k: OmegaConf.select(cfg, k) for k in _SHARED_WITH_STAGE1}
        stage1 = load_config(str(cfg.ride_ea.stage1), {
            **{k: v for k, v in shared.items() if v is not None}, "run.name": "experts",
            "run.storage_path": RunDir.for_config(cfg).uri})
        if stage1.method != "ride":
            raise ConfigError(f"ride_ea.stage1={cfg.ride_ea.stage1!r} trains method={stage1.method}, not ride")
        return [stage1]

    @classmethod
    def after_prerequisites(cls, cfg: DictConfig, run_dirs: list[str]) -> DictConfig:
        return with_overrides(cfg, {"ride_ea.experts_run": run_dirs[0],
                                    "run.storage_path": RunDir.for_config(cfg).uri,
                                    "run.name": "router"}, "ride_ea router")

    @classmethod
    def summary_views(cls) -> tuple[str, ...]:
        return ("router", "ensemble")

    @classmethod
    def logits_view(cls, cfg: DictConfig) -> str:
        return "ensemble"

    # -- model ----------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The stage-1 model (frozen, its weights loaded) with one router per expert after the first."""
        from rayexperts.models.router import ExpertRouter

        experts = self._stage1_model()
        return ExpertRouter(experts, int(self.opts.top_choices), int(self.opts.hidden))

    def _stage1_model(self) -> nn.Module:
        import torch

        from rayexperts.registry import METHODS
        from rayexperts.rundir import identity, load_model_state

        run = str(self.opts.experts_run)
        if not run:
            raise ConfigError("method=ride_ea trains a router on a finished RIDE run: set ride_ea.experts_run, or run "
                              "jobs/train.py with the ride_ea preset, which trains stage 1 first")
        rundir = RunDir(run)
        cfg = rundir.config()
        if cfg is None or cfg.method != "ride":
            raise ConfigError(f"ride_ea.experts_run={run} is not a RIDE run directory (no config.yaml of method ride)")
        for key in ("data.name", "model.backbone", "model.num_experts"):
            from omegaconf import OmegaConf

            if OmegaConf.select(cfg, key) != OmegaConf.select(self.cfg, key):
                raise ConfigError(f"ride_ea.experts_run={run} was trained with {key}={OmegaConf.select(cfg, key)!r}, "
                                  f"this router has {OmegaConf.select(self.cfg, key)!r}")
        method = METHODS.get("ride")(cfg, self.class_counts.cpu(), self.in_channels)
        with torch.random.fork_rng(devices=[]):
            model = method.build_model()
        state = rundir.load_checkpoint(identity(cfg, self.num_classes))
        if state is None:
            raise FileNotFoundError(f"ride_ea.experts_run={run} has no checkpoint: train stage 1 first")
        load_model_state(model, state["model"])
        return model

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(batch.images)

    def loss(self, out: Any, targets: Tensor) -> LossOutput:
        """Mean over the E − 1 routers of BCE(router_i, help_i) (docs/methods.md §2.4)."""
        from rayexperts.losses import router_loss, router_targets

        help_targets = router_targets([z.float() for z in out.expert.logits], targets)
        loss = router_loss(out.router_logits.float(), help_targets, float(self.opts.pos_weight))
        return LossOutput(loss, {"router": loss.detach()})

    # -- inference ------------------------------------------------------------------------------------------
    def model_output(self, out: Any) -> ModelOutput:
        return out.expert

    def views(self) -> dict[str, View]:
        return {"router": lambda out: out.routed_logits, "ensemble": lambda out: mean_logits(out.expert),
                **{f"expert{i}": (lambda i: lambda out: out.expert.logits[i])(i) for i in range(self.num_experts)}}

    def sample_statistics(self, out: Any) -> dict[str, Tensor]:
        """Per sample, the number of experts the router ran (reported per shot group as ``experts_per_sample``)."""
        return {"experts_per_sample": out.experts_used.float()}

