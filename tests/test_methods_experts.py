"""LDAM-DRW, RIDE (and its router), SADE and BalPoE as methods (docs/methods.md §1-4): the loss each method takes
from its config equals the loss function on the same numbers, the epoch hooks switch at the code's epochs,
the models have the layouts the papers' code builds, and the views are what the code reports."""

from __future__ import annotations

import math

import pytest
import torch

from rayexperts import losses as L
from rayexperts.config import ConfigError, load_config
from rayexperts.methods import METHODS
from rayexperts.models import ModelOutput
from rayexperts.models.summary import parameter_table

COUNTS = torch.tensor([500.0, 200, 90, 40, 15, 6, 3, 2, 2, 1])


def method(preset_or_none, *overrides: str, counts: torch.Tensor = COUNTS):
    cfg = load_config(preset_or_none, list(overrides))
    return METHODS.get(cfg.method)(cfg, counts, 3), cfg


def fake_output(k: int = 3, b: int = 6, c: int = 10, seed: int = 0, scale: float = 30.0) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    cos = [torch.rand(b, c, generator=g) * 2 - 1 for _ in range(k)]
    return ModelOutput([torch.randn(b, 4, generator=g) for _ in range(k)], [z * scale for z in cos])


Y = torch.tensor([0, 1, 4, 7, 9, 2])


# ------------------------------------------------------------------------------------------------ LDAM-DRW
def test_ldam_drw_switches_the_drw_weights_on_at_the_codes_epoch():
    m, _ = method("cifar10_lt_if100_ldam_drw")
    out = fake_output(k=1, scale=1.0)  # the model gives bare cosines: the loss scales
    for epoch, weighted in ((0, False), (159, False), (160, True), (199, True)):
        m.on_epoch(epoch)
        weight = L.drw_weights(COUNTS) if weighted else None
        expected = L.ldam_loss(out.logits[0], Y, COUNTS, 0.5, 30.0, weight)
        torch.testing.assert_close(m.loss(out, Y).total, expected)
    # by hand for one sample: s·(cos − m_y) at the target, CE, weighted mean
    m.on_epoch(0)
    z = out.logits[0][:1]
    margin = 0.5 * (COUNTS[0] ** -0.25) / (COUNTS.min() ** -0.25)
    shifted = z.clone()
    shifted[0, 0] -= margin
    by_hand = -torch.log_softmax(30 * shifted, 1)[0, 0]
    torch.testing.assert_close(m.loss(ModelOutput(out.features, [z]), Y[:1]).total, by_hand)
    assert m.views()["expert0"](out).sub(30 * out.logits[0]).abs().max() == 0  # the view is s·cos


def test_ldam_drw_refuses_a_scale_inside_the_model():
    with pytest.raises(ConfigError, match="model.cosine_scale=1"):
        load_config("cifar10_lt_if100_ldam_drw", ["model.cosine_scale=30"])


# ------------------------------------------------------------------------------------------------ RIDE
def test_ride_reweights_strictly_after_the_reweight_epoch_1_indexed():
    m, cfg = method("cifar100_lt_if100_ride", counts=COUNTS)
    out = fake_output()
    for epoch0, on in ((158, False), (159, False), (160, True)):  # 1-indexed 159, 160, 161: on when > 160
        m.on_epoch(epoch0)
        expected = L.ride_loss(out.logits, Y, COUNTS, on, -0.45, 0.05, 1.0, 0.5, 30.0)
        torch.testing.assert_close(m.loss(out, Y).total, expected)
    assert m.reweighted


