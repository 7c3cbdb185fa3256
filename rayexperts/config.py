"""One config system for train, cbd_ens and tune.

A config is resolved in layers, each recorded in the resolved config's ``layers`` list:

1. the typed defaults of the core sections below (``defaults``),
2. the data set's defaults (registered with the data set: backbone, transforms, schedule),
3. the method's defaults (registered with the method: K, classifier, sampler, ...) and the
   method's own section ``<method>.*`` (its ``Options`` dataclass),
4. ``--config PRESET_OR_YAML`` (``base: other`` first),
5. ``compat=official``: "this preset as the authors' released code ran it": the values the method
   declares (its ``official`` map) and each preset file's ``official:`` block (its base's first), every
   value with its source; the resolved config's ``sources`` map names the source of each value they set,
6. ``key=value`` dotted overrides.

Every key is typed (allowed values are ``Literal`` field types) and checked: an unknown key is
an error naming the key and the closest valid ones, a key that was renamed names its new name.
The core knows no method by name: a method's section, defaults and renames come from the
method registry (:mod:`rayexperts.registry`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rayexperts.errors import ConfigError
from rayexperts.registry import BACKBONES, DATASETS, METHODS, did_you_mean, load_plugins

PRESET_DIR = Path(__file__).parent / "presets"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by the Ray job supervisor for a submitted job's driver

__all__ = [
    "Config", "ConfigError", "Layer", "OfficialValue", "PRESET_DIR", "absolute_path_or_uri", "compose", "default_layers", "flatten",
    "from_dict", "is_uri", "list_presets", "load_config", "method_official", "official_values", "config_layers", "explain", "provenance", "parse_overrides", "preset_path", "settings", "to_dict", "to_yaml",
    "valid_keys", "check_gpu_share", "with_overrides", "NOT_RESULT_KEYS", "is_result_key", "result_settings",
]

Layer = tuple[str, Mapping[str, Any]]  # (where it comes from, nested or dotted keys)


@dataclass
class DataConfig:
    name: str = DATASETS.default  # a registered data set (rayexperts.registry.DATASETS)
    root: Optional[str] = None
    download: bool = False
    # Long-tail profile applied to the training split (split files give their own counts: none).
    imbalance_type: Literal["exp", "step", "none"] = "exp"
    imbalance_factor: float = 10.0
    step_fraction: float = 0.5  # step profile: fraction of classes that become minority classes
    # Balanced validation split: CIFAR takes it from training images the LT subset leaves unused.
    val_per_class: int = 0
    # Split files (`relative/path label` per line) for imagenet-lt, places-lt, inat2018.
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    test_split: Optional[str] = None
    # Column names of the `parquet` data set (and CIFAR given as Parquet).
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    # The training view: standard (CIFAR: pad-4 crop + flip; ImageNet: random resized crop + flip), and on top of
    # it standard_rotation (+ RandomRotation(15): RIDE, SADE, BalPoE on CIFAR), standard_jitter (+ ColorJitter
    # 0.4: RIDE, SADE, BalPoE on ImageNet), randaugment, randaugment_timm (jitter + timm's rand-n2-m10-mstd0.5),
    # autoaugment (CIFAR10 policy), autoaugment_cutout (+ Cutout 16), data_aug (jitter + noise: CBD's text),
    # data_aug_simclr (SimCLR jitter + grayscale: CBD's code), or none.
    augment: Literal["standard", "standard_rotation", "standard_jitter", "randaugment", "randaugment_timm",
                     "autoaugment", "autoaugment_cutout", "data_aug", "data_aug_simclr", "none"] = "standard"
    # The second (contrastive) view, for methods that ask for one: MoCo v2's (moco), with a PIL Gaussian blur
    # on CIFAR too (moco_blur, NCL's code), or the training view again (same).
    key_augment: Literal["moco", "moco_blur", "same"] = "moco"
    autoaugment_fill: int = 0  # AutoAugment / RandAugment: fill outside a geometric op (NCL's, BSCE's code: 128)
    # Cutout: zero on the normalised image (mean, DeVries & Taylor) or 0 on the [0, 1] image (black, PaCo's code)
    cutout_fill: Literal["mean", "black"] = "mean"
    crop_scale_min: float = 0.08  # RandomResizedCrop: the smallest area kept (CBD's code: Inception crop 0.05)
    normalize: Literal["mean_std", "unit"] = "mean_std"  # (x/255 - mean)/std, or x/255 only (CBD's code)
    # the normalisation's mean and std, one per channel; empty: a timm backbone's own (its pretrained config,
    # when its channels match the images'), else the data set's (docs/pretrained.md "Preprocessing")
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # ImageNet-like test view: resize to image_size / crop_pct with this interpolation, centre-crop image_size;
    # 0 / auto: a timm backbone's own (its pretrained config), else 224/256 and bilinear
    crop_pct: float = 0.0
    interpolation: Literal["auto", "bilinear", "bicubic"] = "auto"
    # The CIFAR long-tailed subset: the first n_i images of each class (first), or LDAM-DRW's code (shuffled:
    # np.random.seed(lt_subset_seed), then each class's indices shuffled in class order, the first n_i kept).
    lt_subset: Literal["first", "shuffled"] = "first"
    lt_subset_seed: int = 0
    image_size: int = 32
    # Where the decoded images live: device (one uint8 tensor on the training device, batches augmented
    # there), host (in memory, each batch copied to the device), off (a per-image DataLoader), or auto
    # (device when all images have one size and fit in cache_limit_mb decoded, else off).
    cache: Literal["auto", "device", "host", "off"] = "auto"
    cache_limit_mb: float = 4096.0
    # Without a cache, who decodes image files: the DataLoader workers (PIL, per image), or the training
    # device a batch at a time (torchvision.io.decode_jpeg; nvJPEG on CUDA); auto: device on CUDA.
    decode: Literal["auto", "workers", "device"] = "auto"
    num_workers: int = 0  # DataLoader processes per Ray worker (data.cache=off)
    sampler: Literal["auto", "instance", "class_balanced", "sqrt"] = "auto"  # auto: the method's choice
    many_threshold: int = 100  # many-shot: more than this many training images
    few_threshold: int = 20  # few-shot: fewer than this many
    test_batch_size: int = 128  # on CPU, 512 evaluated ResNet-8 3x slower than 128 (cache-bound)
    # The epoch's last, partial training batch: dropped (true: floor(N/B) steps), or trained on (false: ceil(N/B)
    # steps, as loaders with PyTorch's default do; the workers split it, each loss weighted by its share, and a
    # worker with no image of it steps on an empty batch). docs/configs.md "The last partial batch".
    drop_last: bool = True
    seed: int = 0  # fixes the digits-lt held-out split


@dataclass
class ModelConfig:
    backbone: str = BACKBONES.default  # a registered backbone (rayexperts.registry.BACKBONES)
    num_experts: int = 1
    # Shortcut where a CIFAR-family block changes shape: A, parameter-free (stride-2 subsample, zero-padded
    # channels; LDAM-DRW, RIDE, NCL), or B, a 1x1 conv + BN (torchvision's ResNets have B only).
    shortcut: Literal["A", "B"] = "A"
    expert_width: float = 0.75  # shared-trunk experts: filters of the expert stages × this
    # Shared trunk = stem + this many stages, for methods that share one (MLLT): RIDE's layout shares
    # stage 1 of a CIFAR ResNet (experts: stages 2-3) and stages 1-2 of an ImageNet ResNet.
    shared_stages: int = 1
    # linear; cosine (z = scale * cos); normed_linear: cosine with LDAM-DRW's / RIDE's NormedLinear init, no bias
    classifier: Literal["linear", "cosine", "normed_linear"] = "linear"
    cosine_scale: float = 16.0
    cosine_bias: bool = False  # a trainable bias (init 0) on the cosine classifier (NCL's ImageNet-LT code)
    zero_init_residual: bool = False  # the last BN of every residual block starts at gamma = 0 (CBD's code)
    # linear classifier weights: PyTorch's nn.Linear default (U(±1/sqrt(d))) or kaiming_normal_ (LDAM-DRW's
    # _weights_init, std sqrt(2/d)); the bias keeps PyTorch's default either way
    head_init: Literal["default", "kaiming_normal"] = "default"
    weights: Optional[str] = None  # local file of backbone weights: .safetensors, .pth/.pt/.bin (docs/pretrained.md)
    weights_strict: bool = True  # model.weights must fit the backbone exactly (false: missing/unexpected keys reported)
    allow_download: bool = False  # let torchvision fetch ImageNet weights (timm: with model.pretrained) at run time
    pretrained: bool = False  # timm/<name>: its pretrained weights from timm's hub (needs model.allow_download=true)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # timm/<name>: timm.create_model kwargs (img_size, ...)
    # Fine-tuning of the backbone (docs/pretrained.md "Fine-tuning modes"): full, linear (frozen backbone), bias
    # (BitFit), lora (on the nn.Linear layers named by lora_targets), adaptformer (a parallel MLP adapter per block)
    finetune: Literal["full", "linear", "bias", "lora", "adaptformer"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # timm ViT attention's qkv and proj
    adapter_width: int = 64
    adapter_scale: float = 0.1
    grad_checkpointing: bool = False  # timm/<name>: recompute activations in the backward pass (less memory)
    sync_bn: Optional[bool] = None  # None: on when num_workers > 1 on GPU
    # channels_last memory format: auto is on (measured faster on CPU and on CUDA for these ResNets)
    channels_last: Literal["auto", "on", "off"] = "auto"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # global: split evenly over scaling.num_workers
    lr: float = 0.1  # for the global batch; no automatic rescaling
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: torch's AdamW (betas 0.9, 0.999) with train.weight_decay
    backbone_lr_scale: float = 1.0  # the lr of the pretrained backbone's parameters: train.lr × this
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    # When the lr changes: every iteration (iteration i of epoch e trains with the schedule at t = e + (i+1)/steps),
    # or once per epoch (epoch e, 0-indexed, trains with the schedule at t = e + 1, lr_epoch_clock=end, or at
    # t = e, start): the authors' per-epoch schedulers. At t: warm-up (t < W) lr*(s + (1-s)*t/W) with
    # s = warmup_start; multistep lr*gamma^#(t >= m); cosine eta_min + (lr - eta_min)*(1 + cos(pi*min(t - W, T)/T))/2
    # with T = cosine_t_max (0: epochs - W). docs/configs.md "Schedules"; --print-config shows a preset's.
    lr_step: Literal["iteration", "epoch"] = "iteration"
    lr_epoch_clock: Literal["end", "start"] = "end"
    warmup_start: float = 0.0
    cosine_t_max: float = 0.0
    eta_min: float = 0.0
    # Mixup (the engine's): lambda ~ Beta(alpha, alpha) per batch, the loss against both target sets; 0 = off.
    mixup_alpha: float = 0.0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    # CUDA: cudnn.benchmark picks the fastest kernels for the static shapes (off); deterministic kernels instead
    # (on), for bit-stable GPU runs and exact resume on a GPU (on the CPU a run is deterministic either way)
    deterministic: bool = False
    grad_clip: float = 0.0  # 0: off
    # torch.compile of the model for training: auto is on for CUDA, off on CPU (its warm-up does not pay
    # there); compile_mode auto: CUDA graphs (reduce-overhead) on CUDA unless the model updates buffers in
    # its forward pass (MoCo queues), else torch.compile's default.
    compile: Literal["auto", "on", "off"] = "auto"
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune"] = "auto"


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (and always at the last)
    ece_bins: int = 15
    tta_flip: bool = False
    # The checkpoint the recipe's published number reports: last, best_test (the best epoch on the test set,
    # what NCL's, LDAM-DRW's and Balanced Softmax's code print) or best_val. Reports show it beside last.
    selection: Literal["last", "best_test", "best_val"] = "last"
    # SADE's test-agnostic protocol: long-tailed test sets carved from the test split, each evaluated beside it
    # with its own columns (forward50_top1, ...): forward<IF> (class 0 the head, as in training), backward<IF>, uniform.
    test_distributions: list[str] = field(default_factory=list)
    # A method's test-time steps (transductive views that learn on the unlabelled test images, SADE's
    # tta_aggregate): at the last evaluation (last), at every evaluation (every), or never (off).
    test_time: Literal["last", "every", "off"] = "last"


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.0  # 0: an equal share of the cluster's CPUs
    gpus_per_worker: float = 1.0  # with use_gpu; fractions pack several runs on one GPU


@dataclass
class RunConfig:
    storage_path: str = "./runs"
    name: str = ""  # empty: <method>-<data>-<8-hex hash of the keys that can change the result>; a sweep: its time
    checkpoint_every: int = 1
    num_to_keep: int = 2
    max_failures: int = 0
    # A run directory with checkpoints resumes only with the schedule it was trained with (train.epochs, lr,
    # milestones, ...); true: train on with a new one (e.g. more epochs), recorded in the new config.yaml.
    allow_extend: bool = False
    verbose: bool = True  # one progress line per epoch
    ray_log_level: str = "WARNING"  # Ray Train's own logs (INFO shows every report)
    # Ray's dashboard (and state API) on the local instance a job starts; a cluster keeps its own. auto: on
    # when the job runs Ray Train (several workers: it frees a killed run's CPUs through the state API),
    # else off, about 1.5 s less start-up on 2 cores.
    dashboard: Literal["auto", "on", "off"] = "auto"
    tensorboard: bool = True  # event files in <run dir>/tensorboard/ (tensorboard --logdir runs/)
    # false: a one-worker run trains in this process, with the code a run's Ray actor runs (same loop, checkpoints,
    # run directory, resume, results), and nothing imports Ray: a machine without Ray, or pdb. Several workers,
    # run.max_failures, CBD's teachers in parallel, sweeps and reproduce need Ray and are refused.
    ray: bool = True
    mlflow_tracking_uri: str = ""  # e.g. file:///shared/mlruns or http://host:5000: log config and metrics there
    mlflow_experiment: str = "rayexperts"
    # modules (importable on the path) that register methods, data sets or backbones, imported before the config
    # is resolved, in the driver and every worker; installed packages add theirs through the entry-point group
    # rayexperts.plugins (docs/development.md "Plugins")
    plugins: list[str] = field(default_factory=list)


@dataclass
class TuneConfig:
    num_samples: int = 8
    # random: Tune's sampling (an all-discrete space never repeats a point); grid: every point of an all-discrete
    # space once; optuna: Optuna's TPE (pip install 'rayexperts[optuna]'), seeded with seed
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    seeds_per_config: int = 1  # each configuration trained with this many seeds (seed, seed+1, ...); tuned on the mean
    perturbation_interval: int = 2  # PBT: epochs between exploit/explore steps (each key of the space perturbed)
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    view: str = ""  # empty: the method's primary view
    max_concurrent: int = 0  # 0: as many as resources allow
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 2  # ASHA: keep 1/reduction_factor of the trials at each rung
    val_per_class: int = 20  # data.val_per_class a sweep sets when it is 0 (tuning never reads the test split)


@dataclass
class Config:
    method: str = METHODS.default  # a registered method; its options are the section named after it
    seed: int = 0
    # official: every setting where the authors' code differs from the paper's text takes the code's form
    # (docs/methods.md "Checked against the official code"); the method declares which keys that switches.
    compat: Literal["paper", "official"] = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    layers: list[str] = field(default_factory=list)  # written by load_config: the layers applied, in order
    # written by load_config with compat=official: for each key the authors' code set, where that value comes
    # from (repository@commit:path:lines, and the recipe item's status A / B / P)
    sources: dict[str, str] = field(default_factory=dict)


CORE_SECTIONS = ("data", "model", "train", "eval", "scaling", "run", "tune")
_WRITTEN_BY_LOADER = ("layers", "sources")
# The keys that cannot change a run's numbers (docs/configs.md "Keys that change a result"): where it runs and
# writes (run.*, data.root, the CPU / GPU share of a worker), how a sweep searches (tune.*), what the loader
# records. Every other key can change a result. One list for paper_table's refusal to average runs, reproduce's
# run names, the default run.name and resume's checks. A prefix ending in "." covers its whole section.
NOT_RESULT_KEYS = ("run.", "tune.", "layers", "sources", "data.root", "data.download", "model.allow_download",
                   "scaling.cpus_per_worker", "scaling.gpus_per_worker")


def is_result_key(key: str) -> bool:
    """Whether config key ``key`` (dotted) can change a run's numbers (:data:`NOT_RESULT_KEYS`)."""
    return not any(key.startswith(k) if k.endswith(".") else key == k or key.startswith(k + ".")
                   for k in NOT_RESULT_KEYS)


