"""The config system: typed defaults, presets, dotted overrides, clear errors."""

from __future__ import annotations

import pytest

from rayexperts.registry import METHODS
from rayexperts.config import ConfigError, flatten, from_dict, list_presets, load_config, to_dict, valid_keys


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["method=ncl", "train.lr=0.2", "model.num_experts=4", "ncl.hard_ratio=0.25"])
    assert cfg.train.lr == 0.2 and isinstance(cfg.train.lr, float)
    assert cfg.model.num_experts == 4
    assert cfg.ncl.hard_ratio == 0.25


def test_interface_keys_exist():
    keys = set(valid_keys())
    for key in [
        "method", "data.name", "data.root", "data.imbalance_factor", "model.backbone", "model.num_experts",
        "train.epochs", "train.batch_size", "train.lr", "seed", "scaling.num_workers", "scaling.use_gpu",
        "run.storage_path", "run.name", "run.checkpoint_every", "tune.num_samples", "tune.scheduler",
        "tune.metric",
    ]:
        assert key in keys, key


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*train\.lr"):
        load_config(None, ["train.lrr=0.1"])


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="tune.scheduler"):
        load_config(None, ["tune.scheduler=hyperband"])
    with pytest.raises(ConfigError, match="imbalance_factor"):
        load_config(None, ["data.imbalance_factor=0.5"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["train.batch_size=65", "scaling.num_workers=2"])


def test_data_defaults_apply_without_preset():
    cfg = load_config(None, ["method=mllt", "data.name=cifar100-lt"])
    assert cfg.model.backbone == "resnet32" and cfg.train.epochs == 200
    assert cfg.model.num_experts == 3 and cfg.model.classifier == "cosine"  # method defaults
    cfg = load_config(None, ["method=ce", "data.name=digits-lt"])
    assert cfg.model.backbone == "digitsnet" and cfg.data.image_size == 8


def test_user_layers_beat_defaults():
    cfg = load_config("cifar10_lt_if100_mllt", ["model.num_experts=2", "train.epochs=15"])
    assert cfg.method == "mllt" and cfg.data.imbalance_factor == 100
    assert cfg.model.num_experts == 2 and cfg.train.epochs == 15
    assert cfg.train.milestones == [160, 180]


DATA_OF = {"cifar10_lt": "cifar10-lt", "cifar100_lt": "cifar100-lt", "imagenet_lt": "imagenet-lt",
           "inat2018": "inat2018", "digits": "digits-lt", "places_lt": "places-lt"}
CLIP_B16 = "timm/vit_base_patch16_clip_quickgelu_224.openai"  # LIFT's CLIP ViT-B/16 (docs/methods.md "LIFT")
BACKBONE_OF = {"r50": "resnet50", "rx50": "resnext50_32x4d", "r152": "resnet152", "clip_b16": CLIP_B16}
# The paper settings of docs/methods.md for CIFAR-LT: (epochs, batch size, lr, schedule, experts).
CIFAR_RECIPE = {"ce": (200, 128, 0.1, "multistep", 1), "bsce": (200, 128, 0.1, "multistep", 1),
                "mllt": (200, 128, 0.1, "multistep", 3), "ncl": (400, 64, 0.1, "multistep", 3),
                "ecl": (200, 64, 0.01, "cosine", 3), "cbd": (200, 128, 0.1, "multistep", 1),
                "ldam_drw": (200, 128, 0.1, "multistep", 1), "ride": (200, 128, 0.1, "multistep", 3),
                "ride_ea": (5, 512, 0.01, "cosine", 3), "sade": (200, 128, 0.1, "multistep", 3),
                "balpoe": (200, 128, 0.1, "multistep", 3), "balpoe_long": (400, 128, 0.1, "multistep", 3)}


def test_every_preset_is_the_setting_its_name_says():
    """``<data>_if<N>_<method>``, ``<data>_<r50|rx50>_<method>``, ``cbd_<data...>``: the name's data set,
    imbalance factor, backbone and method are the config's, and CIFAR-LT presets follow docs/methods.md's recipe."""
    names = list_presets()
    methods = sorted(METHODS.builtin_names(), key=len, reverse=True)
    seen = set()
    for name in names:
        cfg = load_config(name)
        seen.add(cfg.method)
        if name.startswith("cbd_"):
            method, rest, variant = "cbd", name[4:], "cbd"
        else:
            base = name.removesuffix("_long")
            method = next(m for m in methods if base.endswith("_" + m))
            rest, variant = base[: -len(method) - 1], method + name[len(base):]
        data = next(d for d in DATA_OF if rest == d or rest.startswith(d + "_"))
        tail = rest[len(data) + 1:]
        assert (cfg.method, cfg.data.name) == (method, DATA_OF[data]), name
        if tail.startswith("if"):
            assert cfg.data.imbalance_factor == float(tail[2:]), name
        elif tail:
            assert cfg.model.backbone == BACKBONE_OF[tail], name
        if data.startswith("cifar"):
            t = cfg.train
            assert cfg.model.backbone == (CLIP_B16 if method == "lift" else "resnet32"), name
            if variant in CIFAR_RECIPE:  # the methods docs/methods.md gives a CIFAR-LT recipe for
                assert (t.epochs, t.batch_size, t.lr, t.schedule, cfg.model.num_experts) == CIFAR_RECIPE[variant], name
    assert seen == set(methods)  # every built-in method has a preset, every preset a built-in method


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr.*bad\.yaml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="no preset"):
        load_config("cifar10_lt_if100_mlt")


