"""Benchmark (not a test): an independent plain single-process CE loop, the yardstick for the engine.

    python jobs/bench_reference_ce.py [--data PARQUET] [--epochs 15] [--threads 2]

A careful hand-written loop: CIFAR-10-LT IF 100 from the Parquet file (the same split the engine uses)
held in memory as uint8, a CIFAR ResNet-8 written out here (not the package's model: option-B
projection shortcuts, in channels_last), SGD lr 0.1 momentum 0.9 wd 5e-4, batch 128, cosine per step,
a pad-4 crop and a flip drawn per image, done on the whole batch by index arithmetic. Prints per epoch
the training seconds and images/s and top-1 with and without PC softmax, to compare with

    python jobs/train.py method=ce data.name=cifar10-lt data.root=PARQUET data.imbalance_factor=100 \\
        model.backbone=resnet8 train.epochs=15 train.batch_size=128 train.lr=0.1 train.schedule=cosine
"""

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from rayexperts.config import load_config  # noqa: E402
from rayexperts.data import build_dataset  # noqa: E402

MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
STD = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        same = stride == 1 and cin == cout
        self.short = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


def resnet8(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def stack(source) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([source[i][0] for i in range(len(source))]), torch.as_tensor(source.labels)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = load_config(None, ["data.name=cifar10-lt", f"data.root={args.data}", "data.imbalance_factor=100"])
    data = build_dataset(cfg.data)
    (xtr, ytr), (xte, yte) = stack(data.train), stack(data.test)
    norm = lambda x: (x.float() / 255 - MEAN) / STD  # noqa: E731
    log_prior = torch.bincount(ytr, minlength=data.num_classes).float().div(len(ytr)).log()

    net, batch = resnet8(data.num_classes).to(memory_format=torch.channels_last), 128
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * (len(ytr) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for epoch in range(args.epochs):
        net.train()
        start, perm = time.time(), torch.randperm(len(ytr))
        for k in range(len(ytr) // batch):
            idx = perm[k * batch : (k + 1) * batch]
            top, left = torch.randint(0, 9, (2, batch))  # a crop offset and a flip per image
            flip = torch.rand(batch) < 0.5
            cols = left[:, None] + torch.arange(32)
            cols = torch.where(flip[:, None], left[:, None] + 31 - torch.arange(32), cols)
            rows = top[:, None] + torch.arange(32)
            padded = F.pad(xtr[idx], (4, 4, 4, 4)).permute(0, 2, 3, 1)
            x = padded[torch.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            x = norm(x).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        seconds = time.time() - start
        net.eval()
        right = right_pc = 0
        with torch.no_grad():
            for k in range(0, len(yte), 256):
                z, y = net(norm(xte[k : k + 256]).contiguous(memory_format=torch.channels_last)), yte[k : k + 256]
                right += (z.argmax(1) == y).sum().item()
                right_pc += ((z - log_prior).argmax(1) == y).sum().item()
        images_s = (len(ytr) // batch) * batch / seconds
        print(f"epoch {epoch + 1}/{args.epochs} | train {seconds:.1f} s | {images_s:.0f} img/s | "
              f"top1 {100 * right / len(yte):.2f}% | pc {100 * right_pc / len(yte):.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
