"""CBD / CBD_ENS (docs/methods.md "CBD"): the student's loss and frozen teachers without Ray, then the
ensemble job on the shared 2-CPU Ray cluster: parallel teachers, resume, a failing teacher."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch
from helpers import CBD_JOB, metrics_without_time

from rayexperts.config import load_config, with_overrides
from rayexperts.engine.run import Run
from rayexperts.engine.loop import train_epoch
from rayexperts.launch.ensemble import SUMMARY_COLUMNS, resolve_job_config, run_ensemble
from rayexperts.launch.stages import PrerequisiteFailed, is_finished
from rayexperts.methods.base import Batch
from rayexperts.rundir import CheckpointMismatch, RunDir, save_checkpoint

ALPHA, BETA = 0.4, 100.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def teacher_overrides(root: Path, name: str, seed: int, method: str = "ce") -> list[str]:
    return [f"method={method}", "model.classifier=cosine", f"seed={seed}", "train.epochs=1",
            f"run.storage_path={root}", f"run.name={name}"]


def teacher_cfg(root: Path, name: str, seed: int, method: str = "ce"):
    return load_config(None, teacher_overrides(root, name, seed, method))


def teacher_run(root: Path, name: str, seed: int, method: str = "ce") -> str:
    """A stage-1 run directory (config.yaml + checkpoint at its last epoch) of an untrained cosine teacher."""
    cfg = teacher_cfg(root, name, seed, method)
    run = Run(cfg)
    rundir = RunDir.of(str(root), name)
    rundir.write_config(cfg)
    ckpt = Path(rundir.path) / "checkpoint_2000-01-01_00-00-00.000000"
    ckpt.mkdir()
    save_checkpoint(ckpt, model=run.model, optimizer=run.optimizer, epoch=1, ident=run.ident)
    return rundir.uri


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("teachers")
    return [teacher_run(root, f"teacher{k}", seed=10 + k) for k in range(3)]


def student(tmp_path: Path, runs: list[str]) -> Run:
    runs_list = "[" + ",".join(runs) + "]"
    cfg = load_config(None, ["method=cbd", f"cbd.teacher_runs={runs_list}", "train.epochs=1", "seed=3",
                             f"run.storage_path={tmp_path}", "run.name=student"])
    return Run(cfg)


def first_batch(run: Run) -> Batch:
    run.sampler.set_epoch(0)
    x, y = next(iter(run.train_loader))
    return Batch(x, y)


@pytest.mark.parametrize("k", [1, 3])
def test_loss_matches_hand_computation(tmp_path, teacher_runs, k):
    run = student(tmp_path, teacher_runs[:k])
    model, method, batch = run.model, run.method, first_batch(run)
    assert (model.necks is None) == (k == 1)  # h only for CBD_ENS (eq. 4)
    if k > 1:
        assert model.necks[0].out_features == 128 * k and model.heads[0].weight.shape == (10, 128 * k)
    got = method.training_step(model, batch)

    with torch.no_grad():
        x, y = batch.images, batch.targets
        v = model.experts[0](x)  # student feature, [B, 128]
        hv = v if k == 1 else v @ model.necks[0].weight.T + model.necks[0].bias
        w = model.heads[0].weight
        z = 16.0 * (hv / hv.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
        ce = (torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]).mean()
        feats = [t.experts[0](x) for t in method.teachers]
        target = torch.cat([f / f.norm(dim=1, keepdim=True) for f in feats], dim=1)
        cos = (hv * target).sum(1) / (hv.norm(dim=1) * target.norm(dim=1))
        expected = (1 - ALPHA) * ce + ALPHA * BETA * (1 - cos).mean()
    assert got.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.terms["ce"].item() == pytest.approx(((1 - ALPHA) * ce).item(), rel=1e-5)
    assert got.total.requires_grad


def test_multi_expert_teacher_gives_one_target_part_per_expert(tmp_path, teacher_runs):
    mllt = teacher_run(tmp_path, "mllt", seed=7, method="mllt")  # 3 experts of width 128 × 0.75 = 96
    run = student(tmp_path, [mllt, teacher_runs[0]])
    method, model = run.method, run.model
    assert method.teacher_feature_dims() == [96, 96, 96, 128] and model.necks[0].out_features == 416
    x = first_batch(run).images
    views, _, _ = method.predict(model, x)
    mllt_out = method.teachers[0](x)
    assert torch.allclose(views["teacher0"], torch.stack(mllt_out.logits).mean(0))
    assert method.training_step(model, first_batch(run)).total.isfinite()


def test_teachers_frozen_through_a_student_epoch(tmp_path, teacher_runs):
    run = student(tmp_path, teacher_runs[:2])
    teachers = run.method.teachers
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    student_before = {k: v.clone() for k, v in run.model.state_dict().items()}
    teacher_params = {id(p) for t in teachers for p in t.parameters()}
    assert not teacher_params & {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not teacher_params & {id(p) for p in run.model.parameters()}  # not submodules of the student

    stats = train_epoch(run, 0)

    assert np.isfinite(stats["loss"]) and {"loss_ce", "loss_distill"} <= set(stats)
    for t, old in zip(teachers, before):
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        assert all(torch.equal(v, old[k]) for k, v in t.state_dict().items())  # weights and BN statistics
    assert any(not torch.equal(v, student_before[k]) for k, v in run.model.state_dict().items())
    views, _, _ = run.method.predict(run.model, first_batch(run).images)
    assert list(views) == run.views == ["teacher0", "teacher1", "teacher_ensemble", "student"]
    assert torch.allclose(views["teacher_ensemble"], (views["teacher0"] + views["teacher1"]) / 2)


def test_student_sampler_is_class_balanced(tmp_path, teacher_runs):
    run = student(tmp_path, teacher_runs[:1])
    assert run.sampler.kind == "class_balanced"
    labels = run.data.train.labels
    drawn = labels[np.concatenate([run.sampler.epoch_indices(epoch) for epoch in range(20)])]
    share = np.bincount(drawn, minlength=10) / len(drawn)
    train_share = np.bincount(labels, minlength=10) / len(labels)
    assert train_share.max() / train_share.min() > 9  # imbalance factor 10
    assert np.abs(share - 0.1).max() < 0.02, share


def test_finished_rule(tmp_path):
    path = Path(teacher_run(tmp_path, "t", seed=4))
    cfg = teacher_cfg(tmp_path, "t", seed=4)
    assert not is_finished(cfg)  # a checkpoint, but no evaluation of the last epoch
    pd.DataFrame({"epoch": [0], "view": ["expert0"], "top1": [0.5], "timestamp": [0.0]}).to_parquet(
        path / "metrics.parquet")
    assert is_finished(cfg)
    assert not is_finished(with_overrides(cfg, {"train.epochs": 2}))  # more epochs: resume, not skip
    with pytest.raises(CheckpointMismatch, match="seed: 4 there vs 5 now"):
        is_finished(with_overrides(cfg, {"seed": 5}))
    with pytest.raises(CheckpointMismatch, match="method"):
        is_finished(load_config(None, [*teacher_overrides(tmp_path, "t", 4), "method=bsce"]))


@pytest.mark.parametrize("remote", [False, True])
def test_latest_checkpoint_rule(tmp_path, remote):
    run = Path(teacher_run(tmp_path, "t", seed=5))
    old, new = run / "checkpoint_2000-01-01_00-00-00.000000", run / "checkpoint_2001-01-01_00-00-00.000000"
    shutil.copytree(old, new)
    state = torch.load(new / "checkpoint.pt", weights_only=True)
    torch.save({**state, "epoch": 2}, new / "checkpoint.pt")
    # any pyarrow file system other than the local one takes the download path
    rundir = RunDir(str(run), pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()) if remote else None)
    assert rundir.is_local is not remote
    assert rundir.load_checkpoint()["epoch"] == 2  # the newest directory
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": old.name}}))
    assert rundir.load_checkpoint()["epoch"] == 1  # the one Ray Train registered last
    assert RunDir(str(tmp_path / "missing")).load_checkpoint() is None


# ------------------------------------------------------------------------------ the job on Ray
# One job directory, three runs of the job: two teachers (in parallel) and the student; the same job again
# (everything skipped); the job with a third, failing teacher (the two finished ones kept).


def job_config(root: Path, teachers: list[dict] | None = None):
    """The session's short CBD job (``helpers.CBD_JOB``), with other teachers if given."""
    over = [*CBD_JOB, f"run.storage_path={root}", "run.verbose=false"]
    return resolve_job_config(None, over + ([f"cbd.teachers={json.dumps(teachers)}"] if teachers else []))


