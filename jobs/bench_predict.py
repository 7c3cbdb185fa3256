"""Benchmark ``rayexperts predict`` (Ray Data) against a hand-written torch loop over the same images, in one run.

    python jobs/bench_predict.py [--run RUN_DIR] [--data PARQUET] [--images N] [--workers 1,2] [--out DIR]

The images are the first N test images of a CIFAR-10 Parquet of JPEG bytes (default: ``../shared/data/
cifar10-jpeg.parquet`` beside the clone), written to a Parquet input with ``id`` and ``image`` columns. Without
``--run``, a one-epoch ``ce`` run of ResNet-8 on cifar10-lt (IF 100) is trained here first (its weights do not
change the speed). The loop: read the same Parquet, decode and preprocess each image with the run's
``Preprocess``, forward batches of ``--batch-size`` through ``rayexperts.load``'s module, softmax and top-k, in
this process with every torch thread. ``predict``: the command's own code path with 1 and 2 model actors
(``--cpus-per-worker``), decoding in Ray Data tasks (1 CPU); its time includes starting the actors and loading the model in each.
Prints one line per runner and writes ``bench_predict.parquet`` (runner, workers, images, seconds, images/s,
ratio to the loop) into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.parquet"


def train_run(data: str, storage: str) -> str:
    from rayexperts.config import load_config
    from rayexperts.engine.entry import train_one_worker
    from rayexperts.rundir import RunDir

    cfg = load_config(None, ["method=ce", "data.name=cifar10-lt", f"data.root={data}", "data.imbalance_factor=100",
                             "model.backbone=resnet8", "train.epochs=1", "train.batch_size=128", "run.verbose=false",
                             f"run.storage_path={storage}", "run.name=bench-ce"])
    run = RunDir.for_config(cfg)
    if run.latest_checkpoint() is None:
        run.write_config(cfg)
        train_one_worker(cfg, os.cpu_count() or 1)
    return run.uri


def write_input(data: str, n: int, path: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(data, columns=["split", "image"])
    test = table.filter(pc.equal(table["split"], "test")).slice(0, n)
    pq.write_table(pa.table({"id": [f"test{i}" for i in range(test.num_rows)], "image": test["image"]}), path)


def torch_loop(run_dir: str, path: str, batch_size: int, top_k: int) -> tuple[int, float, float, float]:
    """The hand-written baseline: the same reading, decoding, preprocessing, model and top-k in one process;
    (images, seconds, of which decoding and preprocessing, of which the model)."""
    import pyarrow.parquet as pq
    import torch

    from rayexperts.inference.load import load

    started = time.perf_counter()
    model = load(run_dir)
    rows, decode, forward = 0, 0.0, 0.0
    file = pq.ParquetFile(path)
    with torch.inference_mode():
        for batch in file.iter_batches(batch_size=batch_size, columns=["id", "image"]):
            t0 = time.perf_counter()
            x = torch.stack([model.preprocess(b) for b in batch.column("image").to_pylist()])
            t1 = time.perf_counter()
            probs = torch.softmax(model(x), dim=1)
            probs.topk(top_k, dim=1)
            forward += time.perf_counter() - t1
            decode += t1 - t0
            rows += len(x)
    return rows, time.perf_counter() - started, decode, forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run directory (default: train a one-epoch ResNet-8 ce run here)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a CIFAR-10 Parquet of JPEG bytes")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", default="1,2", help="model actor counts to time")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus-per-worker", type=float, default=0.0,
                        help="CPUs per model actor (0: min(1, (the cluster's CPUs - 1 for decoding) / workers))")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import pandas as pd
    import torch

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-predict-"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = args.run or train_run(args.data, str(out / "runs"))
    inp = str(out / "input.parquet")
    write_input(args.data, args.images, inp)
    rows = []
    n, seconds, decode, forward = torch_loop(run_dir, inp, args.batch_size, 5)
    base = n / seconds
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"torch loop: {n} images in {seconds:.2f} s = {base:.0f} images/s ({device}); decoding and preprocessing "
          f"{decode:.2f} s, the model {forward:.2f} s", flush=True)
    rows.append({"runner": "torch_loop", "workers": 0, "images": n, "seconds": seconds, "images_per_sec": base,
                 "ratio": 1.0})
    from rayexperts.inference.predict import predict
    from rayexperts.launch.cluster import ensure_ray

    ensure_ray(dashboard=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # The fixed cost of a predict call (the plan, one actor started and its model loaded, the first batch through,
    # the file moved into place): the same command over one batch of images.
    small = str(out / "small.parquet")
    write_input(args.data, args.batch_size, small)

    def one_batch(when: str) -> None:
        got = predict(run_dir, small, str(out / "pred-small.parquet"), top_k=5, workers=1,
                      batch_size=args.batch_size, cpus_per_worker=min(1.0, cpus - 1))
        print(f"predict over {got['rows']} images ({when}: its fixed cost): {got['seconds']:.2f} s", flush=True)
        rows.append({"runner": f"predict_one_batch_{when}", "workers": 1, "cpus_per_worker": min(1.0, cpus - 1),
                     "images": got["rows"], "seconds": got["seconds"], "images_per_sec": got["images_per_sec"],
                     "ratio": got["images_per_sec"] / base})

    one_batch("first call")
    for workers in [int(w) for w in args.workers.split(",") if w]:
        share = args.cpus_per_worker or min(1.0, (cpus - 1) / workers)
        got = predict(run_dir, inp, str(out / f"pred-{workers}.parquet"), top_k=5, workers=workers,
                      batch_size=args.batch_size, cpus_per_worker=share)
        ratio = got["images_per_sec"] / base
        print(f"predict, {workers} actor(s) of {share:g} CPU: {got['rows']} images in {got['seconds']:.2f} s = "
              f"{got['images_per_sec']:.0f} images/s ({ratio:.2f}x the loop)", flush=True)
        rows.append({"runner": "predict", "workers": workers, "cpus_per_worker": share, "images": got["rows"],
                     "seconds": got["seconds"],
                     "images_per_sec": got["images_per_sec"], "ratio": ratio})
    one_batch("warm")
    pd.DataFrame(rows).assign(device=device).to_parquet(out / "bench_predict.parquet")
    print(f"written: {out / 'bench_predict.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
