"""One config system for train, cbd_ens and tune.

Typed defaults (the dataclasses below) → data-set defaults (``presets/defaults/data/<name>.yaml``)
→ method defaults (``presets/defaults/method/<method>.yaml``) → a preset or YAML file
(``--config``) → ``key=value`` dotted overrides. Every key is typed and checked: an unknown
key is an error naming the key and the closest valid ones.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


@dataclass
class DataConfig:
    name: str = "digits-lt"
    root: Optional[str] = None
    download: bool = False
    # Long-tail profile applied to the training split: exp | step | none (split files give counts).
    imbalance_type: str = "exp"
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
    # Augmentation: standard | randaugment | autoaugment_cutout | data_aug | none.
    augment: str = "standard"
    # Key view of the MoCo branch (NCL/ECL): moco | same.
    key_augment: str = "moco"
    image_size: int = 32
    num_workers: int = 0  # DataLoader processes per Ray worker
    # Sampler: auto (the method's choice) | instance | class_balanced | sqrt.
    sampler: str = "auto"
    many_threshold: int = 100  # many-shot: more than this many training images
    few_threshold: int = 20  # few-shot: fewer than this many
    test_batch_size: int = 128  # on CPU, 512 evaluated ResNet-8 3x slower than 128 (cache-bound)
    seed: int = 0  # fixes the digits-lt held-out split


@dataclass
class ModelConfig:
    backbone: str = "digitsnet"
    num_experts: int = 1
    expert_width: float = 0.75  # shared-trunk experts: filters of the expert stages × this
    shared_stages: int = 2  # shared trunk = stem + this many stages (MLLT: 2)
    classifier: str = "linear"  # linear | cosine
    cosine_scale: float = 16.0
    weights: Optional[str] = None  # local file of backbone weights
    allow_download: bool = False  # let torchvision fetch ImageNet weights at run time
    sync_bn: Optional[bool] = None  # None: on when num_workers > 1 on GPU
    channels_last: bool = True  # CUDA only
    moco_dim: int = 64
    moco_hidden: int = 0  # 0: the feature dimension
    moco_queue: int = 1024
    moco_momentum: float = 0.999
    moco_temperature: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # global: split evenly over scaling.num_workers
    lr: float = 0.1  # for the global batch; no automatic rescaling
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    grad_clip: float = 0.0  # 0: off


@dataclass
class LossConfig:
    tau: float = 1.0  # balanced softmax / BC loss: z + tau*log(n_j/n)
    mllt_teacher: str = "ensemble"  # ensemble | individual
    hard_ratio: float = 0.3  # NCL beta = C_hard / C
    hard_anchor: str = "fixed"  # fixed | random
    anchor_expert: int = 0
    hard_mode: str = "restrict"  # restrict (paper) | mask (official code)
    ncl_lambda: float = 0.6
    nil_hard: bool = True
    self_sup: bool = True
    bod_all: bool = True
    bod_hard: bool = True
    ecl_alpha: float = 0.6
    ecl_beta: float = 1.0
    kd_tau: float = 1.0
    bkt: bool = True
    fld: bool = True
    cpt: bool = True
    cbd_alpha: float = 0.4
    cbd_beta: float = 100.0


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (and always at the last)
    ece_bins: int = 15
    tta_flip: bool = False


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.0  # 0: an equal share of the cluster's CPUs
    gpus_per_worker: float = 1.0  # with use_gpu; fractions pack several runs on one GPU


@dataclass
class RunConfig:
    storage_path: str = "./runs"
    name: str = ""  # empty: <method>-<data>-<timestamp>
    checkpoint_every: int = 1
    num_to_keep: int = 2
    max_failures: int = 0
    verbose: bool = True  # one progress line per epoch
    ray_log_level: str = "WARNING"  # Ray Train's own logs (INFO shows every report)


@dataclass
class TuneConfig:
    num_samples: int = 8
    scheduler: str = "asha"  # asha | fifo
    metric: str = "val_top1"
    mode: str = "max"
    view: str = ""  # empty: the method's primary view
    max_concurrent: int = 0  # 0: as many as resources allow
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 2  # ASHA: keep 1/reduction_factor of the trials at each rung
    val_per_class: int = 20  # data.val_per_class a sweep sets when it is 0 (tuning never reads the test split)


@dataclass
class TeacherSpec:
    type: str = "standard"  # standard | data_aug
    seed: int = 0
    method: str = "ce_cosine"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys for this teacher only


@dataclass
class CbdConfig:
    teacher_cpus: float = 1.0
    teacher_gpus: float = 0.0
    teacher_workers: int = 1
    teacher_epochs: int = 0  # 0: train.epochs
    student_backbone: str = ""  # empty: model.backbone
    # The student's frozen teachers: run directories (paths or URIs); jobs/cbd_ens.py fills it in.
    teacher_runs: list[str] = field(default_factory=list)


def _default_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec("standard", 0),
        TeacherSpec("standard", 1),
        TeacherSpec("data_aug", 2),
        TeacherSpec("data_aug", 3),
    ]


@dataclass
class Config:
    method: str = "ce"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    cbd: CbdConfig = field(default_factory=CbdConfig)
    teachers: list[TeacherSpec] = field(default_factory=_default_teachers)


# ---------------------------------------------------------------------------- keys


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the schema (``data.name``, ``train.lr``, ...)."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for k in node.keys():
        v = node._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(v, DictConfig) and v._metadata.object_type not in (None, dict):
            keys.extend(valid_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            full = f"{prefix}{k}"
            if isinstance(v, dict) and full not in ("teachers",) and not full.endswith("overrides"):
                out.update(_flatten(v, full + "."))
            else:
                out[full] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "model.num_experts=3"]`` → ``{"train.lr": 0.1, ...}`` (YAML-typed values)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        value = OmegaConf.create({"v": raw})["v"] if raw == "" else _yaml_value(raw)
        out[key] = value
    return out


def _yaml_value(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------------------- loading


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (``cifar10_lt_if100_ncl``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = PRESET_DIR / f"{p.stem if p.suffix else name_or_path}.yaml"
    if shipped.exists():
        return shipped
    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file '{name_or_path}' does not exist")
    names = list_presets()
    close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(names)}"
    raise ConfigError(f"no preset or YAML file named '{name_or_path}'{hint}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from e
    except Exception as e:  # yaml parse errors
        raise ConfigError(f"cannot read config file '{path}': {e}") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base:
        inherited = _read_yaml(preset_path(str(base)))
        return _deep_merge(inherited, loaded)
    return loaded


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge_layer(cfg: DictConfig, layer: dict[str, Any], source: str) -> DictConfig:
    for key in _flatten(layer):
        if key.split(".")[0] == "teachers":
            continue
        if key not in _VALID:
            raise _unknown_key_error(key, source)
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {e.msg}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: invalid value for '{key}': {msg}") from e


_VALID = set(valid_keys())


def default_layers(method: str, data_name: str) -> list[tuple[str, dict[str, Any]]]:
    """The data-set and method default layers, in merge order."""
    layers = []
    for kind, name in (("data", data_name), ("method", method)):
        path = PRESET_DIR / "defaults" / kind / f"{name}.yaml"
        if path.exists():
            layers.append((str(path), _read_yaml(path)))
    return layers


def load_config(
    config: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> DictConfig:
    """Resolve the full config: schema → data/method defaults → preset/YAML → overrides."""
    user_layers: list[tuple[str, dict[str, Any]]] = []
    if config:
        path = preset_path(str(config))
        user_layers.append((str(path), _read_yaml(path)))
    if overrides:
        flat = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        for key in flat:
            if key not in _VALID and key != "teachers":
                raise _unknown_key_error(key, "command-line overrides")
        user_layers.append(("command-line overrides", _nest(dict(flat))))

    probe: DictConfig = OmegaConf.structured(Config)
    for source, layer in user_layers:
        probe = _merge_layer(probe, layer, source)
    cfg: DictConfig = OmegaConf.structured(Config)
    for source, layer in default_layers(probe.method, probe.data.name) + user_layers:
        cfg = _merge_layer(cfg, layer, source)
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return absolute_paths(cfg)


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
    user typed it. This covers ``data.root``, ``run.storage_path``, ``cbd.teacher_runs`` and the
    split files (``data.*_split``) that exist relative to the working directory; a split file
    that does not is left as given, to be looked up under ``data.root``. URIs stay unchanged.
    """
    if cfg.data.root:
        cfg.data.root = absolute_path_or_uri(str(cfg.data.root))
    for key in ("train_split", "val_split", "test_split"):
        value = cfg.data[key]
        if value and not is_uri(str(value)) and Path(str(value)).expanduser().is_file():
            cfg.data[key] = absolute_path_or_uri(str(value))
    cfg.run.storage_path = absolute_path_or_uri(str(cfg.run.storage_path))
    cfg.cbd.teacher_runs = [absolute_path_or_uri(str(r)) for r in cfg.cbd.teacher_runs]
    return cfg


