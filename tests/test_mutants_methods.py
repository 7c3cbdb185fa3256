"""Behaviours of rayexperts.methods that the mutation run (jobs/mutation_score.py) found untested.

Each test asserts what a user relies on (a value computed by hand, a gradient that must or must not flow,
a shape, a device), not the text of the mutant that revealed the gap. Fast: no Ray, CPU only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayexperts.config import load_config
from rayexperts.launch.ensemble import resolve_job_config
from rayexperts.models import ModelOutput
from rayexperts.registry import METHODS
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ CBD teachers (stage 1)

def _teachers(overrides: list[str], preset: str | None = None):
    from rayexperts.methods.cbd import teacher_config

    job = resolve_job_config(preset, ["run.storage_path=/jobs", "run.name=job", *overrides])
    return job, [teacher_config(job, i) for i in range(len(job.cbd.teachers))]


def test_cbd_teacher_epochs_zero_means_the_jobs_epochs():
    """``cbd.teacher_epochs=0`` trains each teacher for ``train.epochs``; any other value is the teachers' own."""
    _, (t,) = _teachers(["train.epochs=7", "cbd.teacher_epochs=0", "cbd.teachers=[{type: standard}]"])
    assert t.train.epochs == 7
    _, (t,) = _teachers(["train.epochs=7", "cbd.teacher_epochs=3", "cbd.teachers=[{type: standard}]"])
    assert t.train.epochs == 3


def test_cbd_teachers_use_a_gpu_exactly_when_given_a_share_of_one():
    """``cbd.teacher_gpus`` > 0: each teacher worker asks for that share of a GPU; 0: a CPU worker."""
    _, (t,) = _teachers(["cbd.teacher_gpus=0.5", "cbd.teachers=[{type: standard}]"])
    assert t.scaling.use_gpu is True and t.scaling.gpus_per_worker == 0.5
    _, (t,) = _teachers(["cbd.teacher_gpus=1", "cbd.teachers=[{type: standard}]"])
    assert t.scaling.use_gpu is True and t.scaling.gpus_per_worker == 1.0
    _, (t,) = _teachers(["cbd.teacher_gpus=0", "cbd.teachers=[{type: standard}]"])
    assert t.scaling.use_gpu is False


def test_cbd_teachers_follow_the_jobs_compat_and_their_own_overrides():
    """A teacher of an ``compat=official`` job gets its own method's official values (NCL's logit mask), and its
    ``overrides`` win over everything else."""
    _, (ce, ncl) = _teachers(["compat=official",
                              "cbd.teachers=[{type: standard, overrides: {train.lr: 0.3}}, {type: data_aug, method: ncl}]"])
    assert ncl.method == "ncl" and ncl.ncl.hard_mode == "mask" and ncl.ncl.hard_count == "official"
    assert "compat official (ncl)" in list(ncl.layers)
    assert ce.train.lr == 0.3 and list(ce.layers)[-1] == "cbd.teachers[0].overrides"


def test_cbd_teacher_paths_are_not_resolved_again_where_the_teacher_config_is_built(tmp_path, monkeypatch):
    """The job resolved its paths on the driver; a teacher's config is also built inside a sweep trial (another
    working directory), so a path in a teacher's overrides is kept as given, not made absolute there."""
    monkeypatch.chdir(tmp_path)
    _, (t,) = _teachers(["cbd.teachers=[{type: standard, overrides: {data.root: rel/data}}]"])
    assert t.data.root == "rel/data"
    assert t.run.storage_path == str(Path("/jobs") / "job" / "teachers")


def test_cbd_teacher_sources_name_only_the_values_the_teacher_really_takes_from_the_official_code():
    """With ``compat=official`` a teacher inherits the job's official sources except the ``cbd.*`` ones and those of
    keys its own spec sets; a data_aug teacher's ``data.augment`` is sourced like the job's ``cbd.data_aug_augment``."""
    job, (std, aug) = _teachers(["compat=official", "cbd.teachers=[{type: standard, overrides: {model.cosine_scale: 16}}, "
                                 "{type: data_aug}]"], "cbd_cifar10_lt_if100")
    assert "cbd.data_aug_augment" in job.sources and "model.cosine_scale" in job.sources
    for t in (std, aug):
        assert not any(k.startswith("cbd.") for k in t.sources)
        assert t.sources["data.normalize"] == job.sources["data.normalize"]
    assert std.model.cosine_scale == 16 and "model.cosine_scale" not in std.sources  # its own override
    assert aug.sources["model.cosine_scale"] == job.sources["model.cosine_scale"]
    assert aug.data.augment == "data_aug_simclr" and aug.sources["data.augment"] == job.sources["cbd.data_aug_augment"]
    assert "data.augment" not in std.sources and std.data.augment == "standard"


