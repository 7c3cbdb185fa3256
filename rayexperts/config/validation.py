"""Value checks a type cannot express, run on every composed config before anything starts (the method
adds its own: ``Method.validate``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rayexperts.errors import ConfigError
from rayexperts.registry import BACKBONES, DATASETS, METHODS


def registry_message(registry, name: str) -> str:
    try:
        registry.get(name)
    except ConfigError as e:
        return str(e)
    return ""


# (key, check, what it must be): value ranges a type cannot express, checked before anything starts
_RANGES = (
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.gamma", lambda v: v > 0, "> 0"),
    ("train.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("train.warmup_start", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.cosine_t_max", lambda v: v >= 0, ">= 0 (0: to the last epoch)"),
    ("train.eta_min", lambda v: v >= 0, ">= 0"),
    ("train.grad_clip", lambda v: v >= 0, ">= 0 (0: off)"),
    ("train.mixup_alpha", lambda v: v >= 0, ">= 0 (0: off)"),
    ("data.crop_scale_min", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.crop_pct", lambda v: 0 <= v <= 1, "in (0, 1] (0: the model's, else 224/256)"),
    ("data.autoaugment_fill", lambda v: 0 <= v <= 255, "in [0, 255]"),
    ("data.test_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.val_per_class", lambda v: v >= 0, ">= 0"),
    ("model.cosine_scale", lambda v: v > 0, "> 0"),
    ("model.expert_width", lambda v: v > 0, "> 0"),
    ("model.lora_rank", lambda v: v >= 1, ">= 1"),
    ("model.lora_alpha", lambda v: v > 0, "> 0"),
    ("model.adapter_width", lambda v: v >= 1, ">= 1"),
    ("model.expert_blocks", lambda v: v >= 1, ">= 1"),
    ("train.backbone_lr_scale", lambda v: v >= 0, ">= 0"),
    ("eval.every", lambda v: v >= 1, ">= 1"),
    ("eval.tta_expand", lambda v: v >= 0, ">= 0"),
    ("run.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("run.num_to_keep", lambda v: v >= 1, ">= 1"),
    ("run.max_failures", lambda v: v >= -1, ">= 0 (or -1: retry forever)"),
    ("scaling.cpus_per_worker", lambda v: v >= 0, ">= 0 (0: an equal share of the cluster's CPUs)"),
    ("scaling.gpus_per_worker", lambda v: v >= 0, ">= 0"),
)


def validate(cfg: DictConfig) -> None:
    """Value checks that the types alone cannot express (the method adds its own)."""
    for registry, value in ((DATASETS, cfg.data.name), (BACKBONES, cfg.model.backbone)):
        if registry is BACKBONES and str(value).startswith("timm/"):
            continue  # any timm model (docs/pretrained.md); an unknown one is refused when the model is built
        if value not in registry:
            raise ConfigError(registry_message(registry, str(value)))
    for key in ["train.epochs", "train.batch_size", "scaling.num_workers", "model.num_experts"]:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")
    for key, ok, what in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"'{key}' must be {what}, got {value}")
    if cfg.data.imbalance_factor < 1:
        raise ConfigError(f"'data.imbalance_factor' must be >= 1, got {cfg.data.imbalance_factor}")
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"'train.batch_size'={cfg.train.batch_size} (global) must be divisible by "
            f"'scaling.num_workers'={cfg.scaling.num_workers}"
        )
    if len(cfg.data.mean) != len(cfg.data.std) or any(v <= 0 for v in cfg.data.std):
        raise ConfigError(f"data.mean={list(cfg.data.mean)} and data.std={list(cfg.data.std)} must be given together, "
                          "one value per channel, std > 0")
    if cfg.model.grad_checkpointing and not str(cfg.model.backbone).startswith("timm/"):
        raise ConfigError(f"model.grad_checkpointing=true needs a timm backbone (model.backbone=timm/<name>), not "
                          f"{cfg.model.backbone}")
    if cfg.model.expert_part != "head" and not str(cfg.model.backbone).startswith("timm/"):
        raise ConfigError(f"model.expert_part={cfg.model.expert_part} needs a timm backbone (model.backbone=timm/<name>), "
                          f"not {cfg.model.backbone} (its experts split by model.shared_stages)")
    if cfg.model.expert_part == "adapter" and cfg.model.finetune not in ("lora", "adaptformer"):
        raise ConfigError(f"model.expert_part=adapter with model.finetune={cfg.model.finetune}: the experts' adapters "
                          "are LoRA or AdaptFormer ones; set model.finetune=lora or model.finetune=adaptformer")
    if cfg.model.head_init != "default" and cfg.model.classifier != "linear":
        raise ConfigError(f"model.head_init={cfg.model.head_init} applies to the linear classifier, not "
                          f"model.classifier={cfg.model.classifier}")
    for name in cfg.eval.test_distributions:
        parse_test_distribution(name)
    if len(set(cfg.eval.test_distributions)) != len(cfg.eval.test_distributions):
        raise ConfigError(f"eval.test_distributions lists a distribution twice: {list(cfg.eval.test_distributions)}")
    check_gpu_share("scaling", bool(cfg.scaling.use_gpu), float(cfg.scaling.gpus_per_worker), int(cfg.scaling.num_workers))
    if not cfg.run.ray:  # in-process training: one worker, no Ray to restart it
        for key, fallback, why in (("scaling.num_workers", 1, "Ray Train"), ("run.max_failures", 0, "Ray's restarts")):
            if OmegaConf.select(cfg, key) != fallback:
                raise ConfigError(f"run.ray=false with {key}={OmegaConf.select(cfg, key)}: that needs Ray ({why}); "
                                  f"set run.ray=true, or {key}={fallback}")
    method = METHODS.get(cfg.method)
    method.check_engine_options(cfg)
    method.validate(cfg)


def check_weights_source(model: DictConfig) -> None:
    """A pretrained model names where its weights come from: ``model.weights=PATH`` or ``model.allow_download=true``
    (docs/pretrained.md). Checked when a run starts (``launch.train.preflight``), not when a config is composed,
    so a preset that fine-tunes pretrained weights still prints with ``--print-config``."""
    if model.pretrained and not model.allow_download and not model.weights:
        hub = "timm's hub" if str(model.backbone).startswith("timm/") else "torchvision"
        raise ConfigError(f"model.pretrained=true: the weights of {model.backbone} come from {hub}, which needs "
                          "model.allow_download=true; or give a local file: model.weights=PATH")


def parse_test_distribution(name: str) -> tuple[str, float]:
    """``forward50`` → (``forward``, 50.0), ``backward10`` → (``backward``, 10.0), ``uniform`` → (``uniform``, 1.0):
    SADE's test-agnostic protocol (docs/methods.md §3.4); a bad name is a ConfigError naming it."""
    import re

    found = re.fullmatch(r"(forward|backward)(\d+(?:\.\d+)?)|uniform", str(name))
    if not found or (found.group(2) and float(found.group(2)) < 1):
        raise ConfigError(f"eval.test_distributions: {name!r} is not forward<IF>, backward<IF> (IF >= 1) or uniform "
                          "(e.g. [forward50, uniform, backward50])")
    return ("uniform", 1.0) if name == "uniform" else (found.group(1), float(found.group(2)))


def check_gpu_share(where: str, use_gpu: bool, gpus: float, workers: int, *, keys: tuple[str, str, str] = (
        "use_gpu", "gpus_per_worker", "num_workers")) -> None:
    """What cannot run on GPUs (GPU finding F1, F14): ``use_gpu`` with no GPU per worker, and several Ray Train
    workers on a fraction of a GPU each (their NCCL ranks would share a device, which NCCL refuses)."""
    use, share, n = (f"{where}.{k}" for k in keys)
    if use_gpu and gpus <= 0:
        raise ConfigError(f"{use}=true with {share}={gpus}: a GPU run needs a GPU share > 0 per worker "
                          f"(or {use}=false)")
    if use_gpu and workers > 1 and gpus < 1:
        raise ConfigError(f"{n}={workers} with {share}={gpus}: several GPU workers of one run cannot share a GPU "
                          f"(NCCL refuses two ranks on one device); use {share}=1 or more, or {n}=1 (a one-worker "
                          "run may take a fraction of a GPU)")