def validate(cfg: DictConfig) -> None:
    """Value checks that the types alone cannot express."""
    from rayexperts.methods import method_names  # lazy: the registry imports torch

    if cfg.method not in method_names():
        close = difflib.get_close_matches(cfg.method, method_names(), n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {cfg.method!r} (key 'method'): choose one of {', '.join(method_names())}{hint}")
    choices = {
        "data.imbalance_type": ("exp", "step", "none"),
        "data.augment": ("standard", "randaugment", "autoaugment_cutout", "data_aug", "none"),
        "data.key_augment": ("moco", "same"),
        "data.sampler": ("auto", "instance", "class_balanced", "sqrt"),
        "model.classifier": ("linear", "cosine"),
        "train.schedule": ("cosine", "multistep", "constant"),
        "loss.mllt_teacher": ("ensemble", "individual"),
        "loss.hard_anchor": ("fixed", "random"),
        "loss.hard_mode": ("restrict", "mask"),
        "tune.scheduler": ("asha", "fifo"),
        "tune.mode": ("max", "min"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"invalid value {value!r} for '{key}': choose one of {', '.join(allowed)}")
    positive = ["train.epochs", "train.batch_size", "scaling.num_workers", "model.num_experts"]
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")
    if cfg.data.imbalance_factor < 1:
        raise ConfigError(f"'data.imbalance_factor' must be >= 1, got {cfg.data.imbalance_factor}")
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"'train.batch_size'={cfg.train.batch_size} (global) must be divisible by "
            f"'scaling.num_workers'={cfg.scaling.num_workers}"
        )
    if not 0 <= cfg.loss.hard_ratio <= 1:
        raise ConfigError(f"'loss.hard_ratio' must lie in [0, 1], got {cfg.loss.hard_ratio}")
    for i, t in enumerate(cfg.teachers):
        if t.type not in ("standard", "data_aug"):
            raise ConfigError(f"teachers[{i}].type={t.type!r}: choose standard or data_aug")
        for key in t.overrides:
            if key not in _VALID:
                raise _unknown_key_error(key, f"teachers[{i}].overrides")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(d: dict[str, Any]) -> DictConfig:
    """Rebuild a typed config from a resolved dict (e.g. the worker's copy, or config.yaml)."""
    cfg = _merge_layer(OmegaConf.structured(Config), d, "config dict")
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Dotted-key view of a config, e.g. for DataFrame columns."""
    d = to_dict(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    return _flatten(d)


def with_overrides(cfg: DictConfig, flat: dict[str, Any], source: str = "overrides") -> DictConfig:
    """A copy of ``cfg`` with dotted ``flat`` overrides applied and checked."""
    out = _merge_layer(cfg, _nest(dict(flat)), source)
    validate(out)
    return out
