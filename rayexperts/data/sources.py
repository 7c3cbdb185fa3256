"""Image sources: indexable ``(image, label)`` collections with a ``labels`` array.

``ArraySource`` holds decoded uint8 CHW images in memory (digits, CIFAR) and returns
uint8 tensors; ``FileSource`` and ``ParquetSource`` decode JPEG/PNG lazily with PIL
and return RGB PIL images. The transforms of :mod:`rayexperts.data.augment.per_image` accept both.
"""

from __future__ import annotations

import io
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rayexperts.data.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch


class ImageSource:
    """Base: ``len(src)``, ``src[i] -> (image, int label)``, ``src.labels`` (int64 ``[N]``)."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from (for error messages)."""
        return f"image {i}"

    def encoded(self, i: int) -> bytes:
        """Image ``i``'s file as bytes (JPEG, PNG, ...), for decoding elsewhere (``data.decode=device``)."""
        raise DataError(f"{type(self).__name__} holds decoded images: nothing to decode ({self.describe(i)})")


class ArraySource(ImageSource):
    """In-memory uint8 images ``[N, C, H, W]``; items are uint8 CHW tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, origin: str = "memory"):
        if len(images) != len(labels):
            raise DataError(f"{origin}: {len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.origin = origin

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torch import from_numpy

        return from_numpy(self.images[i]), int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"image {i} of {self.origin}"


def decode_image(data: bytes | str | Path, where: str) -> Image.Image:
    """Decode an image file or bytes to an RGB PIL image; a corrupt or missing one raises
    :class:`DataError` naming ``where``."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image file {where} does not exist") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {where}: {e}") from e


class FileSource(ImageSource):
    """Image files ``root / relative_path``, decoded lazily."""

    def __init__(self, root: str | Path, paths: list[str], labels: np.ndarray):
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return decode_image(self.root / self.paths[i], self.describe(i)), int(self.labels[i])

    def encoded(self, i: int) -> bytes:
        try:
            return (self.root / self.paths[i]).read_bytes()
        except FileNotFoundError as e:
            raise DataError(f"image file {self.describe(i)} does not exist") from e

    def describe(self, i: int) -> str:
        return f"'{self.root / self.paths[i]}'"


class ParquetSource(ImageSource):
    """Encoded images held as one Arrow binary array, decoded lazily; errors name the row."""

    def __init__(self, path: str | Path, images: pa.Array, rows: np.ndarray, labels: np.ndarray, column: str):
        self.path = str(path)
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)  # row numbers in the file
        self.labels = np.asarray(labels, dtype=np.int64)
        self.column = column

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        data = self.images[i].as_py()
        if data is None:
            raise DataError(f"{self.describe(i)} holds no image (null)")
        return decode_image(data, self.describe(i)), int(self.labels[i])

    def encoded(self, i: int) -> bytes:
        data = self.images[i].as_py()
        if data is None:
            raise DataError(f"{self.describe(i)} holds no image (null)")
        return data

    def describe(self, i: int) -> str:
        return f"row {self.rows[i]} (column '{self.column}') of '{self.path}'"


class SubsetSource(ImageSource):
    """The images ``indices`` of ``source``, in that order (a test distribution carved from the test split)."""

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(source.labels, dtype=np.int64)[self.indices]

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]

    def encoded(self, i: int) -> bytes:
        return self.source.encoded(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))


def subset(source: ImageSource, indices: np.ndarray) -> ImageSource:
    """``source`` restricted to ``indices``: in-memory images are sliced (the device cache reads them as one
    array), other sources wrapped."""
    if isinstance(source, ArraySource):
        return ArraySource(source.images[indices], source.labels[indices], source.origin)
    return SubsetSource(source, indices)