def test_cbd_summary_compares_the_teacher_ensemble_with_the_student():
    """The CBD job's summary rows are the teachers' ensemble and the student."""
    from rayexperts.methods.cbd import ClassBalancedDistillation

    assert ClassBalancedDistillation.summary_views() == ("teacher_ensemble", "student")


def test_cbd_teacher_names_must_be_lists_in_a_search_space():
    """A searched ``cbd.teacher_runs`` value that is not a list (e.g. a number) is a config error naming the space."""
    from rayexperts.config import ConfigError
    from rayexperts.methods.cbd import TEACHER_RUNS, ClassBalancedDistillation as CBD

    cfg = load_config(None, ["method=cbd", "cbd.teacher_runs=[/r/a, /r/b]"])
    with pytest.raises(ConfigError, match="space.yaml: 5 is not a non-empty list of teacher names"):
        CBD.check_search_space(TEACHER_RUNS, {"choice": [5]}, cfg, "space.yaml")


# ------------------------------------------------------------------------------------ RIDE's router (stage 2)

def _ride_stage1(root: Path, name: str = "experts", *overrides: str) -> str:
    """A finished stage-1 RIDE run directory on digits-lt (config.yaml and a checkpoint of untrained weights)."""
    from rayexperts.methods import METHODS
    from rayexperts.rundir import RunDir, identity, save_checkpoint

    cfg = load_config(None, ["method=ride", f"run.storage_path={root}", f"run.name={name}", *overrides])
    torch.manual_seed(7)
    model = METHODS.get("ride")(cfg, torch.ones(10), 1).build_model()
    rundir = RunDir.of(str(root), name)
    rundir.write_config(cfg)
    ckpt = Path(rundir.path) / "checkpoint_2000-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    save_checkpoint(ckpt, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1,
                    ident=identity(cfg, 10))
    return rundir.uri


def _router_method(*overrides: str):
    from rayexperts.methods import METHODS

    cfg = load_config(None, ["method=ride_ea", *overrides])
    return METHODS.get("ride_ea")(cfg, torch.tensor([40.0, 30, 20, 10, 8, 6, 4, 3, 2, 1]), 1)


def test_ride_router_builds_on_the_frozen_stage1_weights(tmp_path):
    """``build_model`` loads the stage-1 run's latest weights into RIDE's model and puts the routers on it, frozen."""
    from rayexperts.models.router import ExpertRouter
    from rayexperts.rundir import RunDir

    run = _ride_stage1(tmp_path)
    m = _router_method(f"ride_ea.experts_run={run}", "ride_ea.top_choices=4", "ride_ea.hidden=5")
    router = m.build_model()
    assert isinstance(router, ExpertRouter) and router.top_choices == 4 and router.projections[0].out_features == 5
    saved = RunDir(run).load_checkpoint()["model"]
    state = router.experts.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert not any(p.requires_grad for p in router.experts.parameters())


@pytest.mark.parametrize("change, message", [
    ("data.name=other", None),
    ("model.num_experts=2", "model.num_experts"),
    ("model.backbone=resnet20", "model.backbone"),
])
def test_ride_router_refuses_a_stage1_run_of_another_setting(tmp_path, change, message):
    """The router must sit on experts of its own data set, backbone and number of experts."""
    from rayexperts.config import ConfigError

    run = _ride_stage1(tmp_path, "experts", change) if change != "data.name=other" else None
    if run is None:  # another data set: edit the saved config
        run = _ride_stage1(tmp_path)
        cfg_file = Path(run) / "config.yaml"
        cfg_file.write_text(cfg_file.read_text().replace("name: digits-lt", "name: cifar10-lt"))
        message = "data.name='cifar10-lt', this router has 'digits-lt'"
    with pytest.raises(ConfigError, match=message):
        _router_method(f"ride_ea.experts_run={run}").build_model()


