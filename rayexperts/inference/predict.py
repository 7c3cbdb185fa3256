"""``rayexperts predict RUN_DIR --input PATH --out FILE.parquet``: batch prediction on Ray Data.

The input is an image folder (every image file below it, sorted by path), a text file of image paths (one a line;
relative paths are relative to the file's folder) or a Parquet file with an ``image`` column of encoded images (its
other columns, e.g. ``id``, are carried through); local or any URI pyarrow reads. Reading, decoding and the run's
evaluation transform (:class:`~rayexperts.inference.load.Preprocess`) run in CPU tasks; the model
(:func:`~rayexperts.inference.load.load`) in a pool of ``--workers`` actors (``map_batches`` with a callable
class; a GPU each when the cluster has them), streaming, with Ray Data's progress bars. One output row per input,
in input order: the input's ``id`` column (or ``path``), ``label``, ``class_name``, ``prob``, ``topk_labels``,
``topk_probs``, ``error`` (empty unless the image could not be read, and then the prediction columns are null);
``--all-views`` adds ``logits_<view>`` for every view. The file is written under a temporary name and moved into
place when complete.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from rayexperts.config import is_uri
from rayexperts.data.errors import DataError

ERROR = "error"
DECODE_ROWS = 64  # images per decoding task
PIXELS = "__pixels"


def _fs(path: str):
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def list_input(path: str) -> tuple[str, list[str]]:
    """``("parquet", [file])`` or ``("paths", [image paths or URIs])`` of ``--input``; DataError when it does not
    exist or holds no image."""
    import pyarrow.fs as pafs

    from rayexperts.data.folders import IMAGE_SUFFIXES

    fs, local = _fs(path)
    info = fs.get_file_info(local)
    prefix = path.split("://", 1)[0] + "://" if is_uri(path) else ""
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"--input {path} does not exist")
    if info.type == pafs.FileType.Directory:
        found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(local, recursive=True))
                       if i.type == pafs.FileType.File and "." + i.base_name.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"--input {path}: no image file below it ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return "paths", [prefix + p for p in found]
    if local.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open_input_file(local) as f:
            names = pq.read_schema(f).names
        if "image" not in names:
            raise DataError(f"--input {path}: a Parquet input needs an 'image' column of encoded images; it has "
                            f"{', '.join(names)}")
        return "parquet", [path]
    with fs.open_input_stream(local) as f:
        lines = [s.strip() for s in f.read().decode().splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise DataError(f"--input {path}: the list file names no image")
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    out = []
    for line in lines:
        absolute = is_uri(line) or line.startswith("/")
        out.append(line if absolute else (f"{folder}/{line}" if is_uri(path) else str(_abs(folder, line))))
    return "paths", out


def _abs(folder: str, name: str):
    from pathlib import Path

    return (Path(folder).expanduser() / name).resolve()


def read_bytes(path: str) -> bytes:
    fs, local = _fs(path)
    with fs.open_input_stream(local) as f:
        return f.read()


class Decode:
    """CPU stage (a function, run as Ray tasks): each row's image (the ``image`` bytes or the file at ``path``) → the preprocessed pixels, or an
    ``error`` (and zeros) when it cannot be read or decoded."""

    def __init__(self, preprocess: Any, shape: tuple[int, ...]) -> None:
        self.preprocess, self.shape = preprocess, tuple(shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values())))
        pixels = np.zeros((n, *self.shape), dtype=np.float32)
        errors = np.full(n, "", dtype=object)
        for i in range(n):
            try:
                data = batch["image"][i] if "image" in batch else read_bytes(str(batch["path"][i]))
                if data is None:
                    raise ValueError("no image (null)")
                x = self.preprocess(bytes(data)).numpy()
                if x.shape != self.shape:
                    raise ValueError(f"preprocessed to {tuple(x.shape)}, the model takes {self.shape}")
                pixels[i] = x
            except Exception as e:  # noqa: BLE001 - any unreadable image becomes its row's error, never a crash
                errors[i] = _error_text(e)
        out = {k: v for k, v in batch.items() if k != "image"}
        out[PIXELS] = pixels
        out[ERROR] = errors
        return out


class Predictor:
    """The model stage (one per actor): the view's probabilities for the rows that decoded; nulls elsewhere."""

    def __init__(self, run_dir: str, view: str | None, checkpoint: str, top_k: int, all_views: bool,
                 threads: int, use_gpu: bool) -> None:
        import torch

        from rayexperts.inference.load import load

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_gpu and torch.cuda.is_available() \
            else torch.device("cpu")
        self.model = load(run_dir, view, checkpoint, device=self.device, every_view=all_views)
        self.top_k = min(int(top_k), len(self.model.classes))
        self.all_views = all_views

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        errors = batch[ERROR]
        ok = np.array([not e for e in errors], dtype=bool)
        n, k = len(errors), self.top_k
        probs = np.zeros((n, len(self.model.classes)), dtype=np.float32)
        views: dict[str, np.ndarray] = {}
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch[PIXELS][ok])).to(self.device, non_blocking=True)
            with torch.inference_mode():
                if self.all_views:
                    logits = self.model.all_views(x)
                    views = {name: z.cpu().numpy() for name, z in logits.items()}
                    main = logits[self.model.view]
                else:
                    main = self.model(x)
                probs[ok] = torch.softmax(main.float(), dim=1).cpu().numpy()
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(probs, order, axis=1)
        label = [int(order[i, 0]) if ok[i] else None for i in range(n)]
        columns: dict[str, Any] = {c: batch[c] for c in batch if c not in (PIXELS, ERROR)}
        table = {c: pa.array(list(v)) for c, v in columns.items()}
        table["label"] = pa.array(label, pa.int64())
        table["class_name"] = pa.array([self.model.classes[y] if y is not None else None for y in label], pa.string())
        table["prob"] = pa.array([float(top_p[i, 0]) if ok[i] else None for i in range(n)], pa.float32())
        table["topk_labels"] = pa.array([order[i].tolist() if ok[i] else None for i in range(n)], pa.list_(pa.int64()))
        table["topk_probs"] = pa.array([top_p[i].tolist() if ok[i] else None for i in range(n)], pa.list_(pa.float32()))
        for name in self.model.spec.views if self.all_views else []:
            rows, j = [], 0
            for i in range(n):
                rows.append(views[name][j].tolist() if ok[i] and views else None)
                j += int(ok[i])
            table[f"logits_{name}"] = pa.array(rows, pa.list_(pa.float32()))
        table[ERROR] = pa.array([str(e) for e in errors], pa.string())
        return pa.table(table)


