"""Benchmark (not a test): one fine-tuning step of a timm ViT through the project against a hand-written loop.

    python jobs/bench_finetune.py [--modes full,lora,adaptformer] [--model timm/vit_tiny_patch16_224]
        [--image-size 64] [--timm-kwargs '{patch_size: 8}'] [--batch 32] [--steps 10] [--warmup 3] [--rounds 3]
        [--threads 1] [--device cpu|cuda] [--out DIR] [key=value ...]
    # on a GPU (issue 38 item 9): ViT-B/16 at 224, bf16 autocast (train.amp, on by default)
    python jobs/bench_finetune.py --device cuda --model timm/vit_base_patch16_224 --image-size 224 --timm-kwargs '{}' \\
        --batch 64 --steps 20 --warmup 5

Per ``model.finetune`` mode, images/s and peak memory of the same training step done two ways, on the same
architecture (random weights) and the same fixed batch of random images, already on the device (the data pipeline is
not timed):

* ``project``: the engine's own step: a :class:`~rayexperts.engine.run.Run` of ``method=ce`` (the model built by
  the project from ``model.backbone`` and ``model.finetune``, its optimizer without the frozen parameters: AdamW,
  ``train.compile=off``) and :func:`~rayexperts.engine.loop.train_one_epoch` over the batch repeated, as a run does;
* ``hand``: ``timm.create_model(num_classes=C)`` with LoRA (rank 8, alpha 8, on every block's ``attn.qkv`` and
  ``attn.proj``) or AdaptFormer adapters (width 64, scale 0.1, parallel to each block's MLP) written here in
  plain torch, the rest frozen, ``torch.optim.AdamW`` over the trainable parameters, and the loop ``forward,
  cross_entropy, zero_grad, backward, step`` (under bf16 autocast on CUDA unless ``--no-amp``).

Both sides must count the same trainable and total parameters (checked). Speed: one process per mode holds both
sides, warms each up, then times ``--rounds`` rounds of ``--steps`` steps, the sides alternating (and which goes
first alternating), so that both see the same machine; the median round counts. On the CPU images/s are per CPU
second of the process (``time.process_time``; one torch thread by default), which a machine shared with other jobs
leaves comparable (wall-clock images/s are in ``bench_finetune_rounds.parquet`` too); on CUDA per wall second.
Peak memory: each side alone in a fresh process, over ``--warmup`` + ``--steps`` steps: on CUDA
``torch.cuda.max_memory_allocated`` (weights included), on the CPU the growth of the resident set (its peak reset
through ``/proc/self/clear_refs`` first; Linux). Prints a table with ``ratio`` = project / hand images/s (issue 38
asks >= 0.95) and writes ``DIR/bench_finetune.parquet``. Extra ``key=value`` overrides go to the project's config
(e.g. ``model.channels_last=off``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = {"rank": 8, "alpha": 8.0}  # the project's defaults (model.lora_rank, model.lora_alpha, targets qkv, proj)
ADAPTER = {"width": 64, "scale": 0.1}  # model.adapter_width, model.adapter_scale
LR, WEIGHT_DECAY = 1e-3, 0.05


# ------------------------------------------------------------------------------------------------ the hand loop

def hand_model(args: argparse.Namespace, mode: str):
    """timm's model with its own classifier, adapted and frozen here, independently of ``rayexperts.models``."""
    import math

    import timm
    import torch
    from torch import nn

    class LoRA(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base, self.scale = base, LORA["alpha"] / LORA["rank"]
            self.a = nn.Parameter(torch.empty(LORA["rank"], base.in_features))
            self.b = nn.Parameter(torch.zeros(base.out_features, LORA["rank"]))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

        def forward(self, x):
            return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale

    class WithAdapter(nn.Module):
        def __init__(self, mlp: nn.Module, dim: int) -> None:
            super().__init__()
            self.mlp, self.down, self.up = mlp, nn.Linear(dim, ADAPTER["width"]), nn.Linear(ADAPTER["width"], dim)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return self.mlp(x) + self.up(torch.relu(self.down(x))) * ADAPTER["scale"]

    model = timm.create_model(args.model.removeprefix("timm/"), num_classes=args.classes, **args.kwargs)
    if mode != "full":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        for block in model.blocks:
            if mode == "lora":
                block.attn.qkv, block.attn.proj = LoRA(block.attn.qkv), LoRA(block.attn.proj)
            else:
                block.mlp = WithAdapter(block.mlp, block.mlp.fc1.in_features)
    return model


def hand_steps(args: argparse.Namespace, mode: str, device, x, y):
    """(model, step function) of the hand-written loop."""
    import contextlib

    import torch
    import torch.nn.functional as F

    model = hand_model(args, mode).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    amp = device.type == "cuda" and args.amp

    def steps(n: int) -> float:
        loss = None
        for _ in range(n):
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.item())

    return model, steps