def test_ride_router_needs_a_finished_ride_run(tmp_path):
    """No run given, a directory without a RIDE config, or one without a checkpoint: a clear error each."""
    from rayexperts.config import ConfigError

    with pytest.raises(ConfigError, match="set ride_ea.experts_run"):
        _router_method().build_model()
    with pytest.raises(ConfigError, match="is not a RIDE run directory"):
        _router_method(f"ride_ea.experts_run={tmp_path / 'nothing'}").build_model()
    run = _ride_stage1(tmp_path)
    for ckpt in Path(run).glob("checkpoint_*"):
        (ckpt / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        _router_method(f"ride_ea.experts_run={run}").build_model()


def test_ride_router_stage1_prerequisite(tmp_path):
    """Without a finished run, stage 1 is ``ride_ea.stage1`` (a RIDE preset) with the job's data and resources, in
    ``<job>/experts``; then the router's config points at it and runs in ``<job>/router``."""
    from rayexperts.config import ConfigError
    from rayexperts.methods.ride import RIDERouter

    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text("method: ride\ndata: {name: digits-lt}\ntrain: {epochs: 2, lr: 0.3}\n")
    job = load_config(None, ["method=ride_ea", f"ride_ea.stage1={stage1}", f"run.storage_path={tmp_path}",
                             "run.name=job", "seed=11", "data.val_per_class=2", "run.checkpoint_every=3"])
    (first,) = RIDERouter.prerequisites(job)
    assert (first.method, first.train.epochs, first.train.lr) == ("ride", 2, 0.3)  # its recipe is its own
    assert (first.seed, first.data.val_per_class, first.run.checkpoint_every) == (11, 2, 3)  # the job's
    assert (first.run.name, first.run.storage_path) == ("experts", str(tmp_path / "job"))
    router = RIDERouter.after_prerequisites(job, [str(tmp_path / "job" / "experts")])
    assert router.ride_ea.experts_run == str(tmp_path / "job" / "experts")
    assert (router.run.name, router.run.storage_path) == ("router", str(tmp_path / "job"))
    assert router.layers[-1] == "ride_ea router" and router.method == "ride_ea"
    assert RIDERouter.prerequisites(router) == []  # a finished run: nothing to train first
    with pytest.raises(ConfigError, match="needs a stage-1 RIDE run"):
        RIDERouter.prerequisites(load_config(None, ["method=ride_ea"]))
    stage1.write_text("method: sade\n")
    with pytest.raises(ConfigError, match="trains method=sade, not ride"):
        RIDERouter.prerequisites(job)


def test_ride_router_config_limits():
    """At least two experts to choose among, ``top_choices`` >= 1 and ``pos_weight`` > 0; the limits themselves pass."""
    from rayexperts.config import ConfigError

    load_config(None, ["method=ride_ea", "model.num_experts=2", "ride_ea.top_choices=1", "ride_ea.pos_weight=0.01"])
    for bad in ("model.num_experts=1", "ride_ea.top_choices=0", "ride_ea.pos_weight=0"):
        with pytest.raises(ConfigError):
            load_config(None, ["method=ride_ea", bad])


def test_ride_router_loss_views_and_statistic():
    """The loss is BCE(pos_weight) of each router against "expert i + 1 helps" (logged as ``router``); the views are
    the routed prediction, the plain ensemble and each expert; ``experts_per_sample`` is the number that ran."""
    from rayexperts import losses as L
    from rayexperts.methods.ride import RIDERouter
    from rayexperts.models.router import RoutedOutput

    m = _router_method("ride_ea.experts_run=/nowhere", "ride_ea.pos_weight=7")
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 10, generator=g) for _ in range(3)]
    z[0][0], z[1][0], z[2][0] = 20 * F.one_hot(torch.tensor(1), 10), 50 * F.one_hot(torch.tensor(0), 10), 0
    expert = ModelOutput([torch.randn(6, 4, generator=g) for _ in range(3)], z)
    out = RoutedOutput(expert, torch.randn(6, 2, generator=g), torch.randn(6, 10, generator=g),
                       torch.tensor([1, 2, 3, 1, 1, 2]))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    help_ = L.router_targets(z, y)
    assert help_[0, 0] == 1  # sample 0: expert 0 alone is wrong, adding expert 1 makes it right
    hand = (7 * help_ * F.softplus(-out.router_logits) + (1 - help_) * F.softplus(out.router_logits)).mean()
    loss = m.loss(out, y)
    torch.testing.assert_close(loss.total, hand)
    assert set(loss.terms) == {"router"} and torch.equal(loss.terms["router"], loss.total)
    assert m.model_output(out) is expert
    views = m.views()
    assert set(views) == {"router", "ensemble", "expert0", "expert1", "expert2"}
    assert views["router"](out) is out.routed_logits
    torch.testing.assert_close(views["ensemble"](out), torch.stack(z).mean(0))
    assert all(views[f"expert{i}"](out) is z[i] for i in range(3))
    stats = m.sample_statistics(out)
    assert set(stats) == {"experts_per_sample"} and stats["experts_per_sample"].dtype == torch.float32
    assert stats["experts_per_sample"].tolist() == [1, 2, 3, 1, 1, 2]
    assert RIDERouter.summary_views() == ("router", "ensemble") and RIDERouter.logits_view(m.cfg) == "ensemble"

    class Recorder(torch.nn.Module):
        def forward(self, x):
            return ("routed", x)

    from rayexperts.methods.base import Batch

    images = torch.zeros(2, 1, 8, 8)
    assert m.forward(Recorder(), Batch(images, y[:2])) == ("routed", images)


