"""Exact and near duplicates, within a split and across splits (leakage).

Exact: equal sha1 of the stored pixels (the same photo, byte for byte after decoding and resizing).
Near: cosine similarity of a duplicate descriptor at or above a threshold, searched with the chunked
nearest-neighbour product of :mod:`catsdogs.audit.similarity` (bounded memory); each image keeps at most
``neighbours`` nearest partners, so a cluster of k copies costs O(k) pairs per member.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from catsdogs.audit.similarity import topk, unit_rows


@dataclass
class Pairs:
    """Duplicate pairs ``(a, b)`` with ``a < b`` and their similarity (1.0 for exact copies), best first."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    """``(m,)`` bool: the stored pixels are identical."""

    def __len__(self) -> int:
        return len(self.a)


def exact_pairs(hashes: np.ndarray) -> set[tuple[int, int]]:
    """Return pairs ``(a, b)``, ``a < b``, of identical pixel hashes (each member to its group's first)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes.tolist()):
        groups[h].append(i)
    pairs: set[tuple[int, int]] = set()
    for members in groups.values():
        pairs.update((members[0], m) for m in members[1:])
    return pairs


def _unit(descriptor: np.ndarray) -> np.ndarray:
    """Centre each descriptor on its own mean (a uniformly brighter copy still matches), unit norm."""
    return unit_rows(descriptor - descriptor.mean(1, keepdims=True))


def near_pairs(descriptor: np.ndarray, threshold: float, neighbours: int, chunk_rows: int,
               progress: bool = True) -> dict[tuple[int, int], float]:
    """Return ``{(a, b): similarity}``, ``a < b``, of descriptor cosine similarity >= ``threshold``.

    ``descriptor`` is ``(n, v, d)``: variant 0 describes the whole image, the others its central crops.
    Every variant of every image is compared with the whole of every other image, so a cropped copy
    matches its original's crop; a pair's similarity is its best over the variants.
    """
    base = _unit(descriptor[:, 0])
    found: dict[tuple[int, int], float] = {}
    for v in range(descriptor.shape[1]):
        query = base if v == 0 else _unit(descriptor[:, v])
        idx, sim = topk(query, base, neighbours + 1, chunk_rows, same=np.arange(len(base)),
                        desc=f"near duplicates {v + 1}/{descriptor.shape[1]}", progress=progress)
        for i, c in zip(*np.nonzero(sim >= threshold), strict=True):
            j = int(idx[i, c])
            key = (min(int(i), j), max(int(i), j))
            found[key] = max(found.get(key, -1.0), float(sim[i, c]))
    return found


def find_duplicates(descriptor: np.ndarray, hashes: np.ndarray, threshold: float, neighbours: int,
                    chunk_rows: int, progress: bool = True) -> Pairs:
    """Return every exact and near-duplicate pair, most similar first."""
    found = near_pairs(descriptor, threshold, neighbours, chunk_rows, progress)
    exact = exact_pairs(hashes)
    for pair in exact:
        found[pair] = 1.0
    keys = sorted(found, key=lambda p: (-found[p], p))
    return Pairs(a=np.array([p[0] for p in keys], dtype=np.int64),
                 b=np.array([p[1] for p in keys], dtype=np.int64),
                 similarity=np.array([found[p] for p in keys], dtype=np.float64),
                 exact=np.array([p in exact for p in keys], dtype=bool))
