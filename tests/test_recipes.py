"""Recipes as the authors ran them (docs/methods.md "Recipes behind the published numbers"): ``compat=official``
per preset with its sources, LDAM-DRW's long-tailed subset, the schedules, checkpoint selection."""

from __future__ import annotations

import numpy as np
import pytest

from rayexperts.config import load_config
from rayexperts.data.imbalance import exponential_counts, shuffled_rank_in_class, split_long_tail


def ldam_drw_subset(targets: np.ndarray, img_num_per_cls: list[int]) -> np.ndarray:
    """LDAM-DRW's ``IMBALANCECIFAR10.gen_imbalanced_data`` (kaidic/LDAM-DRW@2536330:imbalance_cifar.py), as
    written there: the global numpy seed 0, then per class in order its indices shuffled, the first n kept."""
    np.random.seed(0)
    selected = []
    classes = np.unique(targets)
    for the_class, the_img_num in zip(classes, img_num_per_cls):
        idx = np.where(targets == the_class)[0]
        np.random.shuffle(idx)
        selected.append(idx[:the_img_num])
    return np.concatenate(selected)


def _ours(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    train, val = split_long_tail(labels, counts, 0, shuffled_rank_in_class(labels, 0))
    assert len(val) == 0
    return train


@pytest.mark.parametrize("num_classes, per_class, factor", [(10, 500, 100), (100, 50, 50), (7, 31, 10)])
def test_ldam_drw_subset_on_generated_labels(num_classes, per_class, factor):
    rng = np.random.default_rng(num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))  # classes interleaved, as CIFAR's files
    counts = exponential_counts(per_class, num_classes, factor)
    theirs = ldam_drw_subset(labels, counts.tolist())
    ours = _ours(labels, counts)
    assert ours.tolist() == np.sort(theirs).tolist()  # the same images, element by element
    assert not np.array_equal(ours, split_long_tail(labels, counts)[0])  # not the first n_i


def test_ldam_drw_subset_on_real_cifar10_labels(cifar10_parquet):
    import pyarrow.parquet as pq

    table = pq.read_table(cifar10_parquet, columns=["split", "label"]).to_pandas()
    labels = table.loc[table["split"] == "train", "label"].to_numpy().astype(np.int64)
    counts = exponential_counts(5000, 10, 100)
    ours = _ours(labels, counts)
    assert len(ours) == 12_406
    assert ours.tolist() == np.sort(ldam_drw_subset(labels, counts.tolist())).tolist()


def test_lt_subset_shuffled_reaches_the_data_set(tmp_path):
    from rayexperts.data import build_dataset

    first = build_dataset(load_config(None, ["data.name=digits-lt"]).data)
    shuffled = build_dataset(load_config(None, ["data.name=digits-lt", "data.lt_subset=shuffled"]).data)
    assert first.train_counts.tolist() == shuffled.train_counts.tolist()
    assert not np.array_equal(first.train.images, shuffled.train.images)


# ------------------------------------------------------------------------------------------------ schedules
# The authors' schedulers, as their code runs them, against StepSchedule over every epoch.
import bisect  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

from rayexperts.engine.schedule import StepSchedule  # noqa: E402


