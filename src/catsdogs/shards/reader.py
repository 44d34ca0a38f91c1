"""Shard readers: either format opened as array-likes, and in-order batches for forward-only passes.

npy pixels are memory-mapped (pages load as rows are read); Parquet pixels are read one row group at
a time. Training's shuffled stream (:mod:`catsdogs.train.stream`) and every forward-only pass
(evaluate, the frozen-backbone features, audit) read through :func:`open_shard`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.errors import InputError, SchemaError
from catsdogs.schema import ENCODING_KEY
from catsdogs.shards.manifest import Manifest, ShardInfo

# pyarrow.parquet is imported where a Parquet shard is opened (~0.75 s): npy shards never need it.


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
        meta_kv = self._file.schema_arrow.metadata or {}
        self.encoding = meta_kv.get(ENCODING_KEY, b"raw").decode()
        written = meta_kv.get(b"catsdogs.size")
        if written is not None and int(written) != size:
            raise SchemaError(f"Parquet shard {str(path)!r} holds {int(written)} px images, the manifest "
                              f"says {size}; re-run catsdogs preprocess")

    def __len__(self) -> int:
        return self.shape[0]

    def _group(self, g: int) -> np.ndarray:
        """Return row group ``g`` as ``(rows, H, W, 3)`` uint8 (cached until another is read)."""
        if self._cached is None or self._cached[0] != g:
            col = self._file.read_row_group(g, columns=["pixels"]).column("pixels")
            if self.encoding != "raw":
                self._cached = (g, self._decode(col.to_pylist()))
                return self._cached[1]
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

    def _decode(self, cells: list[bytes | None]) -> np.ndarray:
        """Decode a row group of JPEG/PNG cells to ``(rows, H, W, 3)`` uint8 (the one image decoder)."""
        from catsdogs.errors import ImageDecodeError
        from catsdogs.models.transforms import load_rgb  # lazy: npy and raw Parquet shards never decode

        out = np.empty((len(cells), *self.shape[1:]), dtype=np.uint8)
        for i, cell in enumerate(cells):
            try:
                img = load_rgb(cell or b"")
            except ImageDecodeError as exc:
                raise SchemaError(f"Parquet shard {str(self.path)!r} row {i} is not a readable "
                                  f"{self.encoding} image ({exc}); re-run catsdogs preprocess") from None
            if img.shape != self.shape[1:]:
                raise SchemaError(f"Parquet shard {str(self.path)!r} holds a {img.shape} image, the manifest "
                                  f"says {self.shape[1:]}; re-run catsdogs preprocess")
            out[i] = img
        return out

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


def split_limit(manifest: Manifest, split: str, max_rows: int | None = None) -> int:
    """Rows a pass over ``split`` reads: all of them, or its first ``max_rows`` (in shard order)."""
    rows = manifest.split_rows(split)
    return rows if max_rows is None else min(max_rows, rows)


def iter_batches(root: str | Path, manifest: Manifest, split: str, batch_size: int,
                 max_rows: int | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(shard position, first row, X uint8 NHWC, y int64)`` of ``split`` in order, per shard.

    Each batch is a writable copy of at most ``batch_size`` rows (torch wants writable memory), so
    memory stays at one batch whatever the split size. ``max_rows`` stops after the split's first rows
    (:func:`split_limit`): the one place a pass is cut short.
    """
    left = split_limit(manifest, split, max_rows)
    for pos, info in enumerate(manifest.split_shards(split)):
        if left <= 0:
            return
        x, y = open_shard(root, info, manifest.size)
        for start, xb, yb in shard_batches(x, y, batch_size, left):
            yield pos, start, xb, yb
        left -= len(y)


def shard_batches(x: np.ndarray | ParquetPixels, y: np.ndarray, batch_size: int, rows: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first row, X, y)`` of one opened shard, ``batch_size`` rows at a time (its first ``rows``).

    X is a writable uint8 copy (torch wants writable memory): one batch in memory, whatever the shard.
    """
    n = len(y) if rows is None else min(rows, len(y))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, np.array(x[start:stop]), np.asarray(y[start:stop])


def load_rows(root: str | Path, manifest: Manifest, split: str, shard: np.ndarray, row: np.ndarray
              ) -> np.ndarray:
    """Return the images at ``(shard position, row)`` pairs of ``split`` as uint8 NHWC."""
    infos = manifest.split_shards(split)
    out = np.zeros((len(row), manifest.size, manifest.size, 3), dtype=np.uint8)
    for i, (pos, r) in enumerate(zip(shard.tolist(), row.tolist(), strict=True)):
        x, _ = open_shard(root, infos[pos], manifest.size)
        out[i] = x[r]
    return out
