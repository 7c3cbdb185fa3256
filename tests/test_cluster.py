"""The cluster path as users run it (issue 11): a real head node (``ray start --head --block``, token
authentication on, its own temp dir and ports), the README's ``ray job submit`` command read from the
README, and the three jobs, submitted at once. Each submitted job must succeed, write under the given storage,
resolve the same config as ``load_config`` does locally, and print one progress line per epoch per run.
The train command run locally (from another working directory, with a dead cluster's address file lying
around) and the CBD job run on the local cluster must give the same numbers. An upload without the
presets stops with a clear error.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import CBD_JOB, PLUGIN_MODULE, PLUGIN_PACKAGE, write_plugin_package
from rayexperts.config import load_config, to_dict
from rayexperts.launch.ensemble import resolve_job_config
from rayexperts.launch.tune import resolve_sweep_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "<!-- ray-job-submit:"
VOLATILE = ("timestamp", "images_per_sec", "train_seconds")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def readme_submit_options() -> list[str]:
    """The options of the README's ``ray job submit`` command (everything before ``--``)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(MARKER):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    command = ""
    for line in lines[start:]:
        command += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    tokens = shlex.split(command)
    return tokens[3:tokens.index("--")]  # after "ray job submit"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    env: dict[str, str]
    storage: Path

    def submit(self, entrypoint: list[str], extra_excludes: tuple[str, ...] = (),
               runtime_env: dict | None = None) -> subprocess.Popen:
        """The README's command; ``extra_excludes`` and ``runtime_env`` (e.g. ``py_modules``) added to its
        runtime environment."""
        options = readme_submit_options()
        if extra_excludes or runtime_env:
            i = options.index("--runtime-env-json") + 1
            spec = json.loads(options[i])
            spec["excludes"] = [*spec["excludes"], *extra_excludes]
            options[i] = json.dumps({**spec, **(runtime_env or {})})
        cmd = [str(BIN / "ray"), "job", "submit", *options, "--", *entrypoint]
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="rxh"))  # short: Ray's socket paths live under --temp-dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # As the README: the head starts inside the project's environment (`source .venv/bin/activate`).
    env.update(HOME=str(root / "home"), RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", VIRTUAL_ENV=str(BIN.parent),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash, client, nm, om, metrics, agent, agent_grpc, runtime_env = free_ports(9)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
           "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client),
           "--node-manager-port", str(nm), "--object-manager-port", str(om), "--metrics-export-port", str(metrics),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(runtime_env), "--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list"], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(2)
        yield Head(env, root / "storage")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head and everything it started: one process group
        try:
            proc.wait(timeout=3)  # the head need not stop gracefully
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def metrics_of(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "metrics.parquet")
    return df.drop(columns=[c for c in VOLATILE if c in df]).sort_values(["epoch", "view"], ignore_index=True)


