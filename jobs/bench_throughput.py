"""Benchmark (not a test): images/s of a training step per method and backbone,
(a) plain single-process PyTorch, (b) Ray Train with 1 worker, (c) Ray Train with 2 workers.

    python jobs/bench_throughput.py [--methods ce,mllt,ncl,ecl] [--backbones resnet8,resnet32]
        [--steps 30] [--warmup 5] [--data PARQUET] [--out runs/bench]

Uses CIFAR-10-LT IF 100 from ../shared/data/cifar10-jpeg.parquet when present, else digits-lt.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from rayexperts.config import load_config  # noqa: E402
from rayexperts.launch.bench import plain, through_ray  # noqa: E402
from rayexperts.launch.train import ensure_ray  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ce,mllt,ncl,ecl")
    p.add_argument("--backbones", default="resnet8,resnet32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("overrides", nargs="*", help="extra dotted config keys")
    args = p.parse_args()

    data = (
        ["data.name=cifar10-lt", f"data.root={args.data}", "data.imbalance_factor=100"]
        if Path(args.data).exists()
        else ["data.name=digits-lt"]
    )
    ensure_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    rows = []
    storage = tempfile.mkdtemp(prefix="rayexperts-bench-")
    for method in args.methods.split(","):
        for backbone in args.backbones.split(",") if Path(args.data).exists() else ["digitsnet"]:
            cfg = load_config(
                None,
                [f"method={method}", *data, f"model.backbone={backbone}", f"train.batch_size={args.batch_size}"]
                + list(args.overrides),
            )
            a = plain(cfg, args.warmup, args.steps, threads=cpus)
            b, b_wall = through_ray(cfg, args.warmup, args.steps, 1, storage)
            c, c_wall = through_ray(cfg, args.warmup, args.steps, 2, storage)
            row = {
                "method": method,
                "backbone": backbone,
                "plain_img_s": round(a, 1),
                "ray1_img_s": round(b, 1),
                "ray2_img_s": round(c, 1),
                "ray_overhead": round(1 - b / a, 4),
                "ray1_fit_s": round(b_wall, 1),
                "ray2_fit_s": round(c_wall, 1),
            }
            print(row, flush=True)
            rows.append(row)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "throughput.parquet", index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
