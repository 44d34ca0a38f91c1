"""SHA-256 of files: shard integrity (manifest, cache) and export freshness use the same digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20
"""Read size while hashing (1 MiB): large enough to stay at disk speed, small enough for any RAM."""


def sha256_file(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Return the hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
