"""ShardWriter: round trip, checksums, and nothing published for a failed shard."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from catsdogs.shards import ShardWriter, shard_paths


def _images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_round_trip_with_np_load_and_mmap(tmp_path: Path) -> None:
    imgs = _images(7)
    labels = [0, 1, 1, 0, 2, 1, 0]
    with ShardWriter(tmp_path, "train", 3, 8, num_classes=3) as w:
        rows = [w.add(img, lab) for img, lab in zip(imgs, labels, strict=True)]
    assert rows == list(range(7))
    info = w.info
    assert info is not None
    assert (info.x, info.y) == shard_paths("train", 3) == ("train/X_part_00003.npy", "train/y_part_00003.npy")
    assert info.rows == 7 and info.class_counts == [3, 3, 1]
    x = np.load(tmp_path / info.x)
    y = np.load(tmp_path / info.y)
    assert x.dtype == np.uint8 and x.shape == (7, 8, 8, 3)
    assert np.array_equal(x, imgs)
    assert y.dtype == np.int64 and y.tolist() == labels
    xm = np.load(tmp_path / info.x, mmap_mode="r")
    assert np.array_equal(xm[2:5], imgs[2:5])
    for rel, digest in ((info.x, info.x_sha256), (info.y, info.y_sha256)):
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest
    # Only the two final files exist: no temporary leftovers.
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["X_part_00003.npy", "y_part_00003.npy"]


def test_empty_shard_has_the_right_shape(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "val", 0, 8, num_classes=2) as w:
        pass
    assert np.load(tmp_path / w.info.x).shape == (0, 8, 8, 3)  # type: ignore[union-attr]
    assert w.info.class_counts == [0, 0]  # type: ignore[union-attr]


def test_failed_block_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", 0, 8, num_classes=2) as w:
        w.add(_images(1)[0], 0)
        raise RuntimeError("task killed")
    assert w.info is None
    assert not list(tmp_path.rglob("*.npy"))


def test_wrong_shape_or_dtype_is_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", 0, 8, num_classes=2) as w:
        with pytest.raises(ValueError):
            w.add(np.zeros((8, 8, 3), dtype=np.float32), 0)
        with pytest.raises(ValueError):
            w.add(np.zeros((9, 8, 3), dtype=np.uint8), 0)
    assert w.info is not None and w.info.rows == 0
