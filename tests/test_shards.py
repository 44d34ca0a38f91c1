"""ShardWriter: round trip, checksums, and nothing published for a failed shard."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from catsdogs.shards.writer import ShardWriter, shard_paths


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


# ----------------------------------------------------------------------------------------------
# Parquet shards: same rows, readable by pyarrow, read back a row group at a time


def test_parquet_round_trip_across_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    from catsdogs.shards import writer as shards_mod
    from catsdogs.shards.reader import ParquetPixels, open_shard

    monkeypatch.setattr(shards_mod, "PARQUET_ROW_GROUP_ROWS", 3)  # 7 rows -> groups of 3, 3, 1
    imgs = _images(7)
    labels = [0, 1, 1, 0, 2, 1, 0]
    with ShardWriter(tmp_path, "val", 2, 8, num_classes=3, fmt="parquet") as w:
        for i, (img, lab) in enumerate(zip(imgs, labels, strict=True)):
            w.add(img, lab, f"Cat/{i}.jpg")
    info = w.info
    assert info is not None and info.x == info.y == "val/part_00002.parquet" and info.files() == [info.x]
    assert info.class_counts == [3, 3, 1]
    assert hashlib.sha256((tmp_path / info.x).read_bytes()).hexdigest() == info.x_sha256
    table = pq.read_table(tmp_path / info.x)
    assert table.column_names == ["path", "split", "label", "pixels"]
    assert pq.ParquetFile(tmp_path / info.x).metadata.num_row_groups == 3
    assert table.column("path").to_pylist() == [f"Cat/{i}.jpg" for i in range(7)]
    assert set(table.column("split").to_pylist()) == {"val"}
    assert table.column("label").to_pylist() == labels
    assert table.column("pixels")[4].as_py() == imgs[4].tobytes()  # row-major HWC bytes

    x, y = open_shard(tmp_path, info, 8)
    assert isinstance(x, ParquetPixels) and x.shape == (7, 8, 8, 3) and len(x) == 7
    assert y.dtype == np.int64 and y.tolist() == labels
    assert np.array_equal(x[0:7], imgs)
    assert np.array_equal(x[2:5], imgs[2:5])  # spans two row groups
    assert np.array_equal(x[6:9], imgs[6:7]) and x[7:9].shape == (0, 8, 8, 3)
    assert np.array_equal(x[::2], imgs[::2])
    order = np.array([6, 0, 4, 3, -1])
    assert np.array_equal(x[order], imgs[order])
    assert np.array_equal(x[5], imgs[5])
    with pytest.raises(IndexError):
        x[np.array([7])]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["part_00002.parquet"]


def test_npy_parquet_and_png_shards_stream_identical_batches(tmp_path: Path) -> None:
    from catsdogs.shards.manifest import load_manifest
    from catsdogs.train.stream import split_stream
    from tests.fixtures import make_shards

    for fmt in ("npy", "parquet", "png"):
        make_shards(tmp_path / fmt, counts={"train": 90, "val": 30}, size=8, shard_rows=40, fmt=fmt)
    streams = {}
    for fmt in ("npy", "parquet", "png"):
        m = load_manifest(tmp_path / fmt)
        assert m.format == fmt
        s = split_stream(tmp_path / fmt, m, "train", 16, shuffle=True, seed=3, buffer_rows=32)
        s.set_epoch(1)
        streams[fmt] = [(x.numpy(), y.numpy()) for x, y in s.loader()]
        ordered = split_stream(tmp_path / fmt, m, "val", 16, shuffle=False)
        streams[fmt + "_val"] = [(x.numpy(), y.numpy()) for x, y in ordered.loader()]
    for key in ("", "_val"):
        for other in ("parquet", "png"):  # PNG is lossless: the very pixels
            a, b = streams["npy" + key], streams[other + key]
            assert len(a) == len(b) > 0
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert sum(len(y) for _, y in streams["parquet_val"]) == 30  # evaluation keeps every row


def test_jpeg_shards_hold_each_image_encoded_and_read_back_close(tmp_path: Path) -> None:
    """A JPEG shard: one encoded cell per image, several times fewer bytes, pixels within JPEG's error."""
    import pyarrow.parquet as pq

    from catsdogs.shards.reader import open_shard

    rng = np.random.default_rng(0)
    smooth = [np.clip(np.linspace(0, 255, 64)[None, :, None] + rng.normal(0, 4, (64, 64, 3)), 0, 255)
              .astype(np.uint8) for _ in range(5)]  # photo-like: smooth, a little noise
    infos = {}
    for fmt in ("parquet", "jpeg"):
        with ShardWriter(tmp_path / fmt, "train", 0, 64, num_classes=2, fmt=fmt) as w:
            for i, img in enumerate(smooth):
                w.add(img, i % 2, f"{i}.jpg")
        infos[fmt] = w.info
    raw, jpeg = (tmp_path / f / "train" / "part_00000.parquet" for f in ("parquet", "jpeg"))
    assert jpeg.stat().st_size * 2 < raw.stat().st_size
    assert pq.read_table(jpeg).column("pixels")[0].as_py()[:2] == b"\xff\xd8"  # a JPEG's first bytes
    x, y = open_shard(tmp_path / "jpeg", infos["jpeg"], 64)
    assert y.tolist() == [0, 1, 0, 1, 0] and x.shape == (5, 64, 64, 3)
    assert np.abs(x[0:5].astype(int) - np.stack(smooth)).mean() < 3  # of 255
    pq.write_table(pq.read_table(jpeg).set_column(3, "pixels", pq.read_table(raw).column("pixels"))
                   .replace_schema_metadata(pq.read_schema(jpeg).metadata), tmp_path / "bad.parquet")
    (tmp_path / "bad.parquet").replace(jpeg)  # raw bytes where JPEG is promised
    from catsdogs.errors import SchemaError

    with pytest.raises(SchemaError, match="not a readable jpeg image.*re-run catsdogs preprocess"):
        open_shard(tmp_path / "jpeg", infos["jpeg"], 64)[0][0:1]


