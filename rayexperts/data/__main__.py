"""``python -m rayexperts.data describe NAME [key=value ...]``: per-class train counts,
shot groups and split sizes of a data set; ``python -m rayexperts.data export-cifar10 OUT data.root=FILE.parquet``:
the Parquet file as the official ``cifar-10-batches-py`` pickles under ``OUT`` (docs/compare.md).
Bad input prints ``error: ...`` and exits 2."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rayexperts.config import load_config
from rayexperts.data.errors import DataError

if TYPE_CHECKING:
    from rayexperts.data.lt_dataset import LTDataset

USAGE = (
    "usage: python -m rayexperts.data describe NAME [key=value ...]\n"
    "       python -m rayexperts.data export-cifar10 OUT_DIR data.root=FILE.parquet [key=value ...]"
)
HELP = f"""{USAGE}

Per-class training counts, shot groups (many > 100, medium 20-100, few < 20 training images) and split sizes
of a data set, read as a training run would read it (its data.* keys, e.g. data.root=..., data.imbalance_factor=50).

data sets: digits-lt (embedded), cifar10-lt, cifar100-lt (data.root: the python pickles folder or a Parquet
file; data.download=true fetches the pickles), imagenet-lt, places-lt, inat2018 (data.root: the image folder,
and the published split files under it or data.train_split=...), imagefolder, parquet.

export-cifar10 writes OUT_DIR/cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta: the official
python format, as torchvision.datasets.CIFAR10 reads it) from a CIFAR-10 Parquet file, every row, decoded as
training decodes it, rows in the file's order (within a class by index_in_class): for running another code base
on the same pixels (docs/compare.md).

examples:
  python -m rayexperts.data describe digits-lt
  python -m rayexperts.data describe cifar10-lt data.root=/data/cifar10-jpeg.parquet data.imbalance_factor=100
  python -m rayexperts.data export-cifar10 /tmp/ldam/data data.root=/data/cifar10-jpeg.parquet"""


def describe(ds: LTDataset, many_threshold: int = 100, few_threshold: int = 20) -> str:
    """The text report: a per-class table, the shot-group sizes and the split sizes."""
    groups = ds.shot_groups(many_threshold, few_threshold)
    width = max(5, *(len(n) for n in ds.class_names))
    lines = [f"{ds.name}: {ds.num_classes} classes, image kind {ds.image_kind}", ""]
    lines.append(f"{'class':>5}  {'name':<{width}}  {'train':>7}  group")
    for c, (name, n, g) in enumerate(zip(ds.class_names, ds.train_counts, groups)):
        lines.append(f"{c:>5}  {name:<{width}}  {n:>7}  {g}")
    lines += [
        "",
        f"shot groups (many > {many_threshold}, few < {few_threshold}):",
        f"{'group':<6}  {'classes':>7}  {'images':>8}",
    ]
    for g in ("many", "medium", "few"):
        in_group = groups == g
        lines.append(f"{g:<6}  {int(in_group.sum()):>7}  {int(ds.train_counts[in_group].sum()):>8}")
    ratio = ds.train_counts.max() / ds.train_counts.min()
    val = len(ds.val) if ds.val is not None else 0
    lines += ["", f"splits: train {len(ds.train)}  val {val}  test {len(ds.test)}  (imbalance ratio {ratio:.1f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args) or args == ["help"]:
        print(HELP)
        return 0
    if len(args) < 2 or args[0] not in ("describe", "export-cifar10"):
        print(f"error: expected 'describe NAME' or 'export-cifar10 OUT_DIR'\n{USAGE}", file=sys.stderr)
        return 2
    if args[0] == "export-cifar10":
        return export_cifar10_main(args[1], args[2:])
    cfg = load_config(None, [f"data.name={args[1]}", *args[2:]])
    from rayexperts.data.datasets import build_dataset  # torch: only once the config is valid

    ds = build_dataset(cfg.data)
    print(describe(ds, cfg.data.many_threshold, cfg.data.few_threshold))
    return 0


def export_cifar10_main(out_dir: str, keys: list[str]) -> int:
    """``export-cifar10 OUT_DIR data.root=FILE.parquet [key=value ...]`` (the ``data.*`` column names apply)."""
    cfg = load_config(None, ["data.name=cifar10-lt", *keys])
    if not cfg.data.root or not str(cfg.data.root).endswith(".parquet"):
        raise DataError(f"export-cifar10 reads a Parquet file: pass data.root=<file>.parquet (got {cfg.data.root!r})")
    from rayexperts.data.cifar_export import export_cifar10  # torch: only once the config is valid

    folder = export_cifar10(cfg.data, out_dir)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":  # `rayexperts data ...`: rayexperts.cli.main maps errors to exit statuses
    import runpy

    sys.argv[1:1] = ["data"]
    runpy.run_module("rayexperts.cli", run_name="__main__")