# ------------------------------------------------------------------------------------ LDAM-DRW, BalPoE

COUNTS10 = torch.tensor([500.0, 200, 90, 40, 15, 6, 3, 2, 2, 1])


def _method(*overrides: str):
    from rayexperts.methods import METHODS

    cfg = load_config(None, list(overrides))
    return METHODS.get(cfg.method)(cfg, COUNTS10, 3)


def test_ldam_drw_weights_use_the_configured_beta_and_the_loss_is_logged_as_ldam():
    """From the DRW epoch on, the class weights are the effective-number weights of ``ldam_drw.beta``; the step's
    logged term is ``ldam``, the loss itself."""
    from rayexperts import losses as L

    m = _method("method=ldam_drw", "ldam_drw.beta=0.99", "ldam_drw.drw_epoch=3")
    m.on_epoch(2)
    assert m.weights is None
    m.on_epoch(3)
    torch.testing.assert_close(m.weights, L.drw_weights(COUNTS10, 0.99))
    z = torch.rand(4, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([0, 3, 5, 9])
    out = m.loss(ModelOutput([torch.zeros(4, 2)], [z]), y)
    torch.testing.assert_close(out.total, L.ldam_loss(z, y, COUNTS10, 0.5, 30.0, L.drw_weights(COUNTS10, 0.99)))
    assert set(out.terms) == {"ldam"} and torch.equal(out.terms["ldam"], out.total)


def test_balpoe_tau_spread_with_one_or_two_experts():
    """``tau_spread`` > 0: one expert takes ``tau_mean``; two take mean ∓ spread; three are equidistant."""
    from types import SimpleNamespace

    from rayexperts.methods.balpoe import expert_taus

    opts = SimpleNamespace(tau_spread=0.5, tau_mean=1.0, taus=[9.0])
    assert expert_taus(opts, 1) == [1.0]
    assert expert_taus(opts, 2) == pytest.approx([0.5, 1.5])
    assert expert_taus(opts, 3) == pytest.approx([0.5, 1.0, 1.5])
    assert expert_taus(SimpleNamespace(tau_spread=0.0, tau_mean=1.0, taus=[0, 2]), 2) == [0.0, 2.0]


def test_balpoe_test_prior_is_checked_against_the_classes_and_moved_to_the_device():
    """``setup`` refuses a test prior of another length than the classes, and keeps it (and the class counts) on
    the training device (``meta`` stands in for CUDA)."""
    from rayexperts.config import ConfigError

    prior = [1.0] * 5 + [3.0] * 5
    m = _method("method=balpoe", f"balpoe.test_prior={prior}")
    m.setup(torch.device("meta"), torch.contiguous_format)
    assert m.prior.device.type == "meta" and m.class_counts.device.type == "meta"
    short = _method("method=balpoe", "balpoe.test_prior=[1.0, 2.0]")
    with pytest.raises(ConfigError, match="balpoe.test_prior has 2 values for 10 classes"):
        short.setup(torch.device("cpu"), torch.contiguous_format)


# ------------------------------------------------------------------------------------ every method

@pytest.mark.parametrize("name", METHODS.builtin_names())
def test_a_method_built_without_in_channels_takes_rgb_images(name):
    """``METHODS.get(name)(cfg, counts)`` is a method for 3-channel (RGB) images (with the overrides it needs on
    digits-lt: ``Method.demo_overrides``)."""
    cfg = load_config(None, [f"method={name}", *METHODS.get(name).demo_overrides])
    assert METHODS.get(name)(cfg, COUNTS10).in_channels == 3


@pytest.mark.parametrize("name, term", [("ldam_drw", "ldam"), ("ride", "ride"), ("balpoe", "balpoe"), ("sade", "sade")])
def test_a_methods_step_logs_its_loss_under_its_name(name, term):
    """The one logged term of these methods is the loss itself, under the method's name (``loss_<term>``)."""
    m = _method(f"method={name}")
    m.on_epoch(0)
    g = torch.Generator().manual_seed(1)
    k = m.num_experts
    out = m.loss(ModelOutput([torch.zeros(4, 2)] * k, [torch.rand(4, 10, generator=g) * 2 - 1 for _ in range(k)]),
                 torch.tensor([0, 3, 5, 9]))
    assert set(out.terms) == {term} and torch.equal(out.terms[term], out.total.detach())


def test_ldam_drw_loss_before_any_epoch_hook_is_unweighted():
    """A fresh LDAM-DRW method (no epoch started yet) has no class weights: the plain mean."""
    from rayexperts import losses as L

    m = _method("method=ldam_drw")
    z = torch.rand(4, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([0, 3, 5, 9])
    assert m.weights is None
    torch.testing.assert_close(m.loss(ModelOutput([torch.zeros(4, 2)], [z]), y).total, L.ldam_loss(z, y, COUNTS10))


def test_ride_uses_its_configured_scale_for_the_margins():
    """With ``ride.scale`` 20 (and the model's cosine scale 20) the LDAM margin in logit units is 20·m."""
    from rayexperts import losses as L

    m = _method("method=ride", "ride.scale=20", "model.cosine_scale=20")
    g = torch.Generator().manual_seed(2)
    z = [(torch.rand(4, 10, generator=g) * 2 - 1) * 20 for _ in range(3)]
    y = torch.tensor([0, 3, 5, 9])
    m.on_epoch(0)
    expected = L.ride_loss(z, y, COUNTS10, False, -0.2, 0.05, 1.0, 0.5, 20.0)
    torch.testing.assert_close(m.loss(ModelOutput([torch.zeros(4, 2)] * 3, z), y).total, expected)
    assert not torch.allclose(expected, L.ride_loss(z, y, COUNTS10, False, -0.2, 0.05, 1.0, 0.5, 30.0))


# ------------------------------------------------------------------------------------ CBD teachers (loaded)

def _teacher_run(root: Path, method: str = "ce") -> str:
    from rayexperts.methods import METHODS
    from rayexperts.rundir import RunDir, identity, save_checkpoint

    cfg = load_config(None, [f"method={method}", "model.classifier=cosine", f"run.storage_path={root}", "run.name=t"])
    model = METHODS.get(method)(cfg, torch.ones(10), 1).build_model()
    rundir = RunDir.of(str(root), "t")
    rundir.write_config(cfg)
    ckpt = Path(rundir.path) / "checkpoint_2000-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    save_checkpoint(ckpt, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1,
                    ident=identity(cfg, 10))
    return rundir.uri


def test_a_cbd_student_cannot_be_a_teacher(tmp_path):
    """A teacher must be a stage-1 run: a CBD student's run directory is refused by name."""
    from rayexperts.methods.cbd import load_teacher

    run = _teacher_run(tmp_path)
    cfg_file = Path(run) / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("method: ce", "method: cbd", 1))
    with pytest.raises(ValueError, match="is a CBD student"):
        load_teacher(run, torch.ones(10), 1, "digits-lt")