def test_ride_loss_is_the_sum_over_experts_by_hand_without_diversity():
    m, _ = method("cifar100_lt_if100_ride", "ride.diversity_factor=0.0")
    out = fake_output()
    m.on_epoch(0)
    margins = 0.5 * COUNTS ** -0.25 / COUNTS.min() ** -0.25
    by_hand = sum(torch.nn.functional.cross_entropy(z - 30 * margins * torch.nn.functional.one_hot(Y, 10), Y)
                  for z in out.logits)
    torch.testing.assert_close(m.loss(out, Y).total, by_hand)
    quirk, _ = method("cifar100_lt_if100_ride", "ride.diversity_factor=0.0", "compat=official")
    zbar = torch.stack(out.logits).mean(0)
    quirk_by_hand = 3 * torch.nn.functional.cross_entropy(zbar - 30 * margins * torch.nn.functional.one_hot(Y, 10), Y)
    torch.testing.assert_close(quirk.loss(out, Y).total, quirk_by_hand)


def test_ride_cifar100_model_has_rides_layout_and_parameter_count():
    from rayexperts.models.__main__ import build

    model, _ = build(load_config("cifar100_lt_if100_ride"))
    parts = parameter_table(model).set_index("part")["trainable"].to_dict()
    stem_and_stage1 = (3 * 16 * 9 + 32) + 5 * 2 * (16 * 16 * 9 + 32)
    stage2 = (16 * 24 * 9 + 48) + (24 * 24 * 9 + 48) + 4 * 2 * (24 * 24 * 9 + 48)  # 0.75 × 32 = 24 channels
    stage3 = (24 * 48 * 9 + 96) + (48 * 48 * 9 + 96) + 4 * 2 * (48 * 48 * 9 + 96)  # 0.75 × 64 = 48 channels
    assert parts == {"trunk": stem_and_stage1, **{f"expert{k}": stage2 + stage3 for k in range(3)},
                     **{f"head{k}": 100 * 48 for k in range(3)}}
    assert sum(parts.values()) == 783_856  # RIDE CIFAR-100 ResNet-32, 3 experts: the sum of the layout above
    head = model.heads[0]
    assert head.scale == 30.0 and head.bias is None


def test_balpoe_experts_are_full_width():
    from rayexperts.models.__main__ import build

    model, _ = build(load_config("cifar100_lt_if100_balpoe"))
    assert [s[0].conv1.out_channels for s in model.experts[0]] == [32, 64] and model.feature_dim == 64


# ------------------------------------------------------------------------------------------------ SADE
def test_sade_loss_and_views():
    m, _ = method("cifar100_lt_if100_sade")
    out = fake_output()
    torch.testing.assert_close(m.loss(out, Y).total, L.sade_loss(out.logits, Y, COUNTS, 2.0))
    pi = COUNTS / COUNTS.sum()
    by_hand = (torch.nn.functional.cross_entropy(out.logits[0], Y)
               + torch.nn.functional.cross_entropy(out.logits[1] + torch.log(pi + 1e-9), Y)
               + torch.nn.functional.cross_entropy(out.logits[2] + torch.log(pi + 1e-9)
                                                   - 2 * torch.log(L.inverse_prior(pi) + 1e-9), Y))
    torch.testing.assert_close(m.loss(out, Y).total, by_hand)
    assert set(m.view_names()) == {"expert0", "expert1", "expert2", "ensemble"}
    assert set(m.test_time_steps()) == {"tta_aggregate"}
    with pytest.raises(ConfigError, match="exactly three experts"):
        load_config("cifar100_lt_if100_sade", ["model.num_experts=4"])


