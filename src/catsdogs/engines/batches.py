"""Normalised shard batches for the int8 engines: calibration images and the validation guard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from catsdogs.models.transforms import normalize
from catsdogs.shards.manifest import Manifest
from catsdogs.shards.reader import iter_batches


def split_batches(root: str | Path, manifest: Manifest, split: str, mean: tuple[float, ...],
                  std: tuple[float, ...], batch_size: int, max_rows: int | None = None,
                  size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x, y)``: contiguous float32 NCHW batches normalised as in training, and their labels.

    ``max_rows`` stops after that many rows of the split (in shard order); ``size`` resizes as
    ``train.features.extract_features`` does (bilinear, antialiased) when it differs from the shards'.
    """
    seen = 0
    limit = manifest.split_rows(split) if max_rows is None else min(max_rows, manifest.split_rows(split))
    for _pos, _start, rows, y in iter_batches(root, manifest, split, batch_size):
        if seen >= limit:
            return
        rows, y = rows[:limit - seen], y[:limit - seen]
        seen += len(y)
        x = normalize(torch.from_numpy(np.ascontiguousarray(rows)), mean, std)
        if size is not None and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = x.contiguous()
        yield x.numpy(), np.asarray(y, dtype=np.int64)


def calibration_images(root: str | Path, manifest: Manifest, mean: tuple[float, ...], std: tuple[float, ...],
                       rows: int, batch_size: int, size: int | None = None) -> Iterator[np.ndarray]:
    """Yield the first ``rows`` training images as calibration batches.

    Shard order is already mixed (preprocess assigns files to shards by hash), so both classes appear.
    """
    for x, _y in split_batches(root, manifest, "train", mean, std, batch_size, rows, size):
        yield x