def test_a_teacher_checkpoint_of_another_number_of_classes_is_refused(tmp_path):
    """The teacher's checkpoint must agree with the student's classes: a CheckpointMismatch, before any weight
    is loaded into a wrongly shaped model."""
    from rayexperts.methods.cbd import load_teacher
    from rayexperts.rundir import CheckpointMismatch

    run = _teacher_run(tmp_path)
    assert load_teacher(run, torch.ones(10), 1, "digits-lt") is not None
    with pytest.raises(CheckpointMismatch, match="num_classes"):
        load_teacher(run, torch.ones(7), 1, "digits-lt")


def test_cbd_setup_moves_the_teachers_to_the_device_and_memory_format():
    """``setup`` puts the frozen teachers (and the class counts) on the training device in its memory format:
    channels_last convolutions here, the ``meta`` device standing in for CUDA."""
    from rayexperts.methods.cbd import ClassBalancedDistillation

    cfg = load_config(None, ["method=cbd", "cbd.teacher_runs=[/unused]"])
    m = ClassBalancedDistillation(cfg, COUNTS10, 3)
    m._teachers = [torch.nn.Conv2d(3, 4, 3)]
    m.setup(torch.device("cpu"), torch.channels_last)
    assert m._teachers[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not m._teachers[0].weight.is_contiguous()
    m.setup(torch.device("meta"), torch.contiguous_format)
    assert m._teachers[0].weight.device.type == "meta" and m.class_counts.device.type == "meta"


# ------------------------------------------------------------------------------------ NCL

def test_ncl_experts_are_independent_networks_with_or_without_moco():
    """NCL trains K independent networks (no shared trunk); the MoCo branch is there only with ``ncl.contrastive``,
    and ``moco.key_init=random`` gives the key encoders their own initialisation."""
    from rayexperts.models import MocoExperts
    from rayexperts.models.summary import parameter_table

    plain = _method("method=ncl", "ncl.contrastive=false").build_model()
    assert not isinstance(plain, MocoExperts)
    assert "trunk" not in set(parameter_table(plain)["part"])
    for init, same in (("copy", True), ("random", False)):
        moco = _method("method=ncl", f"ncl.moco.key_init={init}").build_model()
        assert isinstance(moco, MocoExperts)
        query = moco.net.encoder(0).state_dict()
        key = moco.branches[0].key_encoder.state_dict()
        assert all(torch.equal(key[k], query[k]) for k in query) is same


def test_ncl_loss_uses_the_configured_tau():
    """``ncl.tau`` reaches both the NIL and the NBOD terms (balanced softmax ``z + τ·log n``)."""
    from rayexperts import losses as L

    m = _method("method=ncl", "ncl.tau=0.5", "ncl.contrastive=false")
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(4, 10, generator=g) for _ in range(3)]
    y = torch.tensor([0, 3, 5, 9])
    out = m.loss(ModelOutput([torch.zeros(4, 2)] * 3, z), y)
    mask = L.hard_category_mask(z[0], y, m.num_hard)
    torch.testing.assert_close(out.terms["nil"], L.nil_loss(z, y, COUNTS10, mask, 0.5))
    torch.testing.assert_close(out.terms["dis"], 0.6 * L.nbod_loss(z, COUNTS10, mask, 0.5))


