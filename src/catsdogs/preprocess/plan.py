"""The split and shard plan of ``catsdogs preprocess`` (pure Python, runs on the driver).

The split is decided here, from relative paths and the seed only, so the same file lands in the same
split whatever the cluster size, partitioning or file-system listing order. Spark then only executes
the plan: one task per shard.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from catsdogs import schema
from catsdogs.preprocess.listing import Candidate


@dataclass(frozen=True)
class ShardPlan:
    """The files of one shard, in row order; executed by one Spark task."""

    split: str
    index: int
    paths: tuple[str, ...]
    labels: tuple[int, ...]



def _split_key(seed: int, path: str) -> str:
    """Return the ordering key of a file for the split: a hash of seed and relative path."""
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def assign_splits(candidates: list[Candidate], num_classes: int, val_frac: float, test_frac: float,
                  seed: int) -> dict[str, list[Candidate]]:
    """Split candidates per class, exactly stratified and independent of input order.

    Per class, candidates are ordered by ``sha256(f"{seed}:{path}")``; the first
    ``round(n * test_frac)`` go to test, the next ``round(n * val_frac)`` to val, the rest to train.
    Each split's list is sorted by path (row order is decided later by :func:`plan_shards`).
    """
    out: dict[str, list[Candidate]] = {s: [] for s in schema.SPLITS}
    for label in range(num_classes):
        members = sorted((c for c in candidates if c.label == label),
                         key=lambda c: (_split_key(seed, c.path), c.path))
        n = len(members)
        n_test = round(n * test_frac)
        n_val = round(n * val_frac)
        out["test"].extend(members[:n_test])
        out["val"].extend(members[n_test:n_test + n_val])
        out["train"].extend(members[n_test + n_val:])
    for split in out:
        out[split].sort(key=lambda c: c.path)
    return out


def chunk_sizes(n: int, max_rows: int) -> list[int]:
    """Split ``n`` rows into ``ceil(n / max_rows)`` near-equal chunk sizes (differing by at most 1)."""
    if n == 0:
        return []
    k = math.ceil(n / max_rows)
    base, extra = divmod(n, k)
    return [base + 1 if i < extra else base for i in range(k)]


def plan_shards(splits: dict[str, list[Candidate]], shard_rows: int, seed: int) -> list[ShardPlan]:
    """Shuffle each split's rows deterministically (seeded) and cut them into near-equal shards."""
    plans: list[ShardPlan] = []
    for split in schema.SPLITS:
        rows = sorted(splits.get(split, []), key=lambda c: c.path)
        # A string seed is hashed by random.Random deterministically (sha512), unlike hash().
        random.Random(f"{seed}:shuffle:{split}").shuffle(rows)  # nosec B311 # a reproducible shuffle, not a secret
        start = 0
        for index, size in enumerate(chunk_sizes(len(rows), shard_rows)):
            chunk = rows[start:start + size]
            start += size
            plans.append(ShardPlan(split, index, tuple(c.path for c in chunk),
                                   tuple(c.label for c in chunk)))
    return plans