# ------------------------------------------------------------------------------------------------ the project

def write_folder(root: Path, classes: int, size: int) -> None:
    """An ``imagefolder`` of one flat-coloured image per class in train and test (the Run needs a data set; the
    timed batch is the random one)."""
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size, size), (c % 256, 0, 0)).save(root / split / f"c{c:03d}" / "0.png")


def project_steps(args: argparse.Namespace, mode: str, device, x, y, data_root: str):
    """(model, step function) of the engine: a Run of method=ce and its own epoch loop over the batch."""
    from rayexperts.config import load_config
    from rayexperts.engine.loop import train_one_epoch
    from rayexperts.engine.run import Run

    kwargs = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in args.kwargs.items()) + "}"
    cfg = load_config(None, [
        "method=ce", "data.name=imagefolder", f"data.root={data_root}", "data.imbalance_type=none",
        "data.val_per_class=0", f"data.image_size={args.image_size}", "data.num_workers=0", "data.cache=off",
        f"model.backbone={args.model}", f"model.timm_kwargs={kwargs}", f"model.finetune={mode}",
        "train.optimizer=adamw", f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}", "train.warmup_epochs=0",
        f"train.batch_size={args.batch}", "train.compile=off", f"train.amp={str(args.amp).lower()}",
        f"scaling.use_gpu={str(device.type == 'cuda').lower()}", "run.verbose=false", *args.overrides])
    run = Run(cfg, 0, 1, device)
    epoch = [0]

    def steps(n: int) -> float:
        out = train_one_epoch(run.method, run.model, run.optimizer, [(x, y)] * n, epoch[0], run.lr_at, run.opts)
        epoch[0] += 1
        return float(out["loss"])

    return run.model, steps