GOOD = [{"type": "standard", "seed": 0}, {"type": "data_aug", "seed": 1}]
BAD = {"type": "standard", "seed": 2, "overrides": {"model.weights": "/nonexistent/weights.pt"}}  # fails in its worker


def _checkpoints(job: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(job.glob("**/checkpoint_*/checkpoint.pt"))}


@pytest.fixture
def finished_job(cbd_job) -> tuple[Path, dict]:
    return cbd_job


@pytest.mark.ray
def test_teachers_train_at_the_same_time(finished_job):
    job, out = finished_job
    t0, t1 = (row for _, row in out["summary"].iloc[:2].iterrows())
    assert t0.started_at < t1.finished_at and t1.started_at < t0.finished_at, (t0, t1)
    assert out["summary"].iloc[3].started_at >= max(t0.finished_at, t1.finished_at)  # then the student


@pytest.mark.ray
def test_job_directory(finished_job):
    job, out = finished_job
    assert out["path"] == str(job) and (job / "config.yaml").exists()
    for run in ("teachers/teacher0", "teachers/teacher1", "student"):
        assert (job / run / "metrics.parquet").exists() and list((job / run).glob("checkpoint_*/checkpoint.pt"))
    summary = pd.read_parquet(job / "summary.parquet")
    assert list(summary["model"]) == ["teacher0", "teacher1", "teacher_ensemble", "student"]
    assert list(summary["status"]) == ["finished"] * 4
    assert set(SUMMARY_COLUMNS) <= set(summary.columns) and summary[SUMMARY_COLUMNS[1:]].notna().all().all()
    assert list(summary["type"][:2]) == ["standard", "data_aug"] and list(summary["method"][:2]) == ["ce", "ce"]
    student = pd.read_parquet(job / "student" / "metrics.parquet").set_index("view")
    for i in range(2):  # a teacher's own last evaluation equals the student run's view of it
        assert summary.iloc[i].top1 == pytest.approx(student.loc[f"teacher{i}", "top1"])
    teacher_cfg = load_config(job / "teachers" / "teacher1" / "config.yaml")
    assert teacher_cfg.data.augment == "data_aug" and teacher_cfg.model.classifier == "cosine"
    assert teacher_cfg.scaling.cpus_per_worker == 1 and teacher_cfg.seed == 1 and teacher_cfg.train.epochs == 10
    student_cfg = load_config(job / "student" / "config.yaml")
    assert student_cfg.data.sampler == "auto" and student_cfg.data.augment == "standard"
    assert list(student_cfg.cbd.teacher_runs) == [str(job / "teachers" / f"teacher{i}") for i in range(2)]