def test_ncl_without_hard_terms_draws_no_anchor():
    """With both hard-category terms off no hard set is mined, so a random anchor is never drawn (the global
    random stream is left as it was)."""
    m = _method("method=ncl", "ncl.contrastive=false", "ncl.learn_hard=false", "ncl.distill_hard=false",
                "ncl.hard_anchor=random")
    z = [torch.randn(4, 10) for _ in range(3)]
    torch.manual_seed(5)
    m.loss(ModelOutput([torch.zeros(4, 2)] * 3, z), torch.tensor([0, 3, 5, 9]))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))


def test_ncl_official_hard_count_can_be_zero():
    """``ncl.hard_count=official``: ``int(β·C)`` classes in all, the target included, so β·C = 1 mines no other class."""
    assert _method("method=ncl", "ncl.hard_count=official", "ncl.hard_ratio=0.1").num_hard == 0
    assert _method("method=ncl", "ncl.hard_count=official", "ncl.hard_ratio=0.3").num_hard == 2
    assert _method("method=ncl", "ncl.hard_count=paper", "ncl.hard_ratio=0.1").num_hard == 1


# ------------------------------------------------------------------------------------ SADE's test-time aggregation

def _tta(**opts):
    from types import SimpleNamespace

    from rayexperts.methods.sade import AggregationWeights

    base = dict(tta_lr=0.1, tta_epochs=5, tta_batch_size=128, tta_weight_decay=5e-4, tta_stop_below=0.05)
    return AggregationWeights(SimpleNamespace(**{**base, **opts}), 3)


def test_sade_aggregation_starts_on_the_device_with_equal_weights():
    """The three raw weights start at 1/3 each, trainable, on the evaluation device (``meta`` stands in for CUDA)."""
    step = _tta()
    step.start(torch.device("meta"))
    assert step.raw.device.type == "meta" and step.raw.requires_grad and step.raw.shape == (3,)
    step.start(torch.device("cpu"))
    torch.testing.assert_close(step.raw.detach(), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("weights, stop", [
    ([0.0447, 0.4553, 0.5], True),  # rounds to 0.04 < 0.05
    ([0.0503, 0.4497, 0.5], False),  # rounds to 0.05, not below
    ([0.2, 0.3, 0.5], False),
])
def test_sade_aggregation_stops_once_a_rounded_weight_is_below_the_threshold(weights, stop):
    """After a pass: stop when a weight softmax(w)_k, rounded to 2 decimals, is below ``tta_stop_below`` (0.05)."""
    step = _tta()
    step.start(torch.device("cpu"))
    with torch.no_grad():
        step.raw.copy_(torch.tensor(weights).log())
    assert step.done() is stop


def test_sade_aggregation_exposes_its_learnt_weights():
    """Before the view is made there are no weights; afterwards ``weights`` is softmax(w), the view's mixture."""
    step = _tta()
    assert step.weights is None
    step.start(torch.device("cpu"))
    with torch.no_grad():
        step.raw.copy_(torch.tensor([0.0, 1.0, 2.0]))
    view = step.view()
    torch.testing.assert_close(step.weights, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0))
    z = [torch.ones(2, 4) * k for k in range(3)]
    torch.testing.assert_close(view(ModelOutput([], z)), sum(step.weights[k] * z[k] for k in range(3)))


# ------------------------------------------------------------------------------------ config limits

