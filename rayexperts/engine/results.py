"""The run directory (INTERFACES.md): ``config.yaml``, ``metrics.parquet``, ``classes.parquet``.

Paths may be local or any URI pyarrow understands (``s3://``, ``gs://``), like Ray Train's
``storage_path``. Every file is written to a temporary name and moved into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayexperts.config import absolute_path_or_uri, is_uri

METRIC_COLUMNS = ["epoch", "view", "top1", "top1_many", "top1_medium", "top1_few", "ece", "timestamp"]
CLASS_COLUMNS = ["epoch", "view", "class_id", "class_name", "train_count", "shot_group", "accuracy"]


def resolve_storage(storage_path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    if is_uri(storage_path):
        return pafs.FileSystem.from_uri(storage_path)
    return pafs.LocalFileSystem(), absolute_path_or_uri(storage_path)


def storage_uri(storage_path: str) -> str:
    """The storage path as Ray Train wants it: an absolute local path or the URI unchanged."""
    return absolute_path_or_uri(storage_path)


class RunFiles:
    """Reads and writes one run directory ``storage_path/name``."""

    def __init__(self, storage_path: str, name: str) -> None:
        self.fs, base = resolve_storage(storage_path)
        self.path = f"{base.rstrip('/')}/{name}"
        self.fs.create_dir(self.path, recursive=True)

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._file(name)).type != pafs.FileType.NotFound

    def _atomic_write(self, name: str, data: bytes) -> None:
        tmp = self._file(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._file(name))

    def write_text(self, name: str, text: str) -> None:
        self._atomic_write(name, text.encode())

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self._file(name)) as f:
            return f.read().decode()

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
        self._atomic_write(name, buf.getvalue())

    def read_table(self, name: str) -> pd.DataFrame | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_file(self._file(name)) as f:
            return pq.read_table(f).to_pandas()


class ResultWriter:
    """Accumulates per-epoch rows on rank 0 and rewrites the Parquet tables after each evaluation.

    On resume, rows of epochs at or after ``start_epoch`` (written after the checkpoint the run
    resumed from) are dropped, so the tables end with exactly one row per (epoch, view).
    """

    def __init__(self, files: RunFiles, start_epoch: int = 0) -> None:
        self.files = files
        self.metrics: list[dict[str, Any]] = []
        old = files.read_table("metrics.parquet")
        if old is not None and start_epoch > 0:
            self.metrics = old[old["epoch"] < start_epoch].to_dict("records")

    def add(self, rows: list[dict[str, Any]], classes: pd.DataFrame) -> None:
        """Append one evaluation's rows; ``classes`` (latest evaluation, per class × view) replaces the old."""
        self.metrics.extend(rows)
        df = pd.DataFrame(self.metrics)
        df["epoch"] = df["epoch"].astype("int64")
        self.files.write_table("metrics.parquet", df)
        self.files.write_table("classes.parquet", classes)