def test_sade_aggregation_step_is_the_codes_sgd():
    """One step of the engine's test-time step equals docs/methods.md §3.7 vector 5 (lr 0.1, Nesterov, wd 5e-4)."""
    m, _ = method("cifar100_lt_if100_sade")
    step = m.test_time_steps()["tta_aggregate"]
    z1 = [torch.tensor([[6.0, 3, -3], [1.5, 9, 0]]), torch.tensor([[4.5, 4.5, 1.5], [0, 6, 3]]),
          torch.tensor([[3.0, 0, 6], [3, 3, 3]])]
    z2 = [torch.tensor([[5, 3.5, -2], [2, 8, 1.0]]), torch.tensor([[4, 5, 1.0], [0.5, 5, 3.5]]),
          torch.tensor([[2, 1, 7.0], [2, 3, 4]])]
    step.start(torch.device("cpu"))
    loss = step.step(z1, z2)
    assert float(loss) == pytest.approx(-0.954900, abs=1e-6)
    torch.testing.assert_close(step.raw.detach(), torch.tensor([0.339119, 0.329032, 0.331754]), atol=1e-6, rtol=0)
    assert not step.done()
    view = step.view()
    a = torch.softmax(step.raw.detach(), 0)
    torch.testing.assert_close(view(ModelOutput([], z1)), sum(a[k] * z1[k] for k in range(3)))


# ------------------------------------------------------------------------------------------------ BalPoE
def test_balpoe_loss_mixup_and_prior_view():
    m, cfg = method("cifar100_lt_if100_balpoe")
    assert cfg.train.mixup_alpha == 0.4 and cfg.eval.selection == "last"
    out = fake_output()
    torch.testing.assert_close(m.loss(out, Y).total, L.balpoe_loss(out.logits, Y, COUNTS, (0.0, 1.0, 2.0)))
    lp = torch.log(COUNTS / COUNTS.sum() + 1e-9)
    by_hand = sum(torch.nn.functional.cross_entropy(z + t * lp, Y) for z, t in zip(out.logits, (0, 1, 2))) / 3
    torch.testing.assert_close(m.loss(out, Y).total, by_hand)
    torch.testing.assert_close(m.views()["ensemble"](out), torch.stack(out.logits).mean(0))  # raw logits at test
    prior = [1.0] * 5 + [3.0] * 5
    p, _ = method("cifar100_lt_if100_balpoe", f"balpoe.test_prior={prior}")
    expected = torch.stack(out.logits).mean(0) + torch.log(torch.tensor(prior) / sum(prior))
    torch.testing.assert_close(p.views()["ensemble_prior"](out), expected)
    with pytest.raises(ConfigError, match="one τ per expert"):
        load_config("cifar100_lt_if100_balpoe", ["balpoe.taus=[0, 1]"])


def test_mixup_step_is_lambda_weighted_losses_of_one_forward():
    m, _ = method("cifar100_lt_if100_balpoe")
    from rayexperts.methods.base import Batch

    g = torch.Generator().manual_seed(3)
    images, perm = torch.randn(6, 5, generator=g), torch.tensor([2, 0, 1, 5, 4, 3])
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return fake_output()

    out = m.mixed_step(Probe(), Batch(images, Y), 0.3, perm)
    torch.testing.assert_close(seen[0], 0.3 * images + 0.7 * images[perm])
    o = fake_output()
    expected = 0.3 * m.loss(o, Y).total + 0.7 * m.loss(o, Y[perm]).total
    torch.testing.assert_close(out.total, expected)
    with pytest.raises(ConfigError, match="method ncl cannot take mixup"):
        load_config("digits_ncl", ["train.mixup_alpha=0.2"])


def test_every_new_preset_builds_its_model():
    from rayexperts.models.__main__ import build

    for preset in ("cifar10_lt_if100_ldam_drw", "cifar100_lt_if100_ride", "cifar100_lt_if10_sade",
                   "cifar10_lt_if100_balpoe_long"):
        model, shape = build(load_config(preset))
        assert shape == (3, 32, 32) and model.num_experts == load_config(preset).model.num_experts
    assert math.isclose(load_config("imagenet_lt_r50_balpoe").balpoe.taus[1], 1.25)


def test_balpoe_tau_spread_gives_equidistant_taus():
    from rayexperts.methods.balpoe import expert_taus

    m, cfg = method(None, "method=balpoe", "balpoe.tau_spread=1.0", "model.num_experts=4")
    assert expert_taus(cfg.balpoe, 4) == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0])
    assert expert_taus(load_config("cifar100_lt_if100_balpoe").balpoe, 3) == [0.0, 1.0, 2.0]
    out = fake_output(k=4)
    torch.testing.assert_close(m.loss(out, Y).total, L.balpoe_loss(out.logits, Y, COUNTS, (0.0, 2 / 3, 4 / 3, 2.0)))