def result_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys of ``cfg`` (a config or a flat or nested mapping) that can change a result, sorted."""
    flat = flatten(cfg)
    return {k: flat[k] for k in sorted(flat) if is_result_key(k)}


# ---------------------------------------------------------------------------- schema and keys


def schema(method: str) -> DictConfig:
    """The typed defaults of the core sections plus ``method``'s section (its ``Options``)."""
    options = METHODS.get(method).Options
    if method in CORE_SECTIONS or method in ("method", "seed", "layers"):
        raise ConfigError(f"method name {method!r} collides with a core config key")
    cfg: DictConfig = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, False)
    cfg[method] = OmegaConf.structured(options)
    OmegaConf.set_struct(cfg, True)
    return cfg


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config or schema (``data.name``, ``<method>.<option>``, ...);
    default: the core keys and the default method's."""
    node = schema(Config.method) if node is None else node
    keys = []
    for k in node.keys():
        v = node._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(v, DictConfig) and v._metadata.object_type not in (None, dict):
            keys.extend(valid_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def renamed_keys() -> dict[str, list[str]]:
    """Removed key → its new name(s), from every method's ``renamed`` map (``loss.<old>`` →
    ``<method>.<new>``)."""
    out: dict[str, list[str]] = {}
    for name, method in METHODS.load_all().items():
        for old, new in getattr(method, "renamed", {}).items():
            out.setdefault(old, []).append(new if new.split(".")[0] in CORE_SECTIONS else f"{name}.{new}")
    return out


def unknown_key_error(key: str, source: str, keys: Sequence[str], method: str) -> ConfigError:
    """An unknown key: its new name when it was renamed, else the closest valid keys."""
    renamed = renamed_keys().get(key)
    if renamed:
        own = [r for r in renamed if r.startswith(f"{method}.")]
        if own:
            return ConfigError(f"config key '{key}' in {source} was renamed: use '{own[0]}'")
        return ConfigError(
            f"config key '{key}' in {source} was renamed to {' / '.join(repr(r) for r in renamed)}, a key of "
            f"another method than method={method!r}"
        )
    section = key.split(".")[0]
    if section != method and section in METHODS:
        return ConfigError(f"config key '{key}' in {source} belongs to method {section}'s section; "
                           f"this config has method={method!r} (set method={section} to use it)")
    settable = [k for k in keys if k.split(".")[0] not in _WRITTEN_BY_LOADER]
    same_name = [k for k in settable if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    hint = f"; did you mean {', '.join(same_name[:3])}?" if same_name else did_you_mean(key, settable)
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping; lists (e.g. a list of teacher specs) are values, not sections."""
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            full = f"{prefix}{k}"
            if isinstance(v, Mapping):  # a section (an empty one sets nothing)
                out.update(_flatten(v, full + "."))
            else:
                out[full] = v
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' sets a field inside '{p}', which is a value, not a section")
        node[parts[-1]] = dict(value) if isinstance(value, Mapping) else value
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "model.num_experts=3"]`` → ``{"train.lr": 0.1, ...}`` (YAML-typed values)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------- files


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (``cifar10_lt_if100_ncl``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    shipped = PRESET_DIR / f"{p.stem if p.suffix else name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file '{name_or_path}' does not exist")
    if not PRESET_DIR.is_dir():
        raise ConfigError(
            f"preset '{name_or_path}': the presets folder {PRESET_DIR} is missing, so this rayexperts is incomplete "
            "(an upload that excluded it?)"
        )
    names = list_presets()
    hint = did_you_mean(name_or_path, names, cutoff=0.4) or f"; `rayexperts presets` lists the {len(names)} presets"
    raise ConfigError(f"no preset or YAML file named '{name_or_path}'{hint}")


def _layer_name(path: Path) -> str:
    """How a file layer is recorded: shipped presets by name (the same on every machine), other files by path."""
    try:
        path.resolve().relative_to(PRESET_DIR.resolve())
        return f"preset {path.stem}"
    except ValueError:
        return f"file {path.resolve()}"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML or interpolation errors
        raise ConfigError(f"cannot read config file '{path}': {e}") from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
    for written in _WRITTEN_BY_LOADER:  # a resolved config.yaml's records of its own layers, not settings
        loaded.pop(written, None)
    return loaded


def file_layers(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[Layer]:
    """The layers of a preset or YAML file: its ``base:`` chain first, then the file itself (without its
    ``official:`` block, which :func:`official_layers` reads)."""
    return [(source, settings) for source, settings, _ in _chain(name_or_path, _seen)]


def _chain(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(layer name, settings, official block) of a file and its ``base:`` chain, base first."""
    path = preset_path(str(name_or_path))
    source = _layer_name(path)
    if source in _seen:
        raise ConfigError(f"config file '{path}': 'base:' chain loops back to {source}")
    loaded = _read_file(path)
    base = loaded.pop("base", None)
    official = loaded.pop("official", None) or {}
    if not isinstance(official, dict):
        raise ConfigError(f"config file '{path}': 'official:' must map dotted keys to {{value, source, status}}")
    inherited = _chain(str(base), (*_seen, source)) if base else []
    return [*inherited, (source, loaded, official)]


@dataclass(frozen=True)
class OfficialValue:
    """One recipe item of ``compat=official``: the value the authors' released code uses and where it is."""

    value: Any
    source: str  # repository@commit:path:lines, as docs/methods.md "Recipes behind the published numbers" gives it
    status: str = ""  # A (moves accuracy beyond seed noise), B (small), P (the code differs from the paper's text)
    item: str = ""  # the recipe item, as docs/methods.md's table names it

    def describe(self) -> str:
        return self.source + (f" ({self.status})" if self.status else "")


def _official_block(block: Mapping[str, Any], where: str) -> dict[str, OfficialValue]:
    out = {}
    for key, entry in block.items():
        if not isinstance(entry, Mapping) or "value" not in entry or not entry.get("source"):
            raise ConfigError(f"{where}: official.{key} must be {{value: ..., source: ..., status: A|B|P}}")
        extra = set(entry) - {"value", "source", "status", "item"}
        if extra:
            raise ConfigError(f"{where}: official.{key} has unknown field(s) {', '.join(sorted(extra))}")
        if entry.get("status", "") not in ("", "A", "B", "P"):
            raise ConfigError(f"{where}: official.{key}.status must be A, B or P, got {entry['status']!r}")
        out[str(key)] = OfficialValue(entry["value"], str(entry["source"]), str(entry.get("status", "")),
                                      str(entry.get("item", "")))
    return out


def method_official(method: str) -> dict[str, OfficialValue]:
    """What ``compat=official`` switches for ``method`` wherever it runs (its ``official`` map:
    key → (value, source))."""
    found = getattr(METHODS.get(method), "official", {}) or {}
    return {k: v if isinstance(v, OfficialValue) else OfficialValue(*v) for k, v in found.items()}


def official_values(name_or_path: str | None, method: str) -> list[tuple[str, dict[str, OfficialValue]]]:
    """The ``compat=official`` layers, in merge order: the method's, then each file of the preset's chain."""
    out = [(f"compat official ({method})", method_official(method))]
    if name_or_path:
        for source, _, block in _chain(str(name_or_path)):
            if block:
                out.append((f"compat official ({source})", _official_block(block, source)))
    return out


# ---------------------------------------------------------------------------- composing


def _setting(layers: Sequence[Layer], key: str, default: Any) -> tuple[Any, str]:
    """The last value ``layers`` give ``key`` and the layer that gave it."""
    value, where = default, "the defaults"
    for source, layer in layers:
        flat = _flatten(layer)
        if key in flat:
            value, where = flat[key], source
    return value, where


def method_layers(method: str, compat: str = "paper") -> list[Layer]:
    """The method's defaults layer, and with ``compat=official`` the authors'-code values it declares."""
    m = METHODS.get(method)
    layers: list[Layer] = [(f"method {method} defaults", dict(getattr(m, "defaults", {})))]
    if compat == "official":
        values = {k: v.value for k, v in method_official(method).items()}
        layers.append((f"compat official ({method})", {"compat": "official", **values}))
    return layers


def default_layers(method: str, data_name: str) -> list[Layer]:
    """The data set's and the method's default layers, in merge order."""
    data_set = DATASETS.get(data_name)
    return [(f"data set {data_name} defaults", dict(getattr(data_set, "defaults", {}))), *method_layers(method)]


def _yaml_switches(cfg: DictConfig, flat: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``on``/``off`` (and ``yes``/``no``) as booleans: for a choice that offers ``on``/``off``
    (``data.cache=off``, ``train.compile=on``), a boolean means that choice."""
    out = dict(flat)
    for key, value in flat.items():
        if isinstance(value, bool):
            node = OmegaConf.select(cfg, key.rsplit(".", 1)[0]) if "." in key else cfg
            choices = getattr(getattr(node, "_get_node", lambda _: None)(key.rsplit(".", 1)[-1]), "_metadata", None)
            allowed = getattr(getattr(choices, "ref_type", None), "__args__", ())
            word = "on" if value else "off"
            if word in allowed:
                out[key] = word
    return out


_FREE_DICTS = ("model.timm_kwargs.",)  # dict keys whose entries are any names (timm.create_model's kwargs)


def _merge(cfg: DictConfig, layer: Mapping[str, Any], source: str, keys: set[str], method: str) -> DictConfig:
    flat = _flatten(layer)
    for key in flat:
        if key.split(".")[0] in _WRITTEN_BY_LOADER:
            raise ConfigError(f"'{key}' in {source}: it is written by the config loader, not set")
        if key not in keys and not key.startswith(_FREE_DICTS):
            raise unknown_key_error(key, source, sorted(keys), method)
    flat = _yaml_switches(cfg, flat)
    if "model" in cfg and "timm_kwargs" in cfg.model:
        OmegaConf.set_struct(cfg.model.timm_kwargs, False)  # its entries are timm's, not this schema's
    try:
        return OmegaConf.merge(cfg, _nest(flat))  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {e.msg}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: invalid value for '{key}': {msg}") from e


def compose(layers: Sequence[Layer], *, resolve_paths: bool = True) -> DictConfig:
    """Merge ``layers`` (in order) onto the schema of the method they name; validate; record them."""
    method, where = _setting(layers, "method", Config.method)
    if str(method) not in METHODS:
        raise ConfigError(f"{where}: " + _registry_message(METHODS, str(method)))
    cfg = schema(str(method))
    keys = set(valid_keys(cfg))
    for source, layer in layers:
        cfg = _merge(cfg, layer, source, keys, str(method))
    validate(cfg)
    if resolve_paths:
        absolute_paths(cfg)
    cfg.layers = [source for source, _ in layers]
    return cfg


def _registry_message(registry, name: str) -> str:
    try:
        registry.get(name)
    except ConfigError as e:
        return str(e)
    return ""


def _plugin_modules(value: Any, where: str) -> list[str]:
    """``run.plugins`` as module names; anything else is a :class:`ConfigError` naming where it was set."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, ListConfig)) or not all(isinstance(m, str) and m for m in value):
        raise ConfigError(f"run.plugins={value!r} ({where}) must be a list of module names, e.g. "
                          "run.plugins=[my_package.methods]")
    return [str(m) for m in value]


def config_layers(
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> tuple[list[Layer], list[tuple[str, dict[str, OfficialValue]]]]:
    """The layers :func:`load_config` merges, in order, and the ``compat=official`` values among them."""
    user: list[Layer] = file_layers(str(config)) if config else []
    command: list[Layer] = []
    if overrides:
        flat = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
        if flat:
            command.append((f"command line ({', '.join(flat)})", _nest(flat)))
    load_plugins(_plugin_modules(*_setting([*user, *command], "run.plugins", [])))
    method, where = _setting([*user, *command], "method", Config.method)
    data_name, data_where = _setting([*user, *command], "data.name", DataConfig.name)
    compat, _ = _setting([*user, *command], "compat", Config.compat)
    if compat not in ("paper", "official"):
        raise ConfigError(f"invalid value {compat!r} for 'compat': choose paper or official")
    for registry, value, at in ((METHODS, method, where), (DATASETS, data_name, data_where)):
        if str(value) not in registry:
            raise ConfigError(f"{at}: " + _registry_message(registry, str(value)))
    storage, storage_where = _setting([*user, *command], "run.storage_path", RunConfig.storage_path)
    if in_ray_job() and not is_uri(str(storage)) and not os.path.isabs(os.path.expanduser(str(storage))):
        raise ConfigError(
            f"run.storage_path={storage!r} ({storage_where}) is a relative path, and this is a Ray job: it would "
            "resolve inside the job's temporary working directory, which Ray deletes with the session. Give "
            "run.storage_path an absolute path on storage every node sees, or a URI (run.storage_path=/shared/runs, "
            "run.storage_path=s3://bucket/runs)"
        )
    official = official_values(str(config) if config else None, str(method)) if compat == "official" else []
    compat_layers: list[Layer] = [(name, {"compat": "official", **{k: v.value for k, v in values.items()}})
                                  for name, values in official]
    return [("defaults", {}), *default_layers(str(method), str(data_name)), *user, *compat_layers, *command], official


def load_config(
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> DictConfig:
    """Resolve the full config: defaults → data set → method → preset/YAML (→ ``compat=official``: the
    method's and the preset's official recipe) → command-line overrides."""
    layers, official = config_layers(config, overrides)
    cfg = compose(layers)
    cfg.sources = _official_sources(layers, official)
    return cfg


def provenance(layers: Sequence[Layer]) -> dict[str, str]:
    """Each dotted key's layer: the last of ``layers`` that sets it (keys no layer sets: ``defaults``)."""
    last: dict[str, str] = {}
    for name, layer in layers:
        for key in _flatten(layer):
            last[key] = name
    return last


def explain(config: str | os.PathLike | None = None,
            overrides: Sequence[str] | Mapping[str, Any] | None = None) -> str:
    """The resolved config as YAML, every value with the layer that set it (``--print-config``): the typed
    defaults, the data set's or the method's defaults, a preset, ``compat=official`` (with the source of the
    authors' code) or the command line."""
    layers, official = config_layers(config, overrides)
    cfg = compose(layers)
    where = provenance(layers)
    sources = _official_sources(layers, official)
    lines = []
    for key, value in flatten(settings(cfg)).items():
        note = where.get(key, "defaults")
        if key in sources:
            note += f"; {sources[key]}"
        import yaml

        shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"{key}: {shown}  # {note}")
    return "\n".join(lines)


def _official_sources(layers: Sequence[Layer], official: list[tuple[str, dict[str, OfficialValue]]]) -> dict[str, str]:
    """For every key whose final value an official layer set (no later layer changed it): its source."""
    last = provenance(layers)
    return {key: value.describe() for name, values in official for key, value in values.items() if last.get(key) == name}


# ---------------------------------------------------------------------------- values


def in_ray_job() -> bool:
    """True in the driver of a job submitted with ``ray job submit``."""
    return RAY_JOB_ENV in os.environ


def is_uri(value: str) -> bool:
    """``s3://...``, ``gs://...``: storage that is not a local path."""
    return "://" in value


def absolute_path_or_uri(value: str) -> str:
    """A local path made absolute (``~`` expanded) against the working directory; a URI unchanged."""
    return value if is_uri(value) else os.path.abspath(os.path.expanduser(value))


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Local paths made absolute against the driver's working directory.

    Ray workers and Tune trials do not share the driver's working directory (Tune runs each
    trial in its own), so a relative ``data.root=../data/x.parquet`` must be resolved where the
    user typed it. This covers ``data.root``, ``run.storage_path``, the method's path keys
    (``path_keys``, e.g. teacher run directories) and the split files (``data.*_split``) that exist
    relative to the working directory; a split file that does not is left as given, to be looked
    up under ``data.root``. URIs stay unchanged.
    """
    if cfg.data.root:
        cfg.data.root = absolute_path_or_uri(str(cfg.data.root))
    for key in ("train_split", "val_split", "test_split"):
        value = cfg.data[key]
        if value and not is_uri(str(value)) and Path(str(value)).expanduser().is_file():
            cfg.data[key] = absolute_path_or_uri(str(value))
    cfg.run.storage_path = absolute_path_or_uri(str(cfg.run.storage_path))
    if cfg.model.weights:  # read by the Ray workers, whose working directory is not the user's
        cfg.model.weights = absolute_path_or_uri(str(cfg.model.weights))
    for key in getattr(METHODS.get(cfg.method), "path_keys", ()):
        value = OmegaConf.select(cfg, key)
        new = [absolute_path_or_uri(str(v)) for v in value] if isinstance(value, ListConfig) else (
            absolute_path_or_uri(str(value)) if value else value)
        OmegaConf.update(cfg, key, new, merge=False)
    return cfg


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
    ("train.backbone_lr_scale", lambda v: v >= 0, ">= 0"),
    ("eval.every", lambda v: v >= 1, ">= 1"),
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
            raise ConfigError(_registry_message(registry, str(value)))
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
    if cfg.model.pretrained and not cfg.model.allow_download and not cfg.model.weights:
        hub = "timm's hub" if str(cfg.model.backbone).startswith("timm/") else "torchvision"
        raise ConfigError(f"model.pretrained=true: the weights of {cfg.model.backbone} come from {hub}, which needs "
                          "model.allow_download=true; or give a local file: model.weights=PATH")
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


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(d: Mapping[str, Any], source: str = "config dict") -> DictConfig:
    """Rebuild a typed config from a resolved dict (the worker's copy, or a config.yaml)."""
    d = dict(d)
    load_plugins(_plugin_modules((d.get("run") or {}).get("plugins") or [], source))
    layers = list(d.pop("layers", None) or [])
    sources = dict(d.pop("sources", None) or {})
    cfg = compose([(source, d)], resolve_paths=False)
    cfg.layers, cfg.sources = layers, sources
    return cfg


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without what the loader writes about it (``layers``, ``sources``): the settings."""
    return {k: v for k, v in to_dict(cfg).items() if k not in _WRITTEN_BY_LOADER}


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted-key view of a config, e.g. for DataFrame columns."""
    d = to_dict(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    return _flatten(d)


def with_overrides(cfg: DictConfig, flat: Mapping[str, Any], source: str = "overrides") -> DictConfig:
    """A copy of ``cfg`` with dotted ``flat`` overrides applied, checked and recorded in ``layers``.
    The method cannot change here (its section would): compose a new config for that."""
    if "method" in flat and flat["method"] != cfg.method:
        raise ConfigError(f"{source}: with_overrides cannot change the method ({cfg.method} → {flat['method']})")
    out = _merge(cfg, _nest(dict(flat)), source, set(valid_keys(cfg)), str(cfg.method))
    validate(out)
    out.layers = [*cfg.layers, source]
    out.sources = {k: v for k, v in cfg.sources.items() if k not in flat}  # an overridden value has a new source
    return out
