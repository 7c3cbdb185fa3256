"""End to end through Ray Train (1 worker): every method writes a complete run directory."""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest

from helpers import quick_overrides
from rayexperts.config import load_config
from rayexperts.engine.results import METRIC_COLUMNS
from rayexperts.launch.train import final_table, run_training

pytestmark = pytest.mark.ray

# One Ray Train run per method costs ~20 s of start-up on 2 cores: MLLT, whose views (per expert, their
# ensemble, each with and without PC softmax) are the most; the other methods' run directories are written
# through the same code (tests/test_architecture.py trains a plug-in method, tests/test_cluster.py more).
CASES = {
    "mllt": ["expert0", "expert1", "expert2", "ensemble", "expert0_pc", "expert1_pc", "expert2_pc", "ensemble_pc"],
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_run_directory(ray_cluster, tmp_path, method):
    cfg = load_config(None, [f"method={method}", *quick_overrides(tmp_path, method, **{"train.epochs": 6})])
    out = run_training(cfg)
    run = tmp_path / "runs" / method
    assert out["path"] == str(run)
    assert (run / "config.yaml").exists()
    metrics = pd.read_parquet(run / "metrics.parquet")
    classes = pd.read_parquet(run / "classes.parquet")
    assert set(METRIC_COLUMNS) <= set(metrics.columns)
    assert {"class_id", "train_count", "shot_group", "view", "accuracy"} <= set(classes.columns)
    assert sorted(metrics["view"].unique()) == sorted(CASES[method])
    assert metrics.groupby(["epoch", "view"]).size().max() == 1 and metrics["epoch"].nunique() == 6
    assert {"loss", "lr", "images_per_sec"} <= set(metrics.columns)
    last = metrics[metrics["epoch"] == 5]
    assert (last["top1"] > 0.5).all(), last[["view", "top1"]]  # chance is 0.1
    assert all(0 <= v <= 1 for v in last["ece"]) and not math.isnan(last["top1_many"].iloc[0])
    assert set(classes["shot_group"]) <= {"many", "medium", "few"}
    assert len(classes) == 10 * len(CASES[method])
    table = final_table(metrics)
    assert list(table.columns) == ["Many", "Medium", "Few", "All"]
    assert list(run.glob("checkpoint_*/checkpoint.pt"))

    # The worker ran with its share of the 2-CPU cluster (cpus_per_worker=0): 2 torch threads, 1 worker.
    assert (metrics["torch_threads"] == 2).all() and (metrics["workers"] == 1).all()
    # Per class: the data set's names and training counts, its shot group, and accuracies that average
    # (300 test images, 30 per class) to the view's top-1.
    from rayexperts.data import build_dataset, shot_group

    data = build_dataset(cfg.data)
    final = classes[classes["epoch"] == 5]
    for view, rows in final.groupby("view"):
        rows = rows.sort_values("class_id")
        assert list(rows["class_name"]) == list(data.class_names) == [str(c) for c in range(10)]
        assert list(rows["train_count"]) == list(data.train_counts)
        assert list(rows["shot_group"]) == list(shot_group(data.train_counts, cfg.data.many_threshold,
                                                            cfg.data.few_threshold))
        assert rows["accuracy"].mean() == pytest.approx(last.set_index("view").loc[view, "top1"], abs=1e-9)
    # expert_kl* on the ensemble row only: the test-set mean, between the groups' means.
    kl = last.set_index("view")[["expert_kl", "expert_kl_many", "expert_kl_medium", "expert_kl_few"]]
    assert kl.drop(index="ensemble").isna().all().all()
    e = kl.loc["ensemble"]
    groups = e[["expert_kl_many", "expert_kl_medium", "expert_kl_few"]].dropna()
    assert (groups > 0).all() and groups.min() - 1e-12 <= e["expert_kl"] <= groups.max() + 1e-12


def test_throughput_benchmark_through_ray_train(ray_cluster, tmp_path):
    """The benchmark's Ray path returns the workers' images/s (Ray Train V2 keeps metrics only
    with a checkpoint; this broke once without a test)."""
    from rayexperts.diagnostics.bench import plain_run, through_ray, time_pipeline, time_steps

    cfg = load_config(None, ["method=ce", "data.name=digits-lt", "train.batch_size=64"])
    ips, wall = through_ray(cfg, warmup=0, steps=2, workers=1, storage=str(tmp_path))
    assert ips * wall >= 2 * 64  # the 2 timed steps of 64 images ran within the wall time
    started = time.perf_counter()
    ips = time_steps(plain_run(cfg, threads=1), warmup=1, steps=3)
    assert ips * (time.perf_counter() - started) >= 3 * 64
    run = plain_run(cfg, threads=1)  # the data pipeline alone: a part of the same steps
    started = time.perf_counter()
    per_batch = time_pipeline(run, warmup=1, steps=3)
    assert 0 < 3 * per_batch <= time.perf_counter() - started
    assert per_batch < 64 / time_steps(run, warmup=1, steps=3)


def test_a_multi_worker_run_trains_from_its_actor_through_ray_train(ray_cluster, tmp_path):
    """``train_in_parallel`` (CBD's teachers, a sweep's prerequisites) trains a multi-worker run from an
    actor that holds no CPU, through Ray Train: two workers of one thread each, one row per (epoch, view),
    a checkpoint, and the caller's config.yaml."""
    from rayexperts.launch.stages import train_in_parallel

    cfg = load_config(None, quick_overrides(tmp_path, "pair", **{"train.epochs": 1, "scaling.num_workers": 2,
                                                                 "scaling.cpus_per_worker": 1}))
    (outcome,) = train_in_parallel([cfg], "test")
    run = tmp_path / "runs" / "pair"
    assert outcome.status == "finished" and outcome.path == str(run)
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert (metrics["workers"] == 2).all() and (metrics["torch_threads"] == 1).all()
    assert metrics.groupby(["epoch", "view"]).size().eq(1).all() and metrics["epoch"].nunique() == 1
    assert list(run.glob("checkpoint_*/checkpoint.pt")) and load_config(run / "config.yaml").scaling.num_workers == 2