def test_round_trip_and_flatten():
    cfg = load_config(None, ["method=mllt"])
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(cfg)
    assert flat["model.num_experts"] == 3 and flat["mllt.teacher"] == "ensemble"
    cbd = load_config("cbd_digits")
    assert to_dict(from_dict(to_dict(cbd))) == to_dict(cbd)
    assert isinstance(flatten(cbd)["cbd.teachers"], list)  # a list of specs is one value


def test_local_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    """Tune runs each trial in its own directory, so a relative path must be resolved where it was typed."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("a.jpg 0\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [
        "data.root=data/x.parquet", "run.storage_path=runs", "data.train_split=lists/train.txt",
        "data.test_split=ImageNet_LT_test.txt", "method=cbd", "cbd.teacher_runs=[runs/t0,s3://bucket/t1]",
    ])
    assert cfg.data.root == str(tmp_path / "data" / "x.parquet")
    assert cfg.run.storage_path == str(tmp_path / "runs")
    assert cfg.data.train_split == str(tmp_path / "lists" / "train.txt")  # exists here: resolved here
    assert cfg.data.test_split == "ImageNet_LT_test.txt"  # does not: left to be found under data.root
    assert list(cfg.cbd.teacher_runs) == [str(tmp_path / "runs" / "t0"), "s3://bucket/t1"]
    remote = load_config(None, ["run.storage_path=s3://bucket/runs"])
    assert remote.run.storage_path == "s3://bucket/runs"


def test_the_config_package_imports_nothing_of_ray():
    """``rayexperts.config`` imports no Ray module: not on import, nor composing a preset with compat=official,
    explaining one (``--print-config``) or naming an unknown key (every method's renames); the Ray job's storage
    check lives in ``rayexperts.launch.ray_job``. pyproject.toml's contract checks the imports it can see."""
    import subprocess
    import sys

    code = ("import sys; import rayexperts.config as c\n"
            "c.load_config('cifar10_lt_if100_ncl', ['compat=official']); c.explain('digits_ncl', ['train.epochs=2'])\n"
            "try: c.load_config(None, ['train.lrr=1'])\nexcept c.ConfigError as e: print(e)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    error, modules = done.stdout.splitlines()
    assert error.startswith("unknown config key 'train.lrr' in command line (train.lrr); did you mean train.lr")
    assert modules == "[]"