LIMITS = [  # (method, overrides, accepted, message of the refusal)
    ("ldam_drw", ["ldam_drw.beta=0", "ldam_drw.drw_epoch=1", "ldam_drw.max_m=0.01", "ldam_drw.scale=0.5"], True, ""),
    ("ldam_drw", ["model.classifier=cosine", "model.cosine_scale=1"], True, ""),
    ("ldam_drw", ["ldam_drw.beta=1"], False, "beta must lie in"),
    ("ldam_drw", ["ldam_drw.beta=-0.1"], False, "beta must lie in"),
    ("ldam_drw", ["ldam_drw.max_m=0"], False, "max_m, scale > 0"),
    ("ldam_drw", ["ldam_drw.scale=0"], False, "max_m, scale > 0"),
    ("ldam_drw", ["ldam_drw.drw_epoch=0"], False, "drw_epoch >= 1"),
    ("ldam_drw", ["model.num_experts=2"], False, "one network"),
    ("ldam_drw", ["model.classifier=linear"], False, "scales the cosine itself"),
    ("ldam_drw", ["model.cosine_scale=1.5"], False, "scales the cosine itself"),
    ("ride", ["ride.reweight_factor=0"], True, ""),
    ("ride", ["ride.reweight_factor=1"], True, ""),
    ("ride", ["ride.scale=20", "model.cosine_scale=20"], True, ""),
    ("ride", ["ride.reweight_factor=1.1"], False, "reweight_factor' must lie in"),
    ("ride", ["ride.reweight_factor=-0.1"], False, "reweight_factor' must lie in"),
    ("ride", ["ride.scale=20"], False, "model.cosine_scale must equal ride.scale"),
    ("ride", ["model.classifier=linear"], False, "model.cosine_scale must equal ride.scale"),
    ("balpoe", ["balpoe.tau_spread=0", "balpoe.taus=[0, 1, 2]"], True, ""),
    ("balpoe", ["balpoe.tau_spread=0.5", "balpoe.taus=[1]"], True, ""),  # the spread sets the taus
    ("balpoe", ["balpoe.test_prior=[0, 1, 0, 0, 0, 0, 0, 0, 0, 0]"], True, ""),
    ("balpoe", ["balpoe.tau_spread=-0.1"], False, "tau_spread' must be >= 0"),
    ("balpoe", ["balpoe.taus=[0, 1]"], False, "give one τ per expert"),
    ("balpoe", ["balpoe.test_prior=[1, -1, 1, 1, 1, 1, 1, 1, 1, 1]"], False, "non-negative per-class weights"),
    ("balpoe", ["balpoe.test_prior=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"], False, "non-negative per-class weights"),
    ("sade", ["sade.tta_epochs=1", "sade.tta_batch_size=1", "sade.tta_lr=0.001"], True, ""),
    ("sade", ["model.num_experts=2"], False, "exactly three experts"),
    ("sade", ["sade.tta_lr=0"], False, "tta_lr must be > 0"),
    ("sade", ["sade.tta_epochs=0"], False, "tta_epochs and tta_batch_size >= 1"),
    ("sade", ["sade.tta_batch_size=0"], False, "tta_epochs and tta_batch_size >= 1"),
    ("ncl", ["ncl.hard_ratio=0", "ncl.anchor_expert=2"], True, ""),
    ("ncl", ["ncl.hard_ratio=1"], True, ""),
    ("ncl", ["ncl.hard_ratio=1.1"], False, "hard_ratio' must lie in"),
    ("ncl", ["ncl.hard_ratio=-0.1"], False, "hard_ratio' must lie in"),
    ("ncl", ["ncl.anchor_expert=3"], False, "anchor_expert'=3 must lie in"),
    ("ncl", ["ncl.anchor_expert=-1"], False, "anchor_expert'=-1 must lie in"),
    ("cbd", ["cbd.teacher_gpus=0.5", "cbd.teacher_workers=1"], True, ""),
    ("cbd", ["cbd.teacher_gpus=1", "cbd.teacher_workers=2"], True, ""),
    ("cbd", ["model.num_experts=2"], False, "the CBD student is one network"),
    ("cbd", ["cbd.teacher_gpus=0.5", "cbd.teacher_workers=2"], False, "cbd.teacher_workers=2 with cbd.teacher_gpus=0.5"),
]


@pytest.mark.parametrize("name, overrides, accepted, message", LIMITS)
def test_method_settings_are_checked_at_their_limits(name, overrides, accepted, message):
    """Each method's checks accept the ends of every valid range and refuse the first value outside, by name."""
    from rayexperts.config import ConfigError

    if accepted:
        load_config(None, [f"method={name}", *overrides])
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"method={name}", *overrides])


def test_ecl_experts_are_independent_networks():
    """ECL trains K independent networks, as NCL does (no shared trunk), with or without its contrastive branch."""
    from rayexperts.models.summary import parameter_table

    from rayexperts.models import MocoExperts

    for contrastive in ("false", "true"):
        model = _method("method=ecl", f"ecl.contrastive={contrastive}").build_model()
        assert "trunk" not in set(parameter_table(model)["part"]), contrastive
        assert isinstance(model, MocoExperts) is (contrastive == "true")


