"""Streaming batches from memory-mapped shards, with bounded shuffling and exact resume.

:class:`ShardStream` is a torch ``IterableDataset`` over the shards of one split that yields whole
batches (uint8 NHWC pixels + int64 labels), so a ``DataLoader(batch_size=None)`` never collates rows
one by one in Python. Memory stays bounded: each reader (the main process or one DataLoader worker)
holds its slice of the shuffle buffer plus the memory map of the one shard it is reading; shard pages
are only touched as rows are copied out, and the map is dropped when the shard is done.

Order is a pure function of ``(seed, epoch, world_size, workers, batch_size, buffer_rows)``: the same
settings give the same batches bit for bit. Every epoch reshuffles the shard order and the rows (via
the buffer). Each (rank, worker) "slot" reads disjoint shards.

Uneven shards: shards are dealt to ranks (then to a rank's workers) largest-first onto the least
loaded, which balances rows to within one shard. Training (``drop_last``) slots yield only full
batches, and every rank is cut to the batch count of the poorest rank, like ``DistributedSampler``
with ``drop_last=True``: each epoch at most ``slots * (batch_size - 1)`` rows plus the rank
imbalance (< one shard) are left out, different random ones each epoch, and with one process and no
workers nothing but the last partial batch is. Evaluation (no shuffle) keeps every row, with a
partial last batch per slot, and ranks may differ in batch count (reduce sums after the loop).

Resume: :meth:`ShardStream.load_state_dict` (epoch, batches taken) skips the first ``k`` batches of an
epoch; the skipped part of the shuffle is replayed on row ids only (no pixel copies), so a resumed epoch
continues with exactly the batches an uninterrupted one would have produced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from catsdogs.errors import InputError
from catsdogs.shards.manifest import Manifest, ShardInfo
from catsdogs.shards.reader import ParquetPixels, open_shard

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SlotPlan:
    """What one reader (rank, worker) does in an epoch: which shards, in which order, how many batches."""

    shards: tuple[int, ...]
    """Indices into the stream's shard list, in read order."""
    rows: int
    """Rows in those shards."""
    batches: int
    """Batches this slot yields (its quota after rank balancing)."""


def _deal(items: Sequence[int], sizes: Sequence[int], bins: int) -> list[list[int]]:
    """Deal ``items`` (in the given order) largest-first onto the least-loaded of ``bins`` bins.

    The stable sort keeps the (shuffled) order among equal sizes, so equal shards still move
    between bins from epoch to epoch.
    """
    out: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    for item in sorted(items, key=lambda i: -sizes[i]):
        b = min(range(bins), key=lambda k: (load[k], k))
        out[b].append(item)
        load[b] += sizes[item]
    return out


def round_robin_skip(quotas: Sequence[int], k: int) -> tuple[list[int], int]:
    """Split ``k`` already-consumed batches into per-worker skips at the last complete round.

    A DataLoader interleaves its workers round-robin (exhausted ones drop out) and always starts a
    new iterator at worker 0, so a resumed loader can only start at a round boundary. Returns the
    per-worker skips up to the last round start ``p <= k`` and ``k - p`` batches that the main
    process discards after restarting.
    """
    remaining = list(quotas)
    skips = [0] * len(quotas)
    done = 0
    while True:
        round_workers = [w for w, r in enumerate(remaining) if r > 0]
        if not round_workers or done + len(round_workers) > k:
            return skips, k - done
        for w in round_workers:
            remaining[w] -= 1
            skips[w] += 1
        done += len(round_workers)


