"""CBD / CBD_ENS as one job: K teachers in parallel, then the class-balanced student (METHODS.md "CBD").

Stage 1: every teacher (``teachers``: type, seed, method, overrides) is its own Ray Train run,
launched from its own Ray actor that reserves no CPU, so all K start at once and Ray packs their
worker groups (``cbd.teacher_workers`` × {CPU: ``cbd.teacher_cpus``, GPU: ``cbd.teacher_gpus``})
onto the cluster; torch threads per worker = the CPU share. A finished run (its latest checkpoint at
the last epoch) is not retrained. One teacher failing does not stop the others: the job waits for
all, writes the summary, then raises :class:`TeacherFailed` naming it and its log.
Stage 2: the student (``method=cbd``) through Ray Train on the job's ``scaling``.

The ensemble job directory (INTERFACES.md) ``run.storage_path/run.name/``: ``config.yaml``,
``teachers/teacher<i>/`` and ``student/`` (run directories), ``summary.parquet``.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rayexperts.config import (
    ConfigError, default_layers, flatten, from_dict, load_config, parse_overrides, to_dict, to_yaml, with_overrides,
)
from rayexperts.engine.checkpoint import CheckpointMismatch
from rayexperts.engine.results import RunFiles, storage_uri
from rayexperts.launch.train import check_existing_run, default_run_name, ensure_ray, parse_cli, run_training
from rayexperts.methods import method_names
from rayexperts.methods.cbd import read_latest_checkpoint

DEMO_PRESET = "cbd_digits"
# Teacher method aliases: the paper's teacher is cross-entropy on a cosine classifier (instance sampling).
TEACHER_METHODS = {"ce_cosine": {"method": "ce", "model.classifier": "cosine"}}
# Beyond the engine's identity keys, a finished run is only reused for the same teacher (seed, augmentation)
# or, for the student, the same teachers.
REUSE_KEYS = ("seed", "data.augment", "cbd.teacher_runs")
SUMMARY_COLUMNS = ["model", "top1", "top1_many", "top1_medium", "top1_few", "started_at", "finished_at"]


class TeacherFailed(RuntimeError):
    """One or more teachers failed; the message names each, its run directory and its error log."""


@dataclass
class Outcome:
    """How one run of the job ended: ``finished``, ``skipped`` (already done) or ``failed``."""

    name: str
    cfg: DictConfig
    path: str
    status: str
    error: str = ""


# ------------------------------------------------------------------------------------ configs


def job_uri(cfg: DictConfig) -> str:
    return f"{storage_uri(cfg.run.storage_path).rstrip('/')}/{cfg.run.name}"


def teacher_config(cfg: DictConfig, i: int) -> DictConfig:
    """Teacher ``i``'s run config: the job's settings → its method's defaults → type, seed, resources,
    run dir ``<job>/teachers/teacher<i>`` → its own ``overrides``."""
    spec = cfg.teachers[i]
    where = f"teachers[{i}]"
    alias = TEACHER_METHODS.get(spec.method, {"method": spec.method})
    if alias["method"] not in method_names() or alias["method"] == "cbd":
        choices = ", ".join([*TEACHER_METHODS, *(m for m in method_names() if m != "cbd")])
        raise ConfigError(f"{where}.method={spec.method!r}: choose one of {choices}")
    tcfg = with_overrides(cfg, {"method": alias["method"], "data.sampler": "auto", "cbd.teacher_runs": []}, where)
    for source, layer in default_layers(alias["method"], ""):  # the method layer only
        tcfg = with_overrides(tcfg, flatten(layer), f"{where} ← {source}")
    c = cfg.cbd
    fixed = {
        **alias,
        "seed": int(spec.seed),
        "data.augment": str(spec.type),
        "train.epochs": int(c.teacher_epochs) or int(cfg.train.epochs),
        "scaling.num_workers": int(c.teacher_workers),
        "scaling.cpus_per_worker": float(c.teacher_cpus),
        "scaling.use_gpu": float(c.teacher_gpus) > 0,
        **({"scaling.gpus_per_worker": float(c.teacher_gpus)} if float(c.teacher_gpus) > 0 else {}),
        "run.storage_path": f"{job_uri(cfg)}/teachers",
        "run.name": f"teacher{i}",
    }
    tcfg = with_overrides(tcfg, fixed, where)
    return with_overrides(tcfg, dict(spec.overrides), f"{where}.overrides") if spec.overrides else tcfg


def student_config(cfg: DictConfig, teacher_runs: list[str]) -> DictConfig:
    """The student's run config: the job's, with the teachers and run dir ``<job>/student``."""
    return with_overrides(cfg, {
        "method": "cbd",
        "model.backbone": str(cfg.cbd.student_backbone or cfg.model.backbone),
        "cbd.teacher_runs": teacher_runs,
        "run.storage_path": job_uri(cfg),
        "run.name": "student",
    }, "student")


# ------------------------------------------------------------------------------------ stage 1


def is_finished(cfg: DictConfig) -> bool:
    """True when ``cfg``'s run directory already holds the checkpoint of its last epoch. A directory holding
    another configuration (the engine's identity keys, or :data:`REUSE_KEYS`) is refused."""
    files = RunFiles(cfg.run.storage_path, cfg.run.name)
    if not check_existing_run(files, cfg):
        return False
    old = OmegaConf.create(files.read_text("config.yaml"))
    diffs = [f"{k}: {OmegaConf.select(old, k)} there vs {OmegaConf.select(cfg, k)} now"
             for k in REUSE_KEYS if OmegaConf.select(old, k) != OmegaConf.select(cfg, k)]
    if diffs:
        raise CheckpointMismatch(f"run directory {files.path} holds another run ({'; '.join(diffs)}); "
                                 "choose another run.name or remove that directory")
    metrics = files.read_table("metrics.parquet")
    if metrics is None or metrics.empty or int(metrics["epoch"].max()) < int(cfg.train.epochs) - 1:
        return False
    state = read_latest_checkpoint(f"{storage_uri(cfg.run.storage_path)}/{cfg.run.name}")
    return state is not None and int(state["epoch"]) >= int(cfg.train.epochs)


class TeacherRunner:
    """Launches one teacher's Ray Train run from inside a Ray actor that reserves no CPU (its workers do)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:  # Ray's prefix for this actor's output lines
        return self.name

    def train(self, cfg_dict: dict[str, Any]) -> str:
        """``run_training``; on failure the traceback goes to ``<run dir>/error.log`` before re-raising."""
        cfg = from_dict(cfg_dict)
        files = RunFiles(cfg.run.storage_path, cfg.run.name)
        try:
            run_training(cfg)
        except BaseException:
            files.write_text("error.log", traceback.format_exc())
            raise
        if files.exists("error.log"):
            files.fs.delete_file(f"{files.path}/error.log")
        return files.path


def train_teachers(cfgs: list[DictConfig]) -> list[Outcome]:
    """Train every unfinished teacher concurrently, each from its own actor; wait for all, report each."""
    import ray

    runner = ray.remote(num_cpus=0)(TeacherRunner)
    outcomes: dict[int, Outcome] = {}
    pending: dict[Any, tuple[int, Any]] = {}
    for i, cfg in enumerate(cfgs):
        name, path = cfg.run.name, f"{storage_uri(cfg.run.storage_path)}/{cfg.run.name}"
        if is_finished(cfg):
            print(f"[cbd] {name}: finished checkpoint found in {path}: skipped (not retrained)", flush=True)
            outcomes[i] = Outcome(name, cfg, path, "skipped")
            continue
        ensure_ray()  # only when something is left to train
        actor = runner.remote(name)
        pending[actor.train.remote(to_dict(cfg))] = (i, actor)
        print(f"[cbd] {name} ({cfg.method}, {cfg.data.augment}, seed {cfg.seed}) launched: {path}", flush=True)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        i, _actor = pending.pop(ref)
        cfg = cfgs[i]
        name, path = cfg.run.name, f"{storage_uri(cfg.run.storage_path)}/{cfg.run.name}"
        try:
            ray.get(ref)
            outcomes[i] = Outcome(name, cfg, path, "finished")
            print(f"[cbd] {name} finished: {path}", flush=True)
        except Exception as e:  # RayTaskError / ActorDiedError: keep waiting for the others
            outcomes[i] = Outcome(name, cfg, path, "failed", _root_cause(e))
            print(f"[cbd] {name} FAILED: {outcomes[i].error}", flush=True)
    return [outcomes[i] for i in range(len(cfgs))]


def _root_cause(e: BaseException) -> str:
    """The last line of the innermost error (Ray wraps the worker's exception twice)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


# ------------------------------------------------------------------------------------ summary


def _interval(metrics: pd.DataFrame) -> tuple[float, float]:
    """(start of the first evaluated epoch's training, time of the last evaluation), Unix seconds."""
    first = metrics.sort_values("timestamp").iloc[0]
    return float(first["timestamp"] - first.get("train_seconds", 0.0)), float(metrics["timestamp"].max())


def _row(model: str, metrics: pd.DataFrame, view: str, interval: tuple[float, float], **extra: Any) -> dict[str, Any]:
    last = metrics[metrics["epoch"] == metrics["epoch"].max()].set_index("view").loc[view]
    row = {"model": model, **{k: float(last[k]) for k in SUMMARY_COLUMNS[1:5]}}
    return {**row, "started_at": interval[0], "finished_at": interval[1], **extra}


def summary_rows(outcome: Outcome) -> list[dict[str, Any]]:
    """Teacher rows: the teacher's own last evaluation of its raw logits (``expert0``, or ``ensemble``
    for K experts: what the student run's ``teacher<i>`` view computes). Student run: ``teacher_ensemble``
    and ``student``, both with the student run's interval. A failed teacher: a row of NaNs."""
    cfg, extra = outcome.cfg, {"status": outcome.status, "run_dir": outcome.path}
    if cfg.method != "cbd":
        extra.update(method=str(cfg.method), type=str(cfg.data.augment), seed=int(cfg.seed))
    metrics = RunFiles(cfg.run.storage_path, cfg.run.name).read_table("metrics.parquet")
    if outcome.status == "failed" or metrics is None or metrics.empty:
        return [{"model": outcome.name, **{k: float("nan") for k in SUMMARY_COLUMNS[1:]}, **extra}]
    span = _interval(metrics)
    if cfg.method == "cbd":
        return [_row(v, metrics, v, span, **extra) for v in ("teacher_ensemble", "student")]
    view = "ensemble" if int(cfg.model.num_experts) > 1 else "expert0"
    return [_row(outcome.name, metrics, view, span, **extra)]


def write_summary(job: RunFiles, outcomes: list[Outcome]) -> pd.DataFrame:
    df = pd.DataFrame([row for o in outcomes for row in summary_rows(o)])
    df["seed"] = df["seed"].astype("Int64")  # NaN for the student rows
    job.write_table("summary.parquet", df)
    return df


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Many / Medium / Few / All top-1 (%) per model."""
    cols = {"top1_many": "Many", "top1_medium": "Medium", "top1_few": "Few", "top1": "All"}
    return (summary.set_index("model")[list(cols)].rename(columns=cols) * 100).round(2)


# ------------------------------------------------------------------------------------ the job


def run_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1 then stage 2; returns the job directory and the summary DataFrame."""
    if cfg.method != "cbd":
        raise ConfigError(f"jobs/cbd_ens.py trains a CBD student: method must be 'cbd', got {cfg.method!r}")
    if not cfg.teachers:
        raise ConfigError("'teachers' is empty: give at least one teacher spec")
    if not cfg.run.name:
        cfg.run.name = default_run_name(cfg)
    teacher_cfgs = [teacher_config(cfg, i) for i in range(len(cfg.teachers))]  # config errors before Ray starts
    job = RunFiles(cfg.run.storage_path, cfg.run.name)
    job.write_text("config.yaml", to_yaml(cfg))
    started = time.time()
    teachers = train_teachers(teacher_cfgs)
    summary = write_summary(job, teachers)
    failed = [t for t in teachers if t.status == "failed"]
    if failed:
        raise TeacherFailed("; ".join(
            f"teacher {t.name} failed ({t.error}); run directory {t.path}, traceback in {t.path}/error.log"
            for t in failed
        ) + f". The other teachers' results are kept in {job.path}/summary.parquet; re-run to retry.")
    print(f"[cbd] stage 1 done in {time.time() - started:.1f} s", flush=True)
    scfg = student_config(cfg, [t.path for t in teachers])
    path = f"{job_uri(cfg)}/student"
    if is_finished(scfg):
        print(f"[cbd] student: finished checkpoint found in {path}: skipped (not retrained)", flush=True)
        student = Outcome("student", scfg, path, "skipped")
    else:
        run_training(scfg)
        student = Outcome("student", scfg, path, "finished")
    summary = write_summary(job, [*teachers, student])
    return {"path": job.path, "summary": summary}


def resolve_job_config(config: str | None, overrides: Sequence[str]) -> DictConfig:
    """``method=cbd`` + the preset + overrides; without ``--config`` and without another ``data.name``,
    the embedded demo preset."""
    flat = parse_overrides(list(overrides))
    if config is None and flat.get("data.name", "digits-lt") == "digits-lt":
        config = DEMO_PRESET
    return load_config(config, {"method": "cbd", **flat})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_cli(sys.argv[1:] if argv is None else argv, "jobs/cbd_ens.py",
                     "CBD / CBD_ENS: teachers in parallel on Ray, then the class-balanced student.")
    try:
        cfg = resolve_job_config(args.config, args.overrides)
        out = run_ensemble(cfg)
    except (ConfigError, CheckpointMismatch, TeacherFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TeacherFailed) else 1
    print(f"\njob directory: {out['path']}")
    print(summary_table(out["summary"]).to_string())
    return 0
