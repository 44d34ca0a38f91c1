"""Shard writing: one writer per shard, a context manager that publishes only complete files.

Used by the Spark tasks in :mod:`catsdogs.preprocess` (each task writes its own shard set) and by
tests that need shards without Spark. Files are written under temporary names and renamed on a
clean exit, so a killed task never leaves a shard that looks complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType

import numpy as np

from catsdogs import schema
from catsdogs.fsutil import atomic_open
from catsdogs.manifest import ShardInfo


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_paths(split: str, index: int) -> tuple[str, str]:
    """Return the X and y file names of a shard, relative to the shards root."""
    return (f"{split}/{schema.X_PATTERN.format(index=index)}",
            f"{split}/{schema.Y_PATTERN.format(index=index)}")


class ShardWriter:
    """Collect rows of one shard and write ``X_part_<i>.npy`` / ``y_part_<i>.npy`` on exit.

    Rows are kept as uint8 (size*size*3 bytes each); a shard of 1,500 64x64 images is ~18 MB.
    """

    def __init__(self, root: str | Path, split: str, index: int, size: int, num_classes: int) -> None:
        self.root = Path(root)
        self.split = split
        self.index = index
        self.size = size
        self.num_classes = num_classes
        self._x: list[np.ndarray] = []
        self._y: list[int] = []
        self.info: ShardInfo | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def add(self, image: np.ndarray, label: int) -> int:
        """Append one ``(size, size, 3)`` uint8 image; return its row index in the shard."""
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 {(self.size, self.size, 3)}, got {image.dtype} {image.shape}")
        self._x.append(image)
        self._y.append(int(label))
        return len(self._y) - 1

    def __len__(self) -> int:
        return len(self._y)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            return  # nothing is published for a failed shard
        x_rel, y_rel = shard_paths(self.split, self.index)
        x = (np.stack(self._x) if self._x else
             np.zeros((0, self.size, self.size, 3), dtype=np.uint8))
        y = np.asarray(self._y, dtype=schema.LABEL_DTYPE)
        for rel, arr in ((x_rel, x), (y_rel, y)):
            with atomic_open(self.root / rel, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
        self.info = ShardInfo(
            index=self.index, split=self.split, rows=len(y), x=x_rel, y=y_rel,
            x_sha256=sha256_file(self.root / x_rel), y_sha256=sha256_file(self.root / y_rel),
            class_counts=np.bincount(y, minlength=self.num_classes).astype(int).tolist(),
        )
