"""``train_prerequisites`` (rayexperts/launch/stages.py): the one way from a config to its prerequisites (CBD's
teachers) and then the method's own run, with the training itself given (no Ray here)."""

from __future__ import annotations

import pytest

from rayexperts.config import load_config
from rayexperts.launch.ensemble import resolve_job_config
from rayexperts.launch.stages import Outcome, PrerequisiteFailed, main_stage, train_prerequisites
from rayexperts.rundir import RunDir

TEACHERS = "cbd.teachers=[{type: standard, seed: 5}, {type: data_aug, seed: 6}]"


def _job(tmp_path):
    return resolve_job_config(None, [f"run.storage_path={tmp_path}", "run.name=job", TEACHERS])


def test_the_prerequisites_train_then_the_method_gets_their_run_directories(tmp_path):
    job, trained, seen = _job(tmp_path), [], []

    def train(first):
        trained.append([c.run.name for c in first])
        return [Outcome(str(c.run.name), c, RunDir.for_config(c).uri, "finished") for c in first]

    student, outcomes = train_prerequisites(job, "cbd", "kept", train=train, on_outcomes=seen.append)
    teachers = [str(tmp_path / "job" / "teachers" / f"teacher{i}") for i in range(2)]
    assert trained == [["teacher0", "teacher1"]] and [o.path for o in outcomes] == teachers and seen == [outcomes]
    assert (student.run.name, student.run.storage_path, list(student.cbd.teacher_runs)) == \
        ("student", str(tmp_path / "job"), teachers)
    # what reproduce asks without training (its first wave trains every setting's prerequisites at once)
    assert main_stage(job, [o.cfg for o in outcomes]) == student


def test_a_failed_prerequisite_is_named_after_every_outcome_was_seen(tmp_path):
    job, seen = _job(tmp_path), []

    def train(first):
        return [Outcome(str(c.run.name), c, RunDir.for_config(c).uri, "failed" if i else "finished",
                        "ValueError: boom" if i else "") for i, c in enumerate(first)]

    with pytest.raises(PrerequisiteFailed) as e:
        train_prerequisites(job, "cbd", "The sweep did not start", train=train, on_outcomes=seen.append)
    path = tmp_path / "job" / "teachers" / "teacher1"
    assert str(e.value) == (f"teacher1 failed (ValueError: boom); run directory {path}, traceback in {path}/error.log. "
                            "The sweep did not start; re-run to retry.")
    assert [o.status for o in seen[0]] == ["finished", "failed"]  # the summary can keep the finished one


def test_a_method_without_prerequisites_is_its_own_run(tmp_path):
    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.name=r"])

    def train(first):
        raise AssertionError("nothing to train")

    assert train_prerequisites(cfg, "ce", "", train=train) == (cfg, []) and main_stage(cfg, []) is cfg