def saved_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def local_run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python REPO/jobs/<script> ...`` from another working directory, with the address file of a dead
    cluster in Ray's temp dir: the script must start its own local instance, not retry the dead one."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rxl"))
    (ray_tmp / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens on port 9
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
    try:
        return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs(head, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """The three jobs, one upload without the presets and a plugin method's run, submitted at once:
    name -> (exit status, log)."""
    storage = head.storage
    plugin = write_plugin_package(tmp_path_factory.mktemp("plugin")) / "src" / PLUGIN_MODULE.split(".")[0]
    started = time.time()
    procs = {
        "train": head.submit(["python", "jobs/train.py", *TRAIN_ARGS, f"run.storage_path={storage}"]),
        "cbd": head.submit(["python", "jobs/cbd_ens.py", *CBD_JOB, f"run.storage_path={storage}"]),
        "sweep": head.submit(["python", "jobs/sweep.py", *SWEEP_ARGS, f"run.storage_path={storage}"]),
        "no_presets": head.submit(["python", "jobs/train.py", f"run.storage_path={storage}", "run.name=never"],
                                  extra_excludes=("/rayexperts/presets/",)),
        "plugin": head.submit(["python", "jobs/train.py", *PLUGIN_ARGS, f"run.storage_path={storage}"],
                              runtime_env={"py_modules": [str(plugin)]}),
    }
    with ThreadPoolExecutor(len(procs)) as pool:  # read every log while all run: no pipe fills up
        logs = dict(zip(procs, pool.map(finish, procs.values())))
    done = {name: (proc.returncode, logs[name]) for name, proc in procs.items()}
    print(f"\nsubmitted ({len(procs)} jobs at once): {time.time() - started:.0f} s")
    return done


TRAIN_ARGS = ["method=mllt", "train.epochs=2", "run.name=train_job", "scaling.cpus_per_worker=1"]
# A method from a package outside the repository, not installed: the runtime environment's py_modules carries
# it to the job's driver and workers, and run.plugins imports it there (docs/development.md "Plugins").
PLUGIN_ARGS = ["method=plugdemo", f"run.plugins=[{PLUGIN_MODULE}]", "train.epochs=1", "run.name=plugin_job",
               "scaling.cpus_per_worker=1"]
SWEEP_ARGS = ["--space", "tune_spaces/mllt.yaml", "method=mllt", "train.epochs=1", "tune.num_samples=2",
              "scaling.cpus_per_worker=1", "run.name=sweep_job"]


def succeeded(jobs: dict[str, tuple[int, str]], name: str) -> str:
    rc, log = jobs[name]
    assert rc == 0 and "succeeded" in log, f"{name} job:\n{log[-5000:]}"
    return log


def test_train_job_submitted_with_the_readme_command(head, jobs, tmp_path):
    """Results under the given storage, the config load_config resolves locally, one progress line per
    epoch, the uploaded package (not the repository), TensorBoard scalars; the same command run locally
    (another working directory, a dead cluster's address file) gives the same numbers."""
    log = succeeded(jobs, "train")
    train_dir = head.storage / "train_job"
    args = [*TRAIN_ARGS, f"run.storage_path={head.storage}"]
    assert saved_config(train_dir / "config.yaml") == to_dict(load_config(None, args))
    assert re.findall(r"train_job \| epoch (\d)/2", log) == ["1", "2"]
    packages = set(re.findall(r"rayexperts \S+ from (\S+)", log))
    assert packages and all("runtime_resources" in p and not p.startswith(str(REPO)) for p in packages), packages

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(train_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"ensemble_pc/top1", "expert0/top1_many", "train/loss_mutual", "train/lr"} <= tags
    assert [e.step for e in events.Scalars("ensemble_pc/top1")] == [0, 1]

    started = time.time()
    local = local_run("train.py", [*TRAIN_ARGS, f"run.storage_path={tmp_path}"], cwd=tmp_path)
    print(f"\nlocal train: {time.time() - started:.0f} s")
    assert local.returncode == 0, local.stderr[-3000:]
    pd.testing.assert_frame_equal(metrics_of(tmp_path / "train_job"), metrics_of(train_dir))


def test_cbd_job_submitted_with_the_readme_command(head, jobs, cbd_job):
    """Teachers and student under the given storage, one progress line per epoch per run, and the numbers
    of the same job run on the local cluster (the session's ``cbd_job``)."""
    log = succeeded(jobs, "cbd")
    cbd_dir, (local_dir, _) = head.storage / "job", cbd_job
    assert saved_config(cbd_dir / "config.yaml") == to_dict(
        resolve_job_config(None, [*CBD_JOB, f"run.storage_path={head.storage}"]))
    for teacher in ("teacher0", "teacher1"):
        assert re.findall(rf"{teacher} \| epoch (\d+)/10", log) == [str(e) for e in range(1, 11)], log[-3000:]
    assert len(re.findall(r"student \| epoch 1/1", log)) == 1
    for run in ("teachers/teacher0", "teachers/teacher1", "student"):
        assert list((cbd_dir / run).glob("checkpoint_*"))
        pd.testing.assert_frame_equal(metrics_of(local_dir / run), metrics_of(cbd_dir / run))


def test_sweep_job_submitted_with_the_readme_command(head, jobs):
    succeeded(jobs, "sweep")
    sweep_dir = head.storage / "sweep_job"
    local_sweep = resolve_sweep_config(None, [*SWEEP_ARGS[2:], f"run.storage_path={head.storage}"])
    assert saved_config(sweep_dir / "sweep.yaml")["config"] == to_dict(local_sweep)
    assert len(pd.read_parquet(sweep_dir / "trials.parquet")) == 2 and (sweep_dir / "best.yaml").is_file()


def test_an_upload_without_the_presets_stops_with_a_clear_error(head, jobs):
    rc, out = jobs["no_presets"]
    assert rc != 0, out[-3000:]
    assert re.search(r"error: the rayexperts package imported from \S+ is incomplete: rayexperts/presets missing", out)
    assert "anchor patterns" in out
    assert not (head.storage / "never").exists()


def test_a_plugin_package_is_carried_by_py_modules(head, jobs):
    """A plugin method trains on the cluster when the package is not installed there: ``py_modules`` uploads
    it, ``run.plugins`` imports it in the job's driver and in the run's actor."""
    assert subprocess.run([sys.executable, "-m", "pip", "show", PLUGIN_PACKAGE], capture_output=True).returncode != 0
    log = succeeded(jobs, "plugin")
    run = head.storage / "plugin_job"
    assert saved_config(run / "config.yaml")["run"]["plugins"] == [PLUGIN_MODULE]
    assert sorted(pd.read_parquet(run / "metrics.parquet")["view"].unique()) == ["ensemble", "expert0", "expert1"]
    assert re.findall(r"plugin_job \| epoch (\d)/1", log) == ["1"]
