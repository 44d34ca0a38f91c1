"""The shard writer: one context manager per shard that publishes only complete files.

Two formats carry the same rows (uint8 NHWC pixels, int64 labels):

* ``npy`` (default): ``<split>/X_part_<i>.npy`` + ``y_part_<i>.npy``, memory-mapped when read.
* ``parquet``: ``<split>/part_<i>.parquet`` with columns ``path`` (string), ``split`` (string),
  ``label`` (int64) and ``pixels`` (binary, ``size*size*3`` bytes, row-major HWC), readable by Spark
  (``spark.read.parquet``) and pyarrow; read back one row group at a time, so memory stays bounded.
* ``jpeg`` / ``png``: the same table with each image's ``pixels`` encoded (JPEG at
  :data:`JPEG_QUALITY`, or lossless PNG), decoded by the reader: several times fewer bytes to store and
  move on a cluster, for a decode in the feature pass (docs/benchmarks/compact_shards.md).

Files are written under temporary names and renamed on a clean exit, so a killed task never leaves
a shard that looks complete.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from catsdogs import schema
from catsdogs.io.atomic import atomic_open
from catsdogs.io.checksum import sha256_file
from catsdogs.shards.manifest import ShardInfo

FORMATS = schema.SHARD_FORMATS
"""Shard formats every reader understands (defined in :mod:`catsdogs.schema`)."""

# pyarrow is imported inside the Parquet functions: ~0.75 s at import, and npy shards (the default)
# and the config, which imports FORMATS on every CLI start, never need it.
PARQUET_ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: the reader's unit of I/O (256 x 180x180x3 B = 25 MB at 180 px)."""


def shard_paths(split: str, index: int) -> tuple[str, str]:
    """Return the X and y file names of an npy shard, relative to the shards root."""
    return (f"{split}/{schema.X_PATTERN.format(index=index)}",
            f"{split}/{schema.Y_PATTERN.format(index=index)}")


def parquet_path(split: str, index: int) -> str:
    """Return the file name of a Parquet shard, relative to the shards root."""
    return f"{split}/{schema.PARQUET_PATTERN.format(index=index)}"


JPEG_QUALITY = 95
"""JPEG quality of ``jpeg`` shards, with full-resolution colour (4:4:4): the head's test accuracy on them
matches the raw shards' within the int8 guard's bound (docs/benchmarks/compact_shards.md)."""


PNG_LEVEL = 1
"""zlib level of ``png`` shards: the fastest, since photos compress little more at higher levels
(docs/benchmarks/compact_shards.md gives the size and the preprocess time)."""


def parquet_schema(size: int, encoding: str = "raw") -> Any:
    """Return the Arrow schema of a Parquet shard; the image size and encoding are kept in its metadata."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                      ("pixels", pa.binary())],
                     metadata={"catsdogs.size": str(size), "catsdogs.layout": schema.LAYOUT,
                               "catsdogs.dtype": schema.PIXEL_DTYPE, schema.ENCODING_KEY.decode(): encoding})


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """One uint8 HWC image as the bytes a ``pixels`` cell holds."""
    if encoding == "raw":
        return image.tobytes()
    import io

    from PIL import Image  # lazy: only encoded shards need it here

    buf = io.BytesIO()
    if encoding == "jpeg":
        Image.fromarray(image).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(image).save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


class ShardWriter:
    """Collect rows of one shard and write its files (``fmt``: one of :data:`FORMATS`) on a clean exit.

    Rows are kept as uint8 (size*size*3 bytes each); a shard of 1,500 64x64 images is ~18 MB.
    """

    def __init__(self, root: str | Path, split: str, index: int, size: int, num_classes: int,
                 fmt: str = "npy") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown shard format {fmt!r}; expected one of {FORMATS}")
        self.root = Path(root)
        self.split = split
        self.index = index
        self.size = size
        self.num_classes = num_classes
        self.fmt = fmt
        self._x: list[np.ndarray] = []
        self._y: list[int] = []
        self._paths: list[str] = []
        self.info: ShardInfo | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def add(self, image: np.ndarray, label: int, path: str = "") -> int:
        """Append one ``(size, size, 3)`` uint8 image; return its row index in the shard."""
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 {(self.size, self.size, 3)}, got {image.dtype} {image.shape}")
        self._x.append(image)
        self._y.append(int(label))
        self._paths.append(path)
        return len(self._y) - 1

    def __len__(self) -> int:
        return len(self._y)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            return  # nothing is published for a failed shard
        y = np.asarray(self._y, dtype=schema.LABEL_DTYPE)
        if self.fmt != "npy":
            rel = parquet_path(self.split, self.index)
            self._write_parquet(self.root / rel, y)
            x_rel = y_rel = rel
        else:
            x_rel, y_rel = shard_paths(self.split, self.index)
            x = (np.stack(self._x) if self._x else
                 np.zeros((0, self.size, self.size, 3), dtype=np.uint8))
            for rel, arr in ((x_rel, x), (y_rel, y)):
                with atomic_open(self.root / rel, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
        x_sha = sha256_file(self.root / x_rel)
        self.info = ShardInfo(
            index=self.index, split=self.split, rows=len(y), x=x_rel, y=y_rel,
            x_sha256=x_sha, y_sha256=x_sha if y_rel == x_rel else sha256_file(self.root / y_rel),
            class_counts=np.bincount(y, minlength=self.num_classes).astype(int).tolist(),
        )

    def _write_parquet(self, path: Path, y: np.ndarray) -> None:
        """Write the rows as one Parquet file in row groups of :data:`PARQUET_ROW_GROUP_ROWS`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        encoding = self.fmt if self.fmt in schema.ENCODED_FORMATS else "raw"
        table = pa.table({"path": pa.array(self._paths, pa.string()),
                          "split": pa.array([self.split] * len(y), pa.string()),
                          "label": pa.array(y, pa.int64()),
                          "pixels": pa.array([encode_image(a, encoding) for a in self._x], pa.binary())},
                         schema=parquet_schema(self.size, encoding))
        with atomic_open(path, "wb") as fh:
            # Pixels are already compact uint8 and compress poorly; skip compression on them so
            # reading costs no CPU, but keep it on the small columns.
            pq.write_table(table, fh, row_group_size=PARQUET_ROW_GROUP_ROWS,
                           compression={"path": "zstd", "split": "zstd", "label": "zstd",
                                        "pixels": "none"})
