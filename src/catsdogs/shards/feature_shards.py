"""Feature shards: a split's backbone features as Parquet files on disk, read one shard at a time.

The Spark feature pass writes one per image shard (:mod:`catsdogs.cluster.shardjob`) when its features
are too many to collect. Features are stored as float16: half the bytes of float32, and the head fitted
on them is as accurate (docs/benchmarks/head_memory.md). :class:`StreamedFeatures` reads them back as
consecutive chunks, so a head, a detector or a benchmark can pass over millions of rows with one
shard's rows in memory.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catsdogs.io import storage
from catsdogs.io.atomic import atomic_open

STORED_FLOAT = np.float16
"""dtype of 2-D float arrays (the features) on disk; they are read back as float32."""
CHUNK_ROWS = 8192
"""Rows per chunk when an in-memory array is passed over as chunks: ~80 MB of float32 at 2,560 wide."""

Arrays = dict[str, np.ndarray]


def write_feature_shard(path: str, arrays: Arrays) -> None:
    """Write one shard's arrays as Parquet (2-D float arrays as fixed-size float16 lists), atomically."""
    import pyarrow as pa  # lazy: only the feature shards need it
    import pyarrow.parquet as pq

    cols = {}
    for name, a in arrays.items():
        if a.ndim == 2:
            flat = a.astype(STORED_FLOAT) if a.dtype.kind == "f" else a
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), a.shape[1])
        else:
            cols[name] = pa.array(a)
    table = pa.table(cols)
    # Features barely compress, and reading them back is every head pass: no codec and no dictionary,
    # so a read is a copy and nothing is decoded.
    options = {"compression": "none", "use_dictionary": False}
    if storage.is_remote(path):
        with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
            pq.write_table(table, tmp.name, **options)
            storage.upload(tmp.name, path)
        return
    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh, **options)


def read_feature_shard(path: str, columns: Sequence[str] | None = None) -> Arrays:
    """Read a feature shard's arrays (``columns`` only, when given); 2-D float arrays come back float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    table = pq.read_table(source, columns=list(columns) if columns is not None else None)
    out: Arrays = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            a = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            out[name] = _float32(a) if a.dtype.kind == "f" else a
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _float32(a: np.ndarray) -> np.ndarray:
    """float16 to float32 through torch's vectorised conversion, which is faster than numpy's scalar one."""
    import torch  # lazy: feature shards are read where torch is loaded anyway

    with warnings.catch_warnings():  # Arrow's buffer is read-only; the tensor is only read, never written
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


Part = tuple[str, str]
"""One feature shard's column: ``(file, column)``."""
PartFn = Callable[[np.ndarray, np.ndarray], Any]
"""Work on one part: its float32 rows and their int64 labels in, a small result out."""
PartMapper = Callable[[PartFn, Sequence[Part]], list[Any]]
"""Runs a :data:`PartFn` on every part and returns the results in part order (here, or as Spark tasks)."""


def part_arrays(path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """One part's rows (float32) and labels (int64): each feature shard carries its own labels."""
    arrays = read_feature_shard(path, [column, "labels"])
    return arrays[column], np.asarray(arrays["labels"], np.int64)


def map_here(fn: PartFn, parts: Sequence[Part]) -> list[Any]:
    """:data:`PartMapper` in this process, one part in memory at a time."""
    return [fn(*part_arrays(path, column)) for path, column in parts]


@dataclass(frozen=True)
class StreamedFeatures:
    """A split's features ``(rows, width)`` as a sequence of feature-shard columns, never all in memory.

    ``parts`` lists ``(file, column)`` in row order: each shard's ``features``, then (``--augment``) each
    shard's ``flipped``, the order :func:`catsdogs.train.features.extract_features` returns. ``mapper``
    runs per-part work (:meth:`map`): here by default, or on the executors that wrote the shards, so a
    pass over millions of rows reads them in parallel and sends back only each part's small result.
    """

    parts: tuple[Part, ...]
    rows: int
    width: int
    mapper: PartMapper = field(default=map_here, compare=False)

    def map(self, fn: PartFn) -> list[Any]:
        """``fn(rows, labels)`` of every part, in part order."""
        return self.mapper(fn, self.parts)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.width)

    def __len__(self) -> int:
        return self.rows

    def chunks(self) -> Iterator[np.ndarray]:
        """float32 chunks of consecutive rows, one feature shard each."""
        for path, column in self.parts:
            yield read_feature_shard(path, [column])[column]


def chunks_of(features: np.ndarray | StreamedFeatures, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Consecutive float32 row chunks of an in-memory array or of streamed features."""
    if isinstance(features, StreamedFeatures):
        yield from features.chunks()
        return
    for start in range(0, len(features), rows):
        yield np.asarray(features[start:start + rows], np.float32)


def take_rows(features: np.ndarray | StreamedFeatures, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (any order) as float32, in one pass over streamed features."""
    if not isinstance(features, StreamedFeatures):
        return np.asarray(features[index], np.float32)
    index = np.asarray(index, np.int64)
    out = np.zeros((len(index), features.width), np.float32)
    order = np.argsort(index)
    start = 0
    for chunk in features.chunks():
        lo, hi = np.searchsorted(index[order], [start, start + len(chunk)])
        out[order[lo:hi]] = chunk[index[order[lo:hi]] - start]
        start += len(chunk)
    return out
