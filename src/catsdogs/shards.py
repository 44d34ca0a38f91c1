"""Shard files: one writer per shard and one reader shared by training, evaluation and transfer.

The writer is a context manager that publishes only complete files; :func:`open_shard` reads both
formats.

Two formats carry the same rows (uint8 NHWC pixels, int64 labels):

* ``npy`` (default): ``<split>/X_part_<i>.npy`` + ``y_part_<i>.npy``, memory-mapped when read.
* ``parquet``: ``<split>/part_<i>.parquet`` with columns ``path`` (string), ``split`` (string),
  ``label`` (int64) and ``pixels`` (binary, ``size*size*3`` bytes, row-major HWC), readable by Spark
  (``spark.read.parquet``) and pyarrow; read back one row group at a time, so memory stays bounded.

Files are written under temporary names and renamed on a clean exit, so a killed task never leaves
a shard that looks complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from catsdogs import schema
from catsdogs.errors import InputError, SchemaError
from catsdogs.fsutil import atomic_open
from catsdogs.manifest import ShardInfo

FORMATS: tuple[str, ...] = ("npy", "parquet")
"""Shard formats every reader understands."""

PARQUET_ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: the reader's unit of I/O (256 x 180x180x3 B = 25 MB at 180 px)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_paths(split: str, index: int) -> tuple[str, str]:
    """Return the X and y file names of an npy shard, relative to the shards root."""
    return (f"{split}/{schema.X_PATTERN.format(index=index)}",
            f"{split}/{schema.Y_PATTERN.format(index=index)}")


def parquet_path(split: str, index: int) -> str:
    """Return the file name of a Parquet shard, relative to the shards root."""
    return f"{split}/{schema.PARQUET_PATTERN.format(index=index)}"


def parquet_schema(size: int) -> Any:
    """Return the Arrow schema of a Parquet shard; the image size is kept in its metadata."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                      ("pixels", pa.binary())],
                     metadata={"catsdogs.size": str(size), "catsdogs.layout": schema.LAYOUT,
                               "catsdogs.dtype": schema.PIXEL_DTYPE})


class ShardWriter:
    """Collect rows of one shard and write its files (``fmt`` npy or parquet) on a clean exit.

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
        if self.fmt == "parquet":
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

        table = pa.table({"path": pa.array(self._paths, pa.string()),
                          "split": pa.array([self.split] * len(y), pa.string()),
                          "label": pa.array(y, pa.int64()),
                          "pixels": pa.array([a.tobytes() for a in self._x], pa.binary())},
                         schema=parquet_schema(self.size))
        with atomic_open(path, "wb") as fh:
            # Pixels are already compact uint8 and compress poorly; skip compression on them so
            # reading costs no CPU, but keep it on the small columns.
            pq.write_table(table, fh, row_group_size=PARQUET_ROW_GROUP_ROWS,
                           compression={"path": "zstd", "split": "zstd", "label": "zstd",
                                        "pixels": "none"})


class ParquetPixels:
    """Array-like view of a Parquet shard's pixels: ``x[a:b]`` and ``x[int_array]`` give uint8 NHWC.

    Reads only the row groups a request touches and keeps the last one decoded, so sequential
    reads cost one pass over the file and memory stays at one row group.
    """

    def __init__(self, path: Path, size: int) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self.shape = (int(meta.num_rows), size, size, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._cached: tuple[int, np.ndarray] | None = None
        written = (self._file.schema_arrow.metadata or {}).get(b"catsdogs.size")
        if written is not None and int(written) != size:
            raise SchemaError(f"Parquet shard {str(path)!r} holds {int(written)} px images, the manifest "
                              f"says {size}; re-run catsdogs preprocess")

    def __len__(self) -> int:
        return self.shape[0]

    def _group(self, g: int) -> np.ndarray:
        """Return row group ``g`` as ``(rows, H, W, 3)`` uint8 (cached until another is read)."""
        if self._cached is None or self._cached[0] != g:
            col = self._file.read_row_group(g, columns=["pixels"]).column("pixels")
            chunk = col.combine_chunks()
            raw = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)
            offsets = offsets[chunk.offset:chunk.offset + len(chunk) + 1]
            row = int(np.prod(self.shape[1:]))
            if len(chunk) and (np.any(np.diff(offsets) != row) or chunk.null_count):
                raise SchemaError(f"Parquet shard {str(self.path)!r} has pixel rows that are not "
                                  f"{row} bytes; re-run catsdogs preprocess")
            pixels = raw[offsets[0]:offsets[0] + row * len(chunk)].reshape(-1, *self.shape[1:])
            self._cached = (g, pixels)
        return self._cached[1]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            parts = []
            g = int(np.searchsorted(self._starts, start, side="right") - 1)
            pos = start
            while pos < stop:
                base = int(self._starts[g])
                end = min(stop, int(self._starts[g + 1]))
                parts.append(self._group(g)[pos - base:end - base])
                pos, g = end, g + 1
            if not parts:
                return np.zeros((0, *self.shape[1:]), dtype=np.uint8)
            # One row group: a read-only view, like a memory-map slice; callers copy what they keep.
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        idx = np.asarray(key)
        if idx.ndim == 0:
            return self[int(idx):int(idx) + 1][0]
        idx = np.where(idx < 0, idx + len(self), idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        groups = np.searchsorted(self._starts, idx, side="right") - 1
        for g in np.unique(groups):
            sel = np.nonzero(groups == g)[0]
            out[sel] = self._group(int(g))[idx[sel] - self._starts[g]]
        return out


def _read_parquet_labels(path: Path) -> np.ndarray:
    """Return the ``label`` column of a Parquet shard as int64 (reads only that column)."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["label"]).column("label").to_numpy().astype(np.int64)