def test_ecl_ref_heads_are_built_like_the_cls_heads():
    """ECL's ref head of each expert is the configured classifier, with the model's cosine scale and bias."""
    from rayexperts.models.heads import CosineClassifier

    model = _method("method=ecl", "ecl.contrastive=false", "model.classifier=cosine", "model.cosine_scale=7.5",
                    "model.cosine_bias=true").build_model()
    assert len(model.aux_heads) == 3
    for ref in model.aux_heads:
        assert isinstance(ref, CosineClassifier) and ref.scale == 7.5 and ref.bias is not None
    plain = _method("method=ecl", "ecl.contrastive=false", "model.classifier=cosine").build_model()
    assert all(ref.bias is None for ref in plain.aux_heads)


def test_ecl_key_encoders_follow_key_init_and_the_projection_width():
    """``ecl.moco.key_init=random`` gives each key encoder its own initialisation (copy: the query's weights);
    ``ecl.moco.hidden`` sets the projection MLP's hidden width."""
    for init, same in (("copy", True), ("random", False)):
        moco = _method("method=ecl", f"ecl.moco.key_init={init}", "ecl.moco.hidden=24").build_model()
        query = moco.net.encoder(0).state_dict()
        key = moco.branches[0].key_encoder.state_dict()
        assert all(torch.equal(key[k], query[k]) for k in query) is same
        assert moco.branches[0].proj[0].out_features == 24


def test_ce_is_one_network_without_a_shared_trunk():
    """CE with several experts trains independent networks (the multi-expert CE baseline), never a shared trunk."""
    from rayexperts.models.summary import parameter_table

    model = _method("method=ce", "model.num_experts=2").build_model()
    assert "trunk" not in set(parameter_table(model)["part"])


def test_the_contrastive_term_refuses_outputs_without_keys_or_queues():
    """Each of queries, keys and queues is needed: a missing one is the named error, not a failure inside zip."""
    from types import SimpleNamespace

    from rayexperts.methods.contrastive import contrastive_loss

    q = [torch.nn.functional.normalize(torch.ones(2, 4), dim=1)]
    queue = [torch.nn.functional.normalize(torch.ones(5, 4), dim=1)]
    for out in (SimpleNamespace(queries=q, keys=q, queues=None), SimpleNamespace(queries=q, keys=None, queues=queue),
                SimpleNamespace(queries=None, keys=q, queues=queue)):
        with pytest.raises(ValueError, match="the contrastive term needs MoCo outputs"):
            contrastive_loss(out, 0.2)


def test_ride_router_refuses_a_stage1_checkpoint_of_another_configuration(tmp_path):
    """The stage-1 checkpoint's identity is checked too (here it claims 5 classes for a 10-class router)."""
    from rayexperts.rundir import CHECKPOINT_FILE, CheckpointMismatch

    run = _ride_stage1(tmp_path)
    (ckpt,) = Path(run).glob(f"checkpoint_*/{CHECKPOINT_FILE}")
    state = torch.load(ckpt, weights_only=True)
    state["identity"]["num_classes"] = 5
    torch.save(state, ckpt)
    with pytest.raises(CheckpointMismatch, match="num_classes: checkpoint 5 vs this run 10"):
        _router_method(f"ride_ea.experts_run={run}").build_model()


def test_ride_needs_the_models_cosine_scale_to_be_its_own():
    """RIDE's s·cos logits live in the model: ``model.cosine_scale`` must equal ``ride.scale`` (to 1e-9)."""
    from rayexperts.config import ConfigError
    from rayexperts.methods.ride import RIDE

    RIDE.validate(load_config(None, ["method=ride", "model.cosine_scale=30", "ride.scale=30"]))
    for scale in ("30.5", "31", "29.9999"):
        with pytest.raises(ConfigError, match="model.cosine_scale must equal ride.scale"):
            RIDE.validate(load_config(None, ["method=ride", "model.cosine_scale=30", f"ride.scale={scale}"]))


def test_sade_shares_a_trunk_and_uses_its_configured_tau():
    """SADE has RIDE's layout (a shared trunk, one branch per expert), and ``sade.tau`` reaches its third expert's
    inverse-prior term."""
    from rayexperts import losses as L
    from rayexperts.models.summary import parameter_table

    m = _method("method=sade", "sade.tau=0.5")
    assert "trunk" in set(parameter_table(m.build_model())["part"])
    g = torch.Generator().manual_seed(4)
    z = [torch.randn(4, 10, generator=g) for _ in range(3)]
    y = torch.tensor([0, 3, 5, 9])
    out = m.loss(ModelOutput([torch.zeros(4, 2)] * 3, z), y)
    torch.testing.assert_close(out.total, L.sade_loss(z, y, m.class_counts, 0.5))
    assert not torch.allclose(out.total, L.sade_loss(z, y, m.class_counts, 2.0))