# ------------------------------------------------------------------------------------------------ end to end
def _cifar100_pickles(parent, per_class: int = 12, test_per_class: int = 2):
    """``parent/cifar-100-python`` in the official format (train, test, meta), tiny."""
    import pickle

    from data_fixtures import interleaved_labels, tagged_images

    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", per_class, 0), ("test", test_per_class, 1)):
        labels = interleaved_labels(100, n, seed=seed)
        data = tagged_images(labels).transpose(0, 3, 1, 2).reshape(len(labels), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist()}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f, protocol=2)
    return folder


def _train(cfg, epochs: int):
    from rayexperts.engine.run import Run
    from rayexperts.engine.loop import evaluate_splits, train_epoch
    from rayexperts.engine.results import result_rows

    run = Run(cfg)
    stats = {}
    for epoch in range(epochs):
        stats = train_epoch(run, epoch)
    rows, _ = result_rows(run, epochs - 1, evaluate_splits(run, True), stats)
    return run, stats, {r["view"]: r for r in rows}


@pytest.mark.parametrize("method", ["ldam_drw", "ride", "sade", "balpoe"])
def test_each_new_method_learns_the_digits(method, tmp_path, one_torch_thread):
    extra = ["train.mixup_alpha=0.2"] if method == "balpoe" else []
    cfg = load_config(None, [f"method={method}", "train.epochs=4", f"run.storage_path={tmp_path}", "run.name=r",
                             "run.verbose=false", *extra])
    run, stats, rows = _train(cfg, 4)
    view = METHODS.get(method).primary_view
    assert math.isfinite(stats["loss"]) and rows[view]["top1"] > 0.3, rows[view]  # 10 classes: chance is 0.1
    if method == "sade":
        assert rows["tta_aggregate"]["transductive"] and not rows["ensemble"]["transductive"]


@pytest.mark.parametrize("preset, compat", [("cifar10_lt_if100_ldam_drw", "official"), ("cifar10_lt_if100_ride", "paper"),
                                            ("cifar100_lt_if100_sade", "paper"), ("cifar10_lt_if100_balpoe_long", "official")])
def test_the_cifar_presets_train_end_to_end(preset, compat, tmp_path, one_torch_thread):
    from data_fixtures import make_cifar10_pickles

    root = _cifar100_pickles(tmp_path) if "cifar100" in preset else make_cifar10_pickles(tmp_path)
    cfg = load_config(preset, [f"compat={compat}", f"data.root={root}", "data.imbalance_factor=10", "train.epochs=1",
                               "train.batch_size=32", f"run.storage_path={tmp_path}", "run.name=r", "run.verbose=false"])
    run, stats, rows = _train(cfg, 1)
    assert math.isfinite(stats["loss"]) and set(run.views) <= set(rows)
    assert all(0 <= r["top1"] <= 1 for r in rows.values())


