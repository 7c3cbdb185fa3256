"""Benchmark (not a test): images/s of a training step per method, backbone, data pipeline and
``train.compile`` setting, (a) in a plain process and (b) through Ray Train with 1 and 2 workers.

    python jobs/bench_throughput.py [--methods ce,mllt,ncl,ecl] [--backbones resnet8,resnet32]
        [--pipelines loader,device] [--runners plain,ray] [--compile off] [--steps 30] [--warmup 5]
        [--data PARQUET] [--out runs/bench] [--augments standard,randaugment_timm,...] [key=value ...]

``loader`` is the per-image DataLoader path (``data.cache=off``), ``device`` the data on the training
device with batched augmentation (``data.cache=device``). ``DIR/throughput.parquet``: one row per
(method, backbone, pipeline, compile) with ``plain_img_s``, ``pipeline_ms`` (the data pipeline alone per
batch: sampling, decoding, augmentation of every view, no model) and ``pipeline_share`` (its share of a
plain step), and, with the ray runner, ``ray1_img_s``,
``ray2_img_s``, ``ray_overhead``, ``ray1_fit_s``, ``ray2_fit_s``. Uses CIFAR-10-LT IF 100 from
the CIFAR-10 Parquet file of ``--data`` when present, else digits-lt. With ``scaling.use_gpu=true`` on a
machine with CUDA, the plain runner times CUDA.

``--augments a,b,c`` times each ``data.augment`` preset alone, single-threaded, on random uint8 images:
the per-image transform (512 CIFAR 32x32 tensors, 64 ImageNet-sized 256x256 PIL images cropped to 224)
and its batched twin on the CPU (batches of 128 / 32), and writes ``DIR/augments.parquet`` (augment,
image_kind, per_image_img_s, batched_img_s) and a table. With ``--augments`` and no ``--methods``, only
the augmentations are timed.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from rayexperts.config import load_config  # noqa: E402
from rayexperts.diagnostics.bench import plain_run, through_ray, time_pipeline, time_steps  # noqa: E402

PIPELINES = {"loader": "off", "device": "device"}
# image kind -> (source side, training size, images timed per image, batch of the batched twin, batches timed)
AUGMENT_SIZES = {"cifar": (32, 32, 512, 128, 8), "imagenet": (256, 224, 64, 32, 4)}


def time_augments(augments: list[str], seed: int = 0) -> pd.DataFrame:
    """Images/s of each augmentation preset per image (``build_transform``) and batched on the CPU
    (``batch_transform``), one thread, after one untimed warm-up call each."""
    import time

    import torch
    from torchvision.transforms.v2 import functional as TF

    from rayexperts.data.augment.batched.core import BatchRng
    from rayexperts.data.augment.batched.pipelines import batch_transform
    from rayexperts.data.augment.per_image import build_transform

    torch.set_num_threads(1)
    rows = []
    for augment in augments:
        for kind, (side, size, n, batch, batches) in AUGMENT_SIZES.items():
            gen = torch.Generator().manual_seed(seed)
            images = torch.randint(0, 256, (n, 3, side, side), generator=gen, dtype=torch.uint8)
            inputs = list(images) if kind == "cifar" else [TF.to_pil_image(i) for i in images]
            per_image = build_transform(kind, augment, True, size)
            per_image(inputs[0])
            start = time.perf_counter()
            for img in inputs:
                per_image(img)
            per_image_s = time.perf_counter() - start
            twin, rng = batch_transform(kind, augment, True, size), BatchRng(seed, torch.device("cpu"))
            x = torch.randint(0, 256, (batch, 3, side, side), generator=gen, dtype=torch.uint8)
            twin(x, rng)
            start = time.perf_counter()
            for _ in range(batches):
                twin(x, rng)
            batched_s = time.perf_counter() - start
            row = {"augment": augment, "image_kind": kind, "per_image_img_s": round(n / per_image_s, 1),
                   "batched_img_s": round(batch * batches / batched_s, 1)}
            print(row, flush=True)
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="default ce,mllt,ncl,ecl (none with --augments)")
    p.add_argument("--backbones", default="resnet8,resnet32")
    p.add_argument("--pipelines", default="loader,device")
    p.add_argument("--runners", default="plain,ray")
    p.add_argument("--compile", default="off", help="train.compile values to time, e.g. off,on")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the plain runner (0: all CPUs)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--augments", default="", help="data.augment presets to time alone, e.g. standard,randaugment_timm")
    p.add_argument("overrides", nargs="*", help="extra dotted config keys")
    args = p.parse_args()
    out = Path(args.out)
    if args.augments:
        table = time_augments(args.augments.split(","))
        out.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out / "augments.parquet", index=False)
        print(table.to_string(index=False))
        if args.methods is None:
            return 0
    args.methods = args.methods or "ce,mllt,ncl,ecl"
    runners = args.runners.split(",")
    pipelines = args.pipelines.split(",")
    unknown = [x for x in pipelines if x not in PIPELINES] + [x for x in runners if x not in ("plain", "ray")]
    if unknown:
        print(f"error: unknown pipeline or runner {', '.join(unknown)}", file=sys.stderr)
        return 2

    cifar = Path(args.data).exists()
    data = ["data.name=cifar10-lt", f"data.root={args.data}", "data.imbalance_factor=100"] if cifar else ["data.name=digits-lt"]
    threads = args.threads
    if "ray" in runners:
        import ray

        from rayexperts.launch.cluster import ensure_ray

        ensure_ray(dashboard=True)  # the ray runner is Ray Train
        threads = threads or int(ray.cluster_resources().get("CPU", 1))
    if not threads:
        import os

        threads = len(os.sched_getaffinity(0))
    rows = []
    storage = tempfile.mkdtemp(prefix="rayexperts-bench-")
    for method in args.methods.split(","):
        for backbone in args.backbones.split(",") if cifar else ["digitsnet"]:
            for pipeline in pipelines:
                for compiled in args.compile.split(","):
                    cfg = load_config(None, [f"method={method}", *data, f"model.backbone={backbone}",
                                             f"train.batch_size={args.batch_size}", f"data.cache={PIPELINES[pipeline]}",
                                             f"train.compile={compiled}", "run.verbose=false", *args.overrides])
                    row = {"method": method, "backbone": backbone, "pipeline": pipeline, "compile": compiled}
                    if "plain" in runners:
                        run = plain_run(cfg, threads)
                        pipeline_s = time_pipeline(run, args.warmup, args.steps)
                        ips = time_steps(run, args.warmup, args.steps)
                        row.update(plain_img_s=round(ips, 1), pipeline_ms=round(1000 * pipeline_s, 1),
                                   pipeline_share=round(pipeline_s * ips / args.batch_size, 3))
                    if "ray" in runners:
                        b, b_wall = through_ray(cfg, args.warmup, args.steps, 1, storage)
                        c, c_wall = through_ray(cfg, args.warmup, args.steps, 2, storage)
                        row.update(ray1_img_s=round(b, 1), ray2_img_s=round(c, 1), ray1_fit_s=round(b_wall, 1),
                                   ray2_fit_s=round(c_wall, 1))
                        if "plain_img_s" in row:
                            row["ray_overhead"] = round(1 - b / row["plain_img_s"], 4)
                    print(row, flush=True)
                    rows.append(row)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "throughput.parquet", index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