# ------------------------------------------------------------------------------------------------ measurements

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _setup(args: argparse.Namespace, mode: str, impl: str, data_root: str):
    """(model, steps) of one side, on the fixed batch of ``args``' size (seed 0)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    if impl == "project":
        return project_steps(args, mode, device, x, y, data_root)
    return hand_steps(args, mode, device, x, y)


def _clock(device) -> tuple[float, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def measure_speed(args: argparse.Namespace, mode: str, data_root: str) -> list[dict]:
    """Both sides in this process, warmed up, then ``--rounds`` rounds of ``--steps`` steps each, the two sides
    alternating (and which goes first alternating), so that both see the same machine."""
    import torch

    device = torch.device(args.device)
    sides = {impl: _setup(args, mode, impl=impl, data_root=data_root) for impl in ("project", "hand")}
    rows = []
    for impl, (model, steps) in sides.items():
        steps(args.warmup)
        rows.append({"impl": impl, "round": -1, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "total": sum(p.numel() for p in model.parameters())})
    for r in range(args.rounds):
        for impl in ("project", "hand") if r % 2 == 0 else ("hand", "project"):
            t0, c0 = _clock(device)
            sides[impl][1](args.steps)  # ends with the loss's .item()
            t1, c1 = _clock(device)
            images = args.steps * args.batch
            rows.append({"impl": impl, "round": r, "images_per_sec": images / (t1 - t0),
                         "images_per_cpu_sec": images / (c1 - c0)})
    return rows


def measure_memory(args: argparse.Namespace, impl: str, mode: str, data_root: str) -> float:
    """Peak MB of one side alone in this process over ``--warmup`` + ``--steps`` steps."""
    import torch

    device = torch.device(args.device)
    _model, steps = _setup(args, mode, impl=impl, data_root=data_root)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start_kb = _status_kb("VmRSS")
    steps(args.warmup + args.steps)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (_status_kb("VmHWM") - start_kb) / 1024


# ------------------------------------------------------------------------------------------------ main

def parse(argv: list[str] | None) -> argparse.Namespace:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="full,lora,adaptformer")
    p.add_argument("--model", default="timm/vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--timm-kwargs", default="{patch_size: 8}", help="timm.create_model kwargs (YAML), both sides")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA (train.amp=false)")
    p.add_argument("--out", default=None)
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # a child process: speed|memory IMPL MODE DATA
    p.add_argument("overrides", nargs="*", help="key=value for the project's config")
    args = p.parse_args(argv)
    args.kwargs = dict(yaml.safe_load(args.timm_kwargs) or {})
    args.kwargs["img_size"] = args.image_size
    return args


def _child(argv: list[str], *one: str):
    """Run ``--one *one`` in a fresh process; its result."""
    done = subprocess.run([sys.executable, __file__, *argv, "--one", *one], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = next((s for s in done.stdout.splitlines() if s.startswith("RESULT ")), None)
    if done.returncode or line is None:
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(one[:-1])} failed (exit {done.returncode})")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.one:
        what, impl, mode, data = args.one
        result = measure_speed(args, mode, data) if what == "speed" else measure_memory(args, impl, mode, data)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import pandas as pd

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-finetune-"))
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(out / "folder")
    write_folder(Path(data_root), args.classes, args.image_size)
    # on the CPU (a machine others share) per CPU second of the process: the work, not the waiting for a core
    rate = "images_per_sec" if args.device == "cuda" else "images_per_cpu_sec"
    rows, summary = [], []
    for mode in args.modes.split(","):
        speed = pd.DataFrame(_child(argv, "speed", "-", mode, data_root)).assign(mode=mode)
        counts = speed[speed["round"] == -1].set_index("impl")
        if counts.loc["project", "trainable"] != counts.loc["hand", "trainable"] or \
                counts.loc["project", "total"] != counts.loc["hand", "total"]:
            raise SystemExit(f"{mode}: the two sides differ in parameters (trainable, total): "
                             f"{counts[['trainable', 'total']].to_dict('index')}")
        timed = speed[speed["round"] >= 0]
        ips = timed.groupby("impl")[rate].median()
        peak = {impl: _child(argv, "memory", impl, mode, data_root) for impl in ("project", "hand")}
        rows.append(timed)
        summary.append({"mode": mode, "trainable": int(counts.loc["project", "trainable"]),
                        "project_img_s": round(ips["project"], 1), "hand_img_s": round(ips["hand"], 1),
                        "ratio": round(ips["project"] / ips["hand"], 3),
                        "project_peak_mb": round(peak["project"], 1), "hand_peak_mb": round(peak["hand"], 1)})
        print(" ".join(f"{k}={v}" for k, v in summary[-1].items()), flush=True)
    pd.concat(rows).to_parquet(out / "bench_finetune_rounds.parquet", index=False)
    pd.DataFrame(summary).to_parquet(out / "bench_finetune.parquet", index=False)
    import torch

    where = (torch.cuda.get_device_name() if args.device == "cuda" else
             f"CPU, {os.cpu_count()} cores, {args.threads} torch thread(s)")
    print(f"\n{args.model} at {args.image_size}, timm kwargs {args.kwargs}, batch {args.batch}, {args.classes} classes, "
          f"median of {args.rounds} rounds of {args.steps} steps after {args.warmup}; {where}"
          + (", bf16 autocast" if args.device == "cuda" and args.amp else "") + f"; images/s: {rate}")
    print(pd.DataFrame(summary).to_string(index=False))
    print(f"\n{out / 'bench_finetune.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
