"""The typed sections of a config and its keys: every key is typed (allowed values are ``Literal`` field
types), a method's section is its ``Options`` dataclass (from the method registry), a key that is not in
the schema is an error naming its new name (when it was renamed) or the closest valid keys.

The section classes end in ``Section`` (``RunSection``, ``ScalingSection``, ...), so that none reads like
Ray's ``ray.train.RunConfig``, ``ray.train.ScalingConfig`` or ``ray.tune.TuneConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf

from rayexperts.errors import ConfigError
from rayexperts.registry import BACKBONES, DATASETS, METHODS, did_you_mean


@dataclass
class DataSection:
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
    # data_aug_simclr (SimCLR jitter + grayscale: CBD's code), lift_crop (LIFT's code: random resized crop of
    # image_size + flip for every kind, CIFAR up-sampled; test Resize(image_size * 8 // 7) + CenterCrop), or none.
    augment: Literal["standard", "standard_rotation", "standard_jitter", "randaugment", "randaugment_timm",
                     "autoaugment", "autoaugment_cutout", "data_aug", "data_aug_simclr", "lift_crop",
                     "none"] = "standard"
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
class ModelSection:
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
    # Where K > 1 experts sit on one timm trunk (docs/pretrained.md "Multi-expert methods on one trunk"): head (K
    # classifier heads on the trunk's feature; methods with independent experts build K networks), adapter (K sets
    # of model.finetune=lora|adaptformer adapters in the frozen trunk), blocks (K trained copies of the last
    # model.expert_blocks transformer blocks)
    expert_part: Literal["head", "adapter", "blocks"] = "head"
    expert_blocks: int = 1  # expert_part=blocks: the number of last transformer blocks each expert owns
    sync_bn: Optional[bool] = None  # None: on when num_workers > 1 on GPU
    # channels_last memory format: auto is on (measured faster on CPU and on CUDA for these ResNets)
    channels_last: Literal["auto", "on", "off"] = "auto"


@dataclass
class TrainSection:
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
class EvalSection:
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
    # Test-time crop ensembling (docs/methods.md "LIFT"): extra views <view>_<tta> (mean of the logits over the
    # image's views), beside the plain ones, never the primary view, at the last evaluation: none; flip (the
    # image and its mirror image); fivecrop / tencrop (short side resized to data.image_size + tta_expand, then
    # the 4 corner and centre crops of data.image_size; tencrop adds their mirror images: LIFT's code)
    tta: Literal["none", "flip", "fivecrop", "tencrop"] = "none"
    tta_expand: int = 24  # fivecrop/tencrop: pixels added to data.image_size before the crops (LIFT's expand)


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.0  # 0: an equal share of the cluster's CPUs
    gpus_per_worker: float = 1.0  # with use_gpu; fractions pack several runs on one GPU


@dataclass
class RunSection:
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
class TuneSection:
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
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    tune: TuneSection = field(default_factory=TuneSection)
    layers: list[str] = field(default_factory=list)  # written by load_config: the layers applied, in order
    # written by load_config with compat=official: for each key the authors' code set, where that value comes
    # from (repository@commit:path:lines, and the recipe item's status A / B / P)
    sources: dict[str, str] = field(default_factory=dict)


CORE_SECTIONS = ("data", "model", "train", "eval", "scaling", "run", "tune")
WRITTEN_BY_LOADER = ("layers", "sources")
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
    settable = [k for k in keys if k.split(".")[0] not in WRITTEN_BY_LOADER]
    same_name = [k for k in settable if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    hint = f"; did you mean {', '.join(same_name[:3])}?" if same_name else did_you_mean(key, settable)
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")
