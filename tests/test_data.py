"""Streaming loader: order, sharding across workers/ranks, bounded memory, resume positions."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.errors import InputError
from catsdogs.shards.manifest import load_manifest
from catsdogs.train.stream import ShardStream, round_robin_skip, split_stream
from tests.fixtures import make_shards


@pytest.fixture(scope="module")
def even(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 train rows in 6 shards of 40: divides evenly into batches of 8 for 1, 2 or 4 slots."""
    root = tmp_path_factory.mktemp("even")
    make_shards(root, counts={"train": 240, "val": 50}, size=16, shard_rows=40)
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """230 train rows: 5 shards of 40 and one of 30."""
    root = tmp_path_factory.mktemp("uneven")
    make_shards(root, counts={"train": 230, "val": 37}, size=16, shard_rows=40)
    return root


def stream(root: Path, split: str = "train", **kw: object) -> ShardStream:
    opts: dict = {"batch_size": 8, "shuffle": split == "train", "seed": 3, "buffer_rows": 64}
    opts.update(kw)
    return split_stream(root, load_manifest(root), split, **opts)


def epoch(ds: ShardStream, e: int = 0, position: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds.set_epoch(e)
    ds.set_position(position)
    return list(ds.loader())


def all_rows(root: Path, split: str = "train") -> dict[bytes, int]:
    """Every row of a split on disk: pixel bytes -> label (the synthetic rows are all distinct)."""
    m = load_manifest(root)
    rows: dict[bytes, int] = {}
    for s in m.split_shards(split):
        x, y = np.load(root / s.x), np.load(root / s.y)
        for xi, yi in zip(x, y, strict=True):
            rows[xi.tobytes()] = int(yi)
    assert len(rows) == m.split_rows(split)
    return rows


def keys(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bytes]:
    return [row.numpy().tobytes() for x, _ in batches for row in x]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_batches_are_uint8_nhwc_with_matching_labels(even: Path) -> None:
    truth = all_rows(even)
    batches = epoch(stream(even))
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape == (8, 16, 16, 3)
        assert y.dtype == torch.int64 and y.shape == (8,)
        for xi, yi in zip(x, y, strict=True):
            assert truth[xi.numpy().tobytes()] == int(yi)


def test_same_seed_same_order_and_epochs_differ(even: Path) -> None:
    a, b = epoch(stream(even)), epoch(stream(even))
    assert same(a, b)
    assert not same(a, epoch(stream(even), e=1))
    assert not same(a, epoch(stream(even, seed=4)))
    # Every epoch still covers the same rows.
    assert sorted(keys(a)) == sorted(keys(epoch(stream(even), e=1)))


def test_shuffle_mixes_rows_across_shards(even: Path) -> None:
    """With a buffer larger than a shard, the first batch draws from more than one shard."""
    m = load_manifest(even)
    shard_of = {}
    for s in m.split_shards("train"):
        for row in np.load(even / s.x):
            shard_of[row.tobytes()] = s.index
    first = epoch(stream(even, buffer_rows=80))[0][0]
    assert len({shard_of[r.numpy().tobytes()] for r in first}) > 1


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_exactly_once_per_epoch(even: Path, workers: int) -> None:
    truth = all_rows(even)
    for e in (0, 1):
        got = keys(epoch(stream(even, num_workers=workers), e=e))
        assert len(got) == len(truth)
        assert set(got) == set(truth)


def test_ranks_and_workers_get_disjoint_shards_and_equal_batches(even: Path) -> None:
    truth = all_rows(even)
    per_rank = [epoch(stream(even, num_workers=2, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 15
    k0, k1 = keys(per_rank[0]), keys(per_rank[1])
    assert not set(k0) & set(k1)
    assert sorted(k0 + k1) == sorted(truth)
    plan = stream(even, num_workers=2, world_size=2).plan()
    slots = [set(p.shards) for rank in plan for p in rank]
    assert sum(len(s) for s in slots) == len(set().union(*slots)) == 6


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_uneven_shards_balance_ranks_and_bound_drops(uneven: Path, world_size: int) -> None:
    truth = all_rows(uneven)
    runs = [epoch(stream(uneven, rank=r, world_size=world_size)) for r in range(world_size)]
    counts = {len(b) for b in runs}
    assert len(counts) == 1, "every rank must take the same number of steps"
    got = [k for b in runs for k in keys(b)]
    assert len(got) == len(set(got)), "a row was served twice"
    assert set(got) <= set(truth)
    dropped = len(truth) - len(got)
    # Only partial batches per slot plus the rank imbalance (< one 40-row shard) may be left out.
    assert dropped < world_size * 8 + 40
    if world_size == 1:
        assert dropped == len(truth) % 8


def test_ordered_mode_keeps_every_row_in_order(uneven: Path) -> None:
    m = load_manifest(uneven)
    expected = np.concatenate([np.load(uneven / s.x) for s in m.split_shards("val")])
    batches = epoch(stream(uneven, "val", batch_size=8))
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
    assert np.array_equal(torch.cat([x for x, _ in batches]).numpy(), expected)
    assert same(batches, epoch(stream(uneven, "val", batch_size=8), e=5))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_continues_exactly(uneven: Path, workers: int) -> None:
    ds = stream(uneven, num_workers=workers)
    full = epoch(ds, e=2)
    for k in (0, 1, 5, 6, 13, len(full) - 1, len(full)):
        rest = epoch(ds, e=2, position=k)
        assert len(ds.loader()) == len(full) - k
        assert same(rest, full[k:]), f"position {k}"


def test_round_robin_skip_matches_dataloader_interleaving() -> None:
    # Quotas 2 and 4: order w0 w1 w0 w1 w1 w1.
    assert round_robin_skip([2, 4], 0) == ([0, 0], 0)
    assert round_robin_skip([2, 4], 3) == ([1, 1], 1)
    assert round_robin_skip([2, 4], 4) == ([2, 2], 0)
    assert round_robin_skip([2, 4], 5) == ([2, 3], 0)
    assert round_robin_skip([3], 2) == ([2], 0)


def test_buffer_is_bounded_and_shards_are_memory_mapped(uneven: Path, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    ds = stream(uneven, buffer_rows=24)
    opened: list[weakref.ref] = []
    live_at_open: list[int] = []
    original = ShardStream._open_shard

    def tracking(self: ShardStream, index: int) -> tuple[np.ndarray, np.ndarray]:
        gc.collect()
        live_at_open.append(sum(r() is not None for r in opened))
        x, y = original(self, index)
        assert isinstance(x, np.memmap)
        opened.append(weakref.ref(x))
        return x, y

    monkeypatch.setattr(ShardStream, "_open_shard", tracking)
    batches = epoch(ds)
    assert len(batches) == 230 // 8
    assert ds.stats["buffer_rows"] == 24 and ds.stats["max_filled"] <= 24
    assert ds.stats["mmap"] is True
    assert len(opened) == 6
    assert max(live_at_open) == 0, "a previous shard's memory map was still alive"


def test_missing_split_or_shard_file_is_an_input_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    make_shards(root, counts={"train": 40, "val": 10}, size=16, shard_rows=20)
    m = load_manifest(root)
    with pytest.raises(InputError, match="test"):
        split_stream(root, m, "test", 8, shuffle=False)
    (root / m.split_shards("train")[1].x).unlink()
    with pytest.raises(InputError, match="X_part_00001"):
        split_stream(root, m, "train", 8, shuffle=True)


def test_too_few_rows_or_shards_for_the_ranks_is_an_input_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    make_shards(root, counts={"train": 30, "val": 10}, size=16, shard_rows=30)
    m = load_manifest(root)
    with pytest.raises(InputError, match="--batch-size"):
        split_stream(root, m, "train", 32, shuffle=True)
    with pytest.raises(InputError, match="--distributed"):
        split_stream(root, m, "train", 8, shuffle=True, rank=1, world_size=2)  # one shard, two ranks
    idle = split_stream(root, m, "train", 8, shuffle=True, num_workers=2)  # worker 1 has no shard: fine
    assert len(idle) == 3 and len(epoch(idle)) == 3


def test_the_stream_resumes_from_its_own_state_dict(uneven: Path) -> None:
    """state_dict()/load_state_dict() is the stream's one resume contract: the rest of the epoch, exactly."""
    ds = stream(uneven)
    full = epoch(ds, e=1)
    ds.load_state_dict({"epoch": 1, "batches": 5})
    assert ds.state_dict() == {"epoch": 1, "batches": 5}
    assert same(list(ds.loader()), full[5:])
    ds.set_epoch(2)
    assert ds.state_dict() == {"epoch": 2, "batches": 0}