@pytest.mark.ray
def test_rerun_skips_finished_runs(finished_job, capsys):
    job, first = finished_job
    before = _checkpoints(job)
    capsys.readouterr()
    again = run_ensemble(job_config(job.parent))
    printed = capsys.readouterr().out
    for name in ("teacher0", "teacher1", "student"):
        assert f"[cbd] {name}: finished checkpoint found" in printed
    assert _checkpoints(job) == before and list(again["summary"]["status"]) == ["finished"] * 4
    assert again["summary"]["reused"].all() and not first["summary"]["reused"].any()  # how they ended, and reuse
    pd.testing.assert_frame_equal(again["summary"][SUMMARY_COLUMNS], first["summary"][SUMMARY_COLUMNS])


@pytest.mark.ray
def test_an_unfinished_teacher_resumes_and_ends_as_if_never_stopped(finished_job, tmp_path):
    """A copy of the job whose teacher0 stopped after epoch 9 of 10 (its last checkpoint and last
    evaluation gone) and whose student never ran: re-running the job trains teacher0's last epoch only
    (its earlier rows are kept as they were), skips teacher1, and every run ends with the numbers of the
    job that was never stopped."""
    job, _ = finished_job
    copy = tmp_path / "job"
    shutil.copytree(job, copy)
    teacher = copy / "teachers" / "teacher0"
    shutil.rmtree(teacher / "checkpoint_000010")
    for table in ("metrics.parquet", "classes.parquet", "reliability.parquet"):
        rows = pd.read_parquet(teacher / table)
        rows[rows["epoch"] < 9].to_parquet(teacher / table)
    shutil.rmtree(copy / "student")
    kept = pd.read_parquet(teacher / "metrics.parquet")

    out = run_ensemble(job_config(tmp_path))
    summary = out["summary"].set_index("model")
    assert list(summary.loc[["teacher0", "teacher1", "student"], "status"]) == ["finished"] * 3
    assert list(summary.loc[["teacher0", "teacher1", "student"], "reused"]) == [False, True, False]
    resumed = pd.read_parquet(teacher / "metrics.parquet")
    pd.testing.assert_frame_equal(resumed[resumed["epoch"] < 9], kept)  # not retrained: same timestamps
    assert resumed["timestamp"].max() > kept["timestamp"].max()
    for run in ("teachers/teacher0", "teachers/teacher1", "student"):
        pd.testing.assert_frame_equal(metrics_without_time(copy / run), metrics_without_time(job / run))