def shard_size(root: str | Path, info: ShardInfo) -> int:
    """Return the image side of a shard from its header alone (npy shape or Parquet metadata)."""
    path = Path(root) / info.x
    try:
        if info.x.endswith(".parquet"):
            import pyarrow.parquet as pq

            return int(pq.read_schema(path).metadata[b"catsdogs.size"])
        return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SchemaError(f"cannot read the header of shard {str(path)!r} ({exc}); re-run "
                          f"catsdogs preprocess") from None


def open_shard(root: str | Path, info: ShardInfo, size: int, flag: str = "--data"
               ) -> tuple[np.ndarray | ParquetPixels, np.ndarray]:
    """Open one shard of either format: pixels as an array-like ``(n, size, size, 3)`` uint8, labels int64.

    npy pixels are memory-mapped (pages load as rows are read); Parquet pixels are read a row group
    at a time. A missing, unreadable or wrong-shaped shard raises InputError / SchemaError naming it.
    """
    root = Path(root)
    for rel in info.files():
        if not (root / rel).is_file():
            raise InputError(f"shard file {str(root / rel)!r} listed in the manifest is missing; "
                             f"re-run catsdogs preprocess or fix {flag}")
    x: np.ndarray | ParquetPixels
    try:
        if info.x.endswith(".parquet"):
            x = ParquetPixels(root / info.x, size)
            y = _read_parquet_labels(root / info.x)
        else:
            x = np.load(root / info.x, mmap_mode="r", allow_pickle=False)
            y = np.load(root / info.y, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError) as exc:
        raise SchemaError(f"cannot read shard {info.x!r} of {str(root)!r} ({exc}); re-run "
                          f"'catsdogs preprocess --overwrite --output {root}' or fix {flag}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (size, size, 3) or \
            x.shape[0] != info.rows or y.shape != (info.rows,):
        raise SchemaError(f"shard {info.x!r} of {str(root)!r} has shape {x.shape} {x.dtype} / labels "
                          f"{y.shape}, manifest says {info.rows} uint8 {(size, size, 3)} rows; "
                          f"re-run catsdogs preprocess")
    return x, np.asarray(y, dtype=np.int64)