class _ShuffleBuffer:
    """The rows one slot's shuffle has read and not yet emitted: ids always, pixels once not skipping.

    Row ids are slot-local row numbers (``offsets`` maps them to shards). While the first ``skip``
    batches are replayed for a resume, only ids move; :meth:`materialize` then fetches the buffered
    rows' pixels once, and from there every added row brings its pixels.
    """

    def __init__(self, stream: Any, slot: SlotPlan, sizes: list[int], skip: int, rng: np.random.Generator
                 ) -> None:
        self.stream, self.slot, self.skip, self.rng = stream, slot, skip, rng
        self.b, self.cap = stream.batch_size, stream.buffer_capacity
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.ids = np.empty(self.cap, dtype=np.int64)
        self.px: np.ndarray | None = None  # allocated once pixels are needed
        self.lab = np.empty(self.cap, dtype=np.int64)
        self.filled = 0
        self.emitted = 0

    def needs_pixels(self) -> bool:
        """True once rows must bring their pixels (the replayed batches are behind)."""
        return self.px is not None or self.emitted >= self.skip

    def materialize(self) -> np.ndarray:
        """Fetch the pixels and labels of the rows now in the buffer (resume switch-over)."""
        buf = np.empty((self.cap, *self.stream._row_shape(self.slot)), dtype=np.uint8)
        which = np.searchsorted(self.offsets, self.ids[:self.filled], side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            x, y = self.stream._open_shard(self.slot.shards[s])
            rows = self.ids[sel] - self.offsets[s]
            buf[sel] = x[rows]
            self.lab[sel] = y[rows]
            del x, y
        return buf

    def add(self, k: int, pos: int, take: int, x: Any, y: Any) -> None:
        """Append rows ``pos:pos + take`` of the slot's shard ``k`` (``x``, ``y``: its arrays if needed)."""
        f = self.filled
        self.ids[f:f + take] = self.offsets[k] + pos + np.arange(take)
        if self.needs_pixels():
            if self.px is None:
                self.px = self.materialize()
            self.px[f:f + take] = x[pos:pos + take]
            self.lab[f:f + take] = y[pos:pos + take]
        self.filled += take

    def emit(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Take ``b`` random buffered rows out (compacting the buffer); pixels once not skipping."""
        n = min(self.b, self.filled)
        pick = self.rng.choice(self.filled, size=n, replace=False)  # random rows in random order
        out = None
        if self.emitted >= self.skip:
            if self.px is None:
                self.px = self.materialize()
            out = (self.px[pick], self.lab[pick])
        # Move the unpicked rows of the tail [filled-n, filled) into the holes below it.
        tail = np.arange(self.filled - n, self.filled)
        movers = tail[~np.isin(tail, pick)]
        holes = np.sort(pick[pick < self.filled - n])
        self.ids[holes] = self.ids[movers]
        if self.px is not None:
            self.px[holes] = self.px[movers]
            self.lab[holes] = self.lab[movers]
        self.filled -= n
        self.emitted += 1
        return out


class ShardStream(IterableDataset):
    """Batches of one split's shards; see the module docstring for order, sharding and memory.

    Args:
        root: shards folder (the manifest's paths are relative to it).
        shards: the split's shards, e.g. ``manifest.split_shards("train")``.
        batch_size: rows per batch.
        shuffle: reshuffle shards and rows every epoch (training); False gives a fixed order.
        seed: base seed of the order.
        buffer_rows: shuffle-buffer rows in total, split across workers (at least one batch each).
        rank, world_size: this process's place among distributed processes.
        num_workers: DataLoader workers that will read this stream (must match the loader).
        drop_last: yield only full batches (default: same as ``shuffle``).
        size: image side in pixels (the manifest's).
    """

    def __init__(self, root: str | Path, shards: Sequence[ShardInfo], batch_size: int, *,
                 shuffle: bool, seed: int = 0, buffer_rows: int = 4096, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, drop_last: bool | None = None,
                 size: int) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.root = Path(root)
        self.shards = list(shards)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.buffer_rows = int(buffer_rows)
        self.rank = rank
        self.world_size = world_size
        self.num_workers = int(num_workers)
        self.drop_last = shuffle if drop_last is None else drop_last
        self.size = size
        self.epoch = 0
        self._skips: list[int] = [0] * max(1, self.num_workers)
        self._discard = 0
        self._position = 0
        """Batches of the current epoch already taken (skipped on resume)."""
        self.stats: dict[str, Any] = {}
        """Filled while iterating in this process: buffer capacity, peak fill, shards opened, mmap."""

    # ----------------------------------------------------------------- planning (pure functions)
    @property
    def slots_per_rank(self) -> int:
        """Readers per rank: the DataLoader workers, or the main process alone."""
        return max(1, self.num_workers)

    @property
    def buffer_capacity(self) -> int:
        """Rows of shuffle buffer each reader holds (the total is split across workers)."""
        return max(self.batch_size, self.buffer_rows // self.slots_per_rank)

    def plan(self, epoch: int | None = None) -> list[list[SlotPlan]]:
        """Return ``[rank][worker]`` slot plans of an epoch; identical in every process."""
        epoch = self.epoch if epoch is None else epoch
        sizes = [s.rows for s in self.shards]
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
            per_rank = _deal(order, sizes, self.world_size)
            per_slot = [_deal(r, sizes, self.slots_per_rank) for r in per_rank]
        else:
            # Fixed order: shards round-robin to ranks, then to workers, each in index order.
            per_rank = [order[r::self.world_size] for r in range(self.world_size)]
            per_slot = [[r[w::self.slots_per_rank] for w in range(self.slots_per_rank)] for r in per_rank]
        plans: list[list[SlotPlan]] = []
        for slots in per_slot:
            rank_plans = []
            for shard_ids in slots:
                rows = sum(sizes[i] for i in shard_ids)
                n = rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)
                rank_plans.append(SlotPlan(tuple(shard_ids), rows, n))
            plans.append(rank_plans)
        if self.drop_last and self.world_size > 1:
            # Equal batch counts on every rank (collectives run once per step): cut the richer ranks,
            # taking from their fullest slot first.
            target = min(sum(p.batches for p in rank) for rank in plans)
            for rank in plans:
                quotas = [p.batches for p in rank]
                while sum(quotas) > target:
                    w = max(range(len(quotas)), key=lambda i: (quotas[i], i))
                    quotas[w] -= 1
                rank[:] = [SlotPlan(p.shards, p.rows, q) for p, q in zip(rank, quotas, strict=True)]
        return plans

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Return how many batches this rank yields in an epoch (before any resume skip)."""
        return sum(p.batches for p in self.plan(epoch)[self.rank])

    def __len__(self) -> int:
        return self.batches_in_epoch() - sum(self._skips) - self._discard

    # ----------------------------------------------------------------- epoch / position control
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced next; resets any resume position."""
        self.epoch = int(epoch)
        self.set_position(0)

    def set_position(self, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches of the current epoch (for resume)."""
        quotas = [p.batches for p in self.plan()[self.rank]]
        if not 0 <= batches_done <= sum(quotas):
            raise ValueError(f"position {batches_done} outside epoch of {sum(quotas)} batches")
        self._skips, self._discard = round_robin_skip(quotas, batches_done)
        self._position = batches_done

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: the epoch whose order it produces and the batches already taken."""
        return {"epoch": self.epoch, "batches": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the same epoch's order, its first batches skipped."""
        self.set_epoch(state["epoch"])
        self.set_position(state["batches"])

    # ----------------------------------------------------------------- reading
    def loader(self, pin_memory: bool = False) -> EpochLoader:
        """Return an iterable over this epoch's remaining batches through a matching DataLoader."""
        return EpochLoader(self, pin_memory)

    def _open_shard(self, index: int) -> tuple[np.ndarray | ParquetPixels, np.ndarray]:
        """Open one shard (npy memory map or Parquet row groups: pages load only as rows are read)."""
        info = self.shards[index]
        x, y = open_shard(self.root, info, self.size)
        self.stats["shards_opened"] = self.stats.get("shards_opened", 0) + 1
        self.stats["mmap"] = isinstance(x, np.memmap)
        return x, y

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.slots_per_rank:
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers but the DataLoader "
                               f"has {info.num_workers}; build loaders with ShardStream.loader()")
        slot = self.plan()[self.rank][worker]
        skip = self._skips[worker]
        if self.shuffle:
            gen = self._iter_shuffled(slot, skip, self.rank * self.slots_per_rank + worker)
        else:
            gen = self._iter_ordered(slot, skip)
        for x, y in gen:
            yield torch.from_numpy(x), torch.from_numpy(y)

    def _iter_ordered(self, slot: SlotPlan, skip: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive rows of the slot's shards in order, batched across shard boundaries."""
        b = self.batch_size
        start = skip * b  # rows to skip
        end = slot.batches * b if self.drop_last else slot.rows
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        offset = 0  # global row index within the slot of the current shard's first row
        for index in slot.shards:
            n = self.shards[index].rows
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                x, y = self._open_shard(index)
                pos = lo - offset
                while pos < hi - offset:
                    have = sum(len(a) for a in pending_y)
                    take = min(b - have, hi - offset - pos)
                    pending_x.append(np.array(x[pos:pos + take]))
                    pending_y.append(y[pos:pos + take])
                    pos += take
                    if have + take == b:
                        yield np.concatenate(pending_x), np.concatenate(pending_y)
                        pending_x, pending_y = [], []
                del x, y
            offset += n
        if pending_y:
            yield np.concatenate(pending_x), np.concatenate(pending_y)

    def _iter_shuffled(self, slot: SlotPlan, skip: int, slot_id: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A shuffle buffer working a batch at a time: fill it, emit a random batch, refill the holes.

        Row ids (slot-local row numbers) travel in a parallel array, so the first ``skip`` batches are
        replayed on ids alone; the pixels of rows still in the buffer are fetched once at the switch.
        """
        sizes = [self.shards[i].rows for i in slot.shards]
        buf = _ShuffleBuffer(self, slot, sizes, skip, np.random.default_rng([self.seed, self.epoch, slot_id]))
        self.stats.update(buffer_rows=buf.cap, max_filled=0)
        for k, index in enumerate(slot.shards):
            if buf.emitted >= slot.batches:
                break
            x = y = None
            pos = 0
            while pos < sizes[k] and buf.emitted < slot.batches:
                take = min(buf.cap - buf.filled, sizes[k] - pos)
                if buf.needs_pixels() and x is None:
                    x, y = self._open_shard(index)
                buf.add(k, pos, take, x, y)
                pos += take
                self.stats["max_filled"] = max(self.stats["max_filled"], buf.filled)
                if buf.filled == buf.cap:
                    out = buf.emit()
                    if out is not None:
                        yield out
            del x, y  # drop this shard's memory map before opening the next
        while buf.emitted < slot.batches and buf.filled > 0:
            out = buf.emit()
            if out is not None:
                yield out

    def _row_shape(self, slot: SlotPlan) -> tuple[int, ...]:
        """Return ``(H, W, 3)`` of this slot's rows."""
        return (self.size, self.size, 3)


class EpochLoader:
    """One epoch of a :class:`ShardStream` through a DataLoader, honouring a resume position.

    The DataLoader gets its own seeded generator: otherwise each new iterator draws its base seed
    from torch's global RNG and a resumed run would drift from an uninterrupted one (dropout).
    """

    def __init__(self, stream: ShardStream, pin_memory: bool = False) -> None:
        self.stream = stream
        self.discard = stream._discard
        gen = torch.Generator().manual_seed(stream.seed)
        self.loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                                 pin_memory=pin_memory, generator=gen,
                                 persistent_workers=False)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        for _ in range(self.discard):
            next(it)
        yield from it


def split_stream(root: str | Path, manifest: Manifest, split: str, batch_size: int, *,
                 shuffle: bool, seed: int = 0, buffer_rows: int = 4096, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, flag: str = "--data") -> ShardStream:
    """Build the stream of one split, checking that the split exists and its files are present."""
    shards = manifest.split_shards(split)
    if not shards or sum(s.rows for s in shards) == 0:
        raise InputError(f"shards folder {str(root)!r} has no rows in split {split!r}; "
                         f"re-run catsdogs preprocess with a non-zero fraction for it or fix {flag}")
    for s in shards:
        for rel in s.files():
            if not (Path(root) / rel).is_file():
                raise InputError(f"shard file {str(Path(root) / rel)!r} listed in the manifest is "
                                 f"missing; re-run catsdogs preprocess or fix {flag}")
    stream = ShardStream(root, shards, batch_size, shuffle=shuffle, seed=seed, buffer_rows=buffer_rows,
                         rank=rank, world_size=world_size, num_workers=num_workers,
                         size=manifest.size)
    if shuffle and stream.batches_in_epoch(0) == 0:
        raise InputError(f"split {split!r} of {str(root)!r} ({sum(s.rows for s in shards)} rows in "
                         f"{len(shards)} shards) gives no full batch of {batch_size} per process: lower "
                         f"--batch-size or --distributed, or make more/larger shards")
    return stream