@pytest.mark.ray
def test_failing_teacher_is_named_and_others_kept(finished_job):
    job, _ = finished_job
    before = _checkpoints(job)
    with pytest.raises(PrerequisiteFailed) as err:
        run_ensemble(job_config(job.parent, [*GOOD, BAD]))
    msg = str(err.value)
    assert re.search(r"teacher2 failed .*weights\.pt.*teachers/teacher2/error\.log", msg), msg
    assert "teacher0" not in msg and "teacher1" not in msg
    assert "WeightsError" in (job / "teachers" / "teacher2" / "error.log").read_text()
    summary = pd.read_parquet(job / "summary.parquet").set_index("model")
    assert list(summary["status"]) == ["finished", "finished", "failed"] and list(summary["reused"]) == [True, True, False]
    assert summary.loc[["teacher0", "teacher1"], "top1"].notna().all() and np.isnan(summary.loc["teacher2", "top1"])
    assert _checkpoints(job) == before


# ------------------------------------------------------------ the job's teacher and student configs

def test_default_teachers_are_two_standard_and_two_data_aug_with_their_own_seeds():
    cfg = load_config(None, ["method=cbd"])
    assert [(t.type, t.seed, t.method) for t in cfg.cbd.teachers] == [
        ("standard", 0, "ce_cosine"), ("standard", 1, "ce_cosine"), ("data_aug", 2, "ce_cosine"), ("data_aug", 3, "ce_cosine")]


def test_teacher_configs_of_a_job(tmp_path):
    from rayexperts.methods.cbd import ClassBalancedDistillation

    job = resolve_job_config(None, ["method=cbd", f"run.storage_path={tmp_path}", "run.name=job",
                                    "cbd.teachers=[{type: standard, seed: 5}, {type: data_aug, seed: 6, method: ncl}]"])
    teachers = ClassBalancedDistillation.prerequisites(job)
    assert [t.run.name for t in teachers] == ["teacher0", "teacher1"]
    assert [(t.method, t.seed, t.data.augment) for t in teachers] == [("ce", 5, "standard"), ("ncl", 6, "data_aug")]
    assert teachers[0].model.classifier == "cosine" and teachers[1].model.num_experts == 3  # ce_cosine; ncl's own
    assert {t.run.storage_path for t in teachers} == {str(tmp_path / "job" / "teachers")}
    student = ClassBalancedDistillation.after_prerequisites(job, ["/r/t0", "/r/t1"])
    assert (student.run.name, student.run.storage_path) == ("student", str(tmp_path / "job"))
    assert list(student.cbd.teacher_runs) == ["/r/t0", "/r/t1"] and student.layers[-1] == "cbd student"


def test_a_cbd_teacher_is_refused_and_the_choices_exclude_it(tmp_path):
    from rayexperts.config import ConfigError
    from rayexperts.methods.cbd import teacher_config

    job = resolve_job_config(None, ["method=cbd", f"run.storage_path={tmp_path}", "run.name=job",
                                    "cbd.teachers=[{method: cbd}]"])
    with pytest.raises(ConfigError, match=r"cbd.teachers\[0\].method='cbd': choose one of ce_cosine, ") as e:
        teacher_config(job, 0)
    assert "cbd" not in str(e.value).split("choose one of")[1].replace("ce_cosine", "").split(", ")


def test_searched_teacher_names_become_run_directories():
    from rayexperts.config import ConfigError
    from rayexperts.methods.cbd import TEACHER_RUNS, ClassBalancedDistillation as CBD

    cfg = load_config(None, ["method=cbd", "cbd.teacher_runs=[/r/a, /r/b, /r/c]"])
    assert CBD.search_value(TEACHER_RUNS, ["teacher2", "teacher0"], cfg) == ["/r/c", "/r/a"]
    assert CBD.search_value("cbd.distill_mix", 0.3, cfg) == 0.3
    assert CBD.probe_values(TEACHER_RUNS, [["teacher0"]], cfg) == []
    assert CBD.probe_values("cbd.distill_mix", [0.1, 0.2], cfg) == [0.1, 0.2]
    CBD.check_search_space(TEACHER_RUNS, {"grid": [["teacher0", "teacher2"]]}, cfg, "space.yaml")
    with pytest.raises(ConfigError, match=r"space.yaml: \['teacher3'\] is not a non-empty list of teacher names"):
        CBD.check_search_space(TEACHER_RUNS, {"choice": [["teacher3"]]}, cfg, "space.yaml")
    with pytest.raises(ConfigError, match="searched as"):
        CBD.check_search_space(TEACHER_RUNS, {"uniform": [0, 1]}, cfg, "space.yaml")