def test_corrupt_parquet_shard_is_a_schema_error(tmp_path: Path) -> None:
    from catsdogs.errors import InputError, SchemaError
    from catsdogs.shards.reader import open_shard

    with ShardWriter(tmp_path, "train", 0, 8, num_classes=2, fmt="parquet") as w:
        w.add(_images(1)[0], 1, "a.jpg")
    assert w.info is not None
    with pytest.raises(SchemaError, match="re-run"):
        open_shard(tmp_path, w.info, 16)  # the manifest says another size
    (tmp_path / w.info.x).write_bytes(b"PAR1 not really")
    with pytest.raises(SchemaError, match="part_00000.parquet"):
        open_shard(tmp_path, w.info, 8)
    (tmp_path / w.info.x).unlink()
    with pytest.raises(InputError, match="missing"):
        open_shard(tmp_path, w.info, 8)


def test_iter_batches_is_the_one_place_a_pass_is_cut_short(tmp_path: Path) -> None:
    """``max_rows`` stops mid-shard and mid-batch, in shard order; without it every row comes."""
    from catsdogs.shards.manifest import load_manifest
    from catsdogs.shards.reader import iter_batches
    from tests.fixtures import make_shards

    make_shards(tmp_path, counts={"train": 50}, size=8, shard_rows=20)  # shards of 20, 20, 10
    m = load_manifest(tmp_path)
    whole = list(iter_batches(tmp_path, m, "train", 8))
    assert sum(len(y) for *_, y in whole) == 50
    cut = list(iter_batches(tmp_path, m, "train", 8, max_rows=27))
    expected = [(0, 0, 8), (0, 8, 8), (0, 16, 4), (1, 0, 7)]
    assert [(pos, start, len(y)) for pos, start, _x, y in cut] == expected
    assert all(np.array_equal(a[2], b[2][: len(a[2])]) for a, b in zip(cut, whole, strict=False))  # same rows
    assert list(iter_batches(tmp_path, m, "train", 8, max_rows=0)) == []