def predict(run_dir: str, input_path: str, out: str, view: str | None = None, top_k: int = 5, workers: int = 1,
            checkpoint: str = "last", all_views: bool = False, batch_size: int = 256, cpus_per_worker: float = 1.0,
            decode_cpus: float = 1.0) -> dict[str, Any]:
    """Predict every image of ``input_path`` into ``out`` (Parquet, written atomically); returns the counts."""
    import time

    from rayexperts.inference.load import build, resolve

    if workers < 1 or top_k < 1 or batch_size < 1:
        raise DataError(f"--workers ({workers}), --top-k ({top_k}) and --batch-size ({batch_size}) must be >= 1")
    spec = resolve(run_dir, view, checkpoint)  # bad run, view or checkpoint: one line, before Ray starts
    kind, items = list_input(input_path)
    if not str(out).endswith(".parquet"):
        raise DataError(f"--out {out}: the output is a Parquet file (FILE.parquet)")
    module = build(spec)  # the checkpoint loads here (a mismatch fails before Ray starts) and gives the input shape
    preprocess = module.preprocess  # the run's own test view (a timm backbone's mean, std and crop included)
    shape = tuple(preprocess(_probe_image(preprocess)).shape)
    del module

    import ray
    import ray.data

    from rayexperts.launch.cluster import ensure_ray

    ensure_ray(dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order
    cpus = float(ray.cluster_resources().get("CPU", 0))
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus < 1 and workers * cpus_per_worker + decode_cpus > cpus:
        raise DataError(f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} model actors leave less than "
                        f"{decode_cpus:g} of this cluster's {cpus:g} CPUs for reading and decoding: lower them")
    if kind == "parquet":
        # blocks of DECODE_ROWS rows (streaming), whatever the file's row groups: the decoding tasks and the model
        # actors work on many blocks at once
        ds = ray.data.read_parquet(items[0], num_cpus=decode_cpus).repartition(target_num_rows_per_block=DECODE_ROWS)
    else:
        ds = ray.data.from_items([{"path": p} for p in items],
                                 override_num_blocks=max(1, min(-(-len(items) // DECODE_ROWS), 1000)))
    gpu_share = 0.0 if gpus < 1 else min(1.0, gpus / workers)
    ds = ds.map_batches(Decode(preprocess, shape), batch_size=DECODE_ROWS, batch_format="numpy", num_cpus=decode_cpus)
    ds = ds.map_batches(Predictor, fn_constructor_args=(spec.run.uri, spec.view, checkpoint, top_k, all_views,
                                                        max(1, round(cpus_per_worker)), gpu_share > 0),
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus_per_worker, num_gpus=gpu_share)
    started = time.perf_counter()
    rows, errors = write_parquet(ds, out)
    elapsed = time.perf_counter() - started
    return {"rows": rows, "errors": errors, "seconds": elapsed, "images_per_sec": rows / max(elapsed, 1e-9),
            "view": spec.view, "selection": spec.selection, "out": out}


def _probe_image(preprocess: Any):
    """A blank image of the run's channels, to learn the preprocessed shape."""
    from PIL import Image

    size = {"digits": 8, "cifar": 32}.get(preprocess.image_kind, preprocess.image_size)
    return Image.new("L" if preprocess.channels == 1 else "RGB", (size, size))


def write_parquet(ds: Any, out: str) -> tuple[int, int]:
    """Stream ``ds`` into ``out`` through a temporary file beside it, moved into place when complete."""
    import pyarrow.parquet as pq

    fs, local = _fs(out)
    folder = local.rsplit("/", 1)[0] if "/" in local else "."
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{local.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
    rows = errors = 0
    writer = None
    try:
        with fs.open_output_stream(tmp) as f:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if writer is None:
                    writer = pq.ParquetWriter(f, batch.schema)
                writer.write_table(batch)
                rows += batch.num_rows
                errors += sum(1 for e in batch.column(ERROR).to_pylist() if e)
            if writer is not None:
                writer.close()
        fs.move(tmp, local)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    return rows, errors


def _error_text(e: BaseException) -> str:
    """One line naming what failed (PIL's "cannot identify image file <_io.BytesIO ...>" without the object)."""
    text = str(e).split(" <_io.", 1)[0].splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:500]