def test_a_ride_run_teaches_a_cbd_student(tmp_path, one_torch_thread):
    """RIDE (a shared trunk) and LDAM-DRW as CBD teachers: every expert's feature is one part of the target."""
    from rayexperts.methods.cbd import ClassBalancedDistillation
    from rayexperts.rundir import RunDir, save_checkpoint

    paths = []
    for method in ("ride", "ldam_drw"):
        cfg = load_config(None, [f"method={method}", "train.epochs=1", f"run.storage_path={tmp_path}",
                                 f"run.name={method}", "run.verbose=false"])
        run, _, _ = _train(cfg, 1)
        rundir = RunDir.of(str(tmp_path), method)
        rundir.write_config(cfg)
        save_checkpoint(tmp_path, model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
        rundir.put_checkpoint(str(tmp_path), 1, 1)
        paths.append(rundir.uri)
    cfg = load_config("cbd_digits", [f"cbd.teacher_runs={paths}", "train.epochs=1", f"run.storage_path={tmp_path}",
                                     "run.name=student", "run.verbose=false"])
    student = ClassBalancedDistillation(cfg, run.method.class_counts, 1)
    ride_dim = 128 * 3 // 4  # digitsnet's last stage at 0.75 width
    assert student.teacher_feature_dims() == [ride_dim] * 3 + [128]
    _, stats, rows = _train(cfg, 1)
    assert math.isfinite(stats["loss_distill"]) and {"teacher0", "teacher1", "teacher_ensemble", "student"} <= set(rows)


@pytest.mark.ray
def test_the_router_is_a_second_stage_that_reports_experts_per_sample(ray_cluster, tmp_path, capsys):
    """``rayexperts train`` with method=ride_ea trains the RIDE experts first (its prerequisite), then the router
    on them, frozen; the router's rows report how many experts it ran per sample, overall and per shot group."""
    import pandas as pd
    import yaml

    from rayexperts.cli import train

    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text(yaml.safe_dump({"method": "ride", "data": {"name": "digits-lt"}, "train": {"epochs": 2}}))
    args = ["method=ride_ea", f"ride_ea.stage1={stage1}", "train.epochs=1", f"run.storage_path={tmp_path}",
            "run.name=job", "run.verbose=false"]
    assert train(args) == 0
    job = tmp_path / "job"
    experts = pd.read_parquet(job / "experts" / "metrics.parquet")
    router = pd.read_parquet(job / "router" / "metrics.parquet")
    assert experts["epoch"].max() == 1 and router["epoch"].max() == 0
    row = router[router["view"] == "router"].iloc[0]
    assert 1 <= row["experts_per_sample"] <= 3 and {"experts_per_sample_many", "experts_per_sample_few"} <= set(row.index)
    summary = pd.read_parquet(job / "summary.parquet").set_index("model")
    assert {"experts", "router", "ensemble"} <= set(summary.index) and summary["status"].eq("finished").all()
    frozen = yaml.safe_load((job / "router" / "config.yaml").read_text())
    assert frozen["ride_ea"]["experts_run"] == str(job / "experts")


def test_test_agnostic_distributions_are_sades_and_evaluated_beside_the_test_split(tmp_path, one_torch_thread):
    """eval.test_distributions: forward<IF> keeps int(n · IF^(−c/(C−1))) test images of class c (class 0 the head),
    backward<IF> the reverse (SADE's IMBALANCECIFAR100(train=False, imb_factor, reverse)); each gets its own
    columns in the metrics rows."""
    import numpy as np

    from rayexperts.data.imbalance import test_distribution_indices

    labels = np.repeat(np.arange(100), 100)
    forward = np.bincount(labels[test_distribution_indices(labels, "forward50")], minlength=100)
    backward = np.bincount(labels[test_distribution_indices(labels, "backward50")], minlength=100)
    by_hand = [int(100 * (1 / 50) ** (c / 99)) for c in range(100)]
    assert forward.tolist() == by_hand and backward.tolist() == by_hand[::-1]
    assert len(test_distribution_indices(labels, "uniform")) == 10_000
    with pytest.raises(ConfigError, match="forward<IF>, backward<IF>"):
        load_config(None, ["eval.test_distributions=[sideways5]"])
    cfg = load_config(None, ["method=sade", "eval.test_distributions=[forward5, backward5]", "train.epochs=1",
                             f"run.storage_path={tmp_path}", "run.name=r", "run.verbose=false", "eval.test_time=off"])
    _, _, rows = _train(cfg, 1)
    assert {"forward5_top1", "backward5_top1_few", "forward5_ece"} <= set(rows["ensemble"])