def _optimizer(lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def _per_epoch(cfg, epochs: int) -> list[float]:
    schedule = StepSchedule(cfg.train)
    return [schedule(e, i, 7) for e in range(epochs) for i in (0, 6)][::2]


def ncl_warmup_multistep(epochs: int, lr=0.1, milestones=(320, 360), gamma=0.1, factor=1 / 3, warm=5) -> list[float]:
    """NCL's WarmupMultiStepLR (lib/utils/lr_scheduler.py), stepped before each epoch (last_epoch = e + 1)."""
    out = []
    for e in range(epochs):
        last = e + 1
        w = 1.0
        if last < warm:
            alpha = last / warm
            w = factor * (1 - alpha) + alpha
        out.append(lr * w * gamma ** bisect.bisect_right(list(milestones), last))
    return out


def ldam_adjust_learning_rate(epochs: int, lr=0.1) -> list[float]:
    """LDAM-DRW's adjust_learning_rate (cifar_train.py:366-378), called before each epoch."""
    out = []
    for epoch in range(epochs):
        epoch = epoch + 1
        out.append(lr * epoch / 5 if epoch <= 5 else lr * 0.0001 if epoch > 180 else lr * 0.01 if epoch > 160 else lr)
    return out


def custom_lr(epochs: int, step1=160, step2=180, gamma=0.01, warmup=5, lr=0.1) -> list[float]:
    """RIDE / SADE / BalPoE's CustomLR: torch's LambdaLR stepped after each epoch."""
    def lr_lambda(epoch):
        f = gamma * gamma if epoch >= step2 else gamma if epoch >= step1 else 1
        return f * float(1 + epoch) / warmup if epoch < warmup else f

    opt = _optimizer(lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def cosine_annealing(epochs: int, lr: float, t_max: int, eta_min: float, before: bool) -> list[float]:
    """torch's CosineAnnealingLR stepped before (NCL) or after (SADE, BalPoE) each epoch."""
    opt = _optimizer(lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    out = []
    for _ in range(epochs):
        if before:
            opt.step()
            sched.step()
        out.append(opt.param_groups[0]["lr"])
        if not before:
            opt.step()
            sched.step()
    return out


def bsce_cosine_warmup(epochs: int, warmup_epochs: int, base_lr=0.05, warmup_lr=0.1) -> list[float]:
    """Balanced Softmax's CosineAnnealingLRWarmup (utils.py:26-54), stepped before each epoch (last_epoch = E)."""
    out = []
    for e in range(epochs):
        last = e + 1
        if last < warmup_epochs:
            out.append((warmup_lr - base_lr) / (warmup_epochs - 1) * (last - 1) + base_lr)
        else:
            out.append(0 + (warmup_lr - 0) * (1 + math.cos(math.pi * (last - warmup_epochs)
                                                           / (epochs - warmup_epochs))) / 2)
    return out


def test_ncl_cifar_official_schedule_is_the_codes_epoch_by_epoch():
    cfg = load_config("cifar100_lt_if100_ncl", ["compat=official"])
    ours = _per_epoch(cfg, 400)
    assert ours == pytest.approx(ncl_warmup_multistep(400), rel=1e-12)
    assert ours[0] == pytest.approx(0.1 * (1 / 3 * 0.8 + 0.2)) and ours[319] == pytest.approx(0.01)


def test_ce_official_schedule_is_ldam_drws():
    cfg = load_config("cifar10_lt_if100_ce", ["compat=official"])
    assert _per_epoch(cfg, 200) == pytest.approx(ldam_adjust_learning_rate(200), rel=1e-12)


def test_ncl_imagenet_official_schedule_is_the_codes_cosine():
    cfg = load_config("imagenet_lt_r50_ncl", ["compat=official"])
    assert _per_epoch(cfg, 200) == pytest.approx(cosine_annealing(200, 0.2, 200, 1e-4, before=True), rel=1e-9)


@pytest.mark.parametrize("preset, epochs, warmup", [("cifar100_lt_if100_bsce", 591, 37), ("cifar10_lt_if100_bsce", 520, 32),
                                                    ("cifar100_lt_if50_bsce", 520, 32), ("cifar10_lt_if50_bsce", 465, 29)])
def test_bsce_official_schedule_is_the_codes(preset, epochs, warmup):
    cfg = load_config(preset, ["compat=official"])
    assert cfg.train.epochs == epochs and cfg.train.batch_size == 512
    assert _per_epoch(cfg, epochs) == pytest.approx(bsce_cosine_warmup(epochs, warmup), rel=1e-9, abs=1e-15)


def test_the_default_schedule_is_unchanged_per_iteration():
    cfg = load_config("cifar10_lt_if100_ce")
    schedule = StepSchedule(cfg.train)
    assert schedule(0, 0, 10) == pytest.approx(0.1 * 0.1 / 5)  # t = 0.1 of a 5-epoch warm-up
    assert schedule(159, 8, 10) == pytest.approx(0.1) and schedule(159, 9, 10) == pytest.approx(0.01)  # t = 160
    cos = StepSchedule(load_config(None, ["train.epochs=10", "train.lr=0.2", "train.warmup_epochs=0"]).train)
    assert cos(4, 9, 10) == pytest.approx(0.1)  # t = 5 of 10: half way down the cosine


def test_start_clock_and_eta_min_match_torchs_cosine_stepped_after_each_epoch():
    cfg = load_config(None, ["train.epochs=180", "train.lr=0.025", "train.schedule=cosine", "train.lr_step=epoch",
                             "train.lr_epoch_clock=start", "train.eta_min=0.001"])
    assert _per_epoch(cfg, 180) == pytest.approx(cosine_annealing(180, 0.025, 180, 0.001, before=False), rel=1e-9)


def test_customlr_is_the_end_clock_with_1_indexed_milestones():
    cfg = load_config(None, ["train.epochs=200", "train.lr=0.1", "train.schedule=multistep", "train.milestones=[161, 181]",
                             "train.gamma=0.01", "train.warmup_epochs=5", "train.lr_step=epoch"])
    assert _per_epoch(cfg, 200) == pytest.approx(custom_lr(200), rel=1e-12)


# ------------------------------------------------------------------------------------------------ compat=official
from pathlib import Path  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from rayexperts.config import ConfigError, list_presets  # noqa: E402
from rayexperts.recipes import markdown  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The code's column of docs/methods.md "Recipes behind the published numbers", transcribed item by item
# (status A, B and P), per setting; every preset of the setting must resolve to it under compat=official.
NCL_CIFAR = {"data.augment": "autoaugment_cutout", "data.autoaugment_fill": 128, "data.cutout_fill": "black",
             "eval.selection": "best_test", "train.nesterov": True, "train.lr_step": "epoch", "train.warmup_epochs": 5,
             "train.warmup_start": pytest.approx(1 / 3), "train.milestones": [320, 360], "data.key_augment": "moco_blur",
             "ncl.moco.key_init": "random", "seed": 42, "ncl.hard_count": "official", "ncl.hard_mode": "mask"}
NCL_IMAGENET = {"train.batch_size": 256, "train.lr": 0.2, "data.augment": "randaugment_timm", "eval.selection": "best_test",
                "train.epochs": 200, "ncl.contrastive": False, "train.nesterov": True, "train.lr_step": "epoch",
                "train.schedule": "cosine", "train.cosine_t_max": 200, "train.eta_min": 1e-4, "train.warmup_epochs": 0,
                "model.cosine_scale": 16.0, "model.cosine_bias": True}
NCL_PLACES = {"eval.selection": "best_val", "eval.every": 1, "ncl.hard_ratio": 0.335, "ncl.hard_count": "official",
              "train.nesterov": True, "train.lr_step": "epoch", "train.lr_epoch_clock": "end",
              "train.warmup_start": pytest.approx(1 / 3), "model.cosine_bias": True, "data.key_augment": "moco_blur",
              "ncl.moco.key_init": "random", "data.drop_last": True}
CE_LDAM_DRW = {"train.weight_decay": 2e-4, "train.lr_step": "epoch", "train.lr_epoch_clock": "end",
               "train.warmup_epochs": 5, "train.milestones": [161, 181], "train.gamma": 0.01,
               "eval.selection": "best_test", "data.lt_subset": "shuffled", "data.lt_subset_seed": 0,
               "model.head_init": "kaiming_normal"}
BSCE = {"train.batch_size": 512, "train.schedule": "cosine", "train.lr": 0.1, "train.warmup_start": 0.5,
        "train.lr_step": "epoch", "data.augment": "autoaugment_cutout", "data.autoaugment_fill": 128,
        "data.cutout_fill": "black", "eval.selection": "best_test", "data.lt_subset": "shuffled"}
CBD_IMAGENET = {"cbd.data_aug_augment": "data_aug_simclr", "train.batch_size": 128, "train.lr": 0.05,
                "data.crop_scale_min": 0.05, "data.normalize": "unit", "model.zero_init_residual": True,
                "cbd.projection": "mlp", "model.cosine_scale": 20.0, "eval.selection": "last"}
EXPECTED = {
    **{p: NCL_CIFAR for p in ("cifar100_lt_if100_ncl", "cifar10_lt_if100_ncl", "cifar100_lt_if50_ncl",
                              "cifar10_lt_if50_ncl")},
    **{p: NCL_IMAGENET for p in ("imagenet_lt_r50_ncl", "imagenet_lt_rx50_ncl")},
    "places_lt_r152_ncl": NCL_PLACES,
    **{p: CE_LDAM_DRW for p in ("cifar100_lt_if100_ce", "cifar10_lt_if100_ce", "cifar100_lt_if50_ce", "cifar10_lt_if50_ce")},
    "cifar100_lt_if100_bsce": {**BSCE, "train.epochs": 591}, "cifar10_lt_if100_bsce": {**BSCE, "train.epochs": 520},
    "cifar100_lt_if50_bsce": {**BSCE, "train.epochs": 520}, "cifar10_lt_if50_bsce": {**BSCE, "train.epochs": 465},
    "cbd_imagenet_lt_r50": CBD_IMAGENET,
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_compat_official_resolves_every_recipe_item_with_its_source(preset):
    cfg = load_config(preset, ["compat=official"])
    sources = dict(cfg.sources)
    for key, value in EXPECTED[preset].items():
        assert OmegaConf.select(cfg, key) == value, key
        assert "@" in sources[key] or "google-research/google-research" in sources[key], key
    assert cfg.compat == "official" and not load_config(preset).sources
    assert any(layer.startswith("compat official (preset") for layer in cfg.layers)


def test_official_layer_comes_after_the_preset_and_before_the_command_line():
    cfg = load_config("cifar100_lt_if100_ncl", ["compat=official", "train.milestones=[300, 350]", "seed=3"])
    assert list(cfg.train.milestones) == [300, 350] and cfg.seed == 3
    sources = dict(cfg.sources)
    assert "train.milestones" not in sources and "seed" not in sources  # a value from the command line
    assert cfg.data.augment == "autoaugment_cutout" and "data.augment" in sources
    assert cfg.layers.index("compat official (preset cifar100_lt_if100_ncl)") < len(cfg.layers) - 1
    paper = load_config("cifar100_lt_if100_ncl")
    assert (paper.data.augment, paper.train.nesterov, paper.seed) == ("randaugment", False, 0)


def test_sources_travel_with_the_config_and_an_override_drops_its_source(tmp_path):
    from rayexperts.config import from_dict, to_dict, with_overrides
    from rayexperts.rundir import RunDir

    cfg = load_config("cifar10_lt_if100_ce", ["compat=official"])
    again = from_dict(to_dict(cfg))
    assert dict(again.sources) == dict(cfg.sources) and "kaidic/LDAM-DRW" in again.sources["train.weight_decay"]
    RunDir(str(tmp_path / "r")).write_config(cfg)
    assert "sources:" in (tmp_path / "r" / "config.yaml").read_text()
    assert dict(RunDir(str(tmp_path / "r")).config().sources) == dict(cfg.sources)
    changed = dict(with_overrides(cfg, {"train.weight_decay": 1e-4}).sources)
    assert "train.weight_decay" not in changed and "train.gamma" in changed
    with pytest.raises(ConfigError, match="written by the config loader"):
        load_config(None, ["sources={train.lr: mine}"])


def test_a_bad_official_block_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ce\nofficial:\n  train.lr: 0.2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*official.train.lr must be"):
        load_config(str(bad), ["compat=official"])
    load_config(str(bad))  # compat=paper never reads the block


def test_docs_recipes_table_is_generated_from_the_presets():
    assert (REPO / "docs" / "recipes.md").read_text() == markdown(), "run: python -m rayexperts.recipes > docs/recipes.md"


def test_every_official_block_resolves_and_names_sources():
    for preset in list_presets():
        cfg = load_config(preset, ["compat=official"])
        assert all(cfg.sources.values())
