"""Normalised shard batches for the int8 engines: calibration images and the validation guard."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from catsdogs.models.transforms import normalize
from catsdogs.shards.manifest import Manifest
from catsdogs.shards.reader import iter_batches, load_rows


def split_batches(root: str | Path, manifest: Manifest, split: str, mean: tuple[float, ...],
                  std: tuple[float, ...], batch_size: int, max_rows: int | None = None,
                  size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x, y)``: contiguous float32 NCHW batches normalised as in training, and their labels.

    ``max_rows`` stops after that many rows of the split (in shard order); ``size`` resizes as
    ``train.features.extract_features`` does (bilinear, antialiased) when it differs from the shards'.
    """
    for _pos, _start, rows, y in iter_batches(root, manifest, split, batch_size, max_rows):
        yield normalized(rows, mean, std, size), np.asarray(y, dtype=np.int64)


PREFETCH = 2
"""Batches read and normalised ahead of the engine: one in flight per inference stream."""
_END = object()


def prefetched(items: Iterable[np.ndarray], depth: int = PREFETCH) -> Iterator[np.ndarray]:
    """Iterate ``items`` from a background thread, ``depth`` ahead; its exceptions are raised here.

    Shard reads and normalising then overlap the engine's forward pass.
    """
    buf: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buf.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buf.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            buf.put(exc)

    thread = threading.Thread(target=fill, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buf.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def normalized(rows: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], size: int | None = None
               ) -> np.ndarray:
    """uint8 NHWC rows -> contiguous float32 NCHW, normalised (and resized) as in training.

    Written channel by channel straight into the NCHW buffer the engine reads: the same float32
    ``(x - mean) / std`` as ``models.transforms.normalize`` without its channels_last intermediate and
    the copy back to NCHW (two passes over a 52 MB batch fewer).
    """
    if size is not None and size != rows.shape[1]:
        x = normalize(torch.from_numpy(np.ascontiguousarray(rows)), mean, std)
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x.contiguous().numpy()
    out = np.empty((rows.shape[0], rows.shape[3], rows.shape[1], rows.shape[2]), np.float32)
    for c in range(rows.shape[3]):
        np.subtract(rows[..., c], np.float32(mean[c]), out=out[:, c], dtype=np.float32)
        np.divide(out[:, c], np.float32(std[c]), out=out[:, c])
    return out


@dataclass(frozen=True)
class SplitImages:
    """One shard split as an engine sees it: normalised batches in shard order, or chosen rows."""

    root: Path
    manifest: Manifest
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int = 64
    size: int | None = None

    def __len__(self) -> int:
        return self.manifest.split_rows(self.split)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every row in order, as ``(x, y)`` batches (see :func:`split_batches`)."""
        return split_batches(self.root, self.manifest, self.split, self.mean, self.std, self.batch_size,
                             size=self.size)

    def take(self, index: np.ndarray) -> Iterator[np.ndarray]:
        """The rows at ``index`` (positions in split order), normalised, in batches, in that order."""
        rows = np.cumsum([0] + [s.rows for s in self.manifest.split_shards(self.split)])
        index = np.asarray(index, dtype=np.int64)
        shard = np.searchsorted(rows, index, side="right") - 1
        for i in range(0, len(index), self.batch_size):
            part = slice(i, i + self.batch_size)
            within = index[part] - rows[shard[part]]
            images = load_rows(self.root, self.manifest, self.split, shard[part], within)
            yield normalized(images, self.mean, self.std, self.size)


def calibration_images(root: str | Path, manifest: Manifest, mean: tuple[float, ...], std: tuple[float, ...],
                       rows: int, batch_size: int, size: int | None = None) -> Iterator[np.ndarray]:
    """Yield the first ``rows`` training images as calibration batches.

    Shard order is already mixed (preprocess assigns files to shards by hash), so both classes appear.
    """
    for x, _y in split_batches(root, manifest, "train", mean, std, batch_size, rows, size):
        yield x
