"""Features of a whole shard split, kept beside the run and reused while they would come out the same.

``catsdogs run`` computes the test split's features in training's feature pass (same engine, already
compiled) and ``evaluate`` reads them instead of running the engine again; a later ``evaluate`` of the
same run reuses what the first one computed. A cache file is used only when its key matches exactly:

* the split's shards: the manifest's classes, size and each shard's files, row count and SHA-256,
  plus each file's size and modification time (a file rewritten in place changes them);
* the checkpoint's SHA-256 (another checkpoint may hold other backbone weights);
* the engine asked for (``--backend``) and the int8 bound, and the size and modification time of the
  graph file the engine that ran read (a re-made graph changes them);
* the normalisation and input size.

So evaluate checks the cache before building any engine (no compile). Anything else (flip TTA, a torch
engine, which has no graph file to pin) is computed as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.engines.base import Engine
from catsdogs.io.atomic import atomic_write_bytes
from catsdogs.shards.manifest import Manifest

FORMAT = 1
"""Version of the cache file's layout and key; a file of another version is ignored."""


def split_digest(root: str | Path, manifest: Manifest, split: str) -> str:
    """SHA-256 naming the content of ``split``: manifest checksums plus each shard file's size and mtime."""
    facts: list[Any] = [list(manifest.classes), int(manifest.size), manifest.resize]
    for info in manifest.split_shards(split):
        stamps = []
        for rel in info.files():
            st = os.stat(Path(root) / rel)
            stamps.append([rel, st.st_size, st.st_mtime_ns])
        facts.append([info.rows, info.x_sha256, info.y_sha256, stamps])
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def graph_stamp(path: str | Path) -> list[int]:
    """Size and mtime (ns) of an engine's graph file ([] when absent)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns]


def base_key(root: str | Path, manifest: Manifest, split: str, checkpoint_sha256: str, backend: str,
             max_drop_pt: float, mean: tuple[float, ...], std: tuple[float, ...], size: int
             ) -> dict[str, Any]:
    """What a cache file must have been made from to be used, as known before any engine is built."""
    return {"format": FORMAT, "split": split, "split_sha256": split_digest(root, manifest, split),
            "checkpoint_sha256": checkpoint_sha256, "backend": backend, "max_drop_pt": float(max_drop_pt),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "size": int(size)}


@dataclass
class Cached:
    """A cache file that matched: the split's features and labels, and what made them."""

    feats: np.ndarray
    labels: np.ndarray
    engine: str
    facts: dict[str, Any]


def save(path: Path, feats: np.ndarray, labels: np.ndarray, base: dict[str, Any], engine: Engine) -> bool:
    """Write features, labels, the key and the engine's facts atomically (one ``.npz``).

    Only engines that run a graph file are cached (its size and mtime are part of the key); returns
    whether the file was written.
    """
    graph = engine.path
    if graph is None or not graph_stamp(graph):
        return False
    made = {"engine": engine.name, "graph": Path(graph).name, "graph_stamp": graph_stamp(graph)}
    buf = io.BytesIO()
    np.savez(buf, feats=np.asarray(feats, np.float32), labels=np.asarray(labels, np.int64),
             key=np.array(json.dumps(base, sort_keys=True)), made=np.array(json.dumps(made, sort_keys=True)),
             facts=np.array(json.dumps(engine.describe(), sort_keys=True, default=str)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return True


def load(path: Path, base: dict[str, Any], engine_dir: Path) -> Cached | None:
    """The cache at ``path`` if it was made from exactly ``base`` by a graph still as it was, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != json.loads(json.dumps(base, sort_keys=True)):
                return None
            made = json.loads(str(data["made"]))
            if graph_stamp(engine_dir / str(made["graph"])) != made["graph_stamp"]:
                return None
            return Cached(np.asarray(data["feats"]), np.asarray(data["labels"]), str(made["engine"]),
                          dict(json.loads(str(data["facts"]))))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class ReplayEngine(Engine):
    """Answers a pass over the split in order with the cached features (no forward pass).

    ``features_of`` the wrong number of images, or more calls than rows, is an error: the replay is only
    valid for the exact pass the cache was made by.
    """

    cached: np.ndarray
    facts: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    used: int = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self.used + n > len(self.cached):
            raise RuntimeError(f"cached features hold {len(self.cached)} rows, asked for row {self.used + n}")
        out = self.cached[self.used:self.used + n]
        self.used += n
        return np.array(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return dict(self.facts) or super().describe()


@dataclass
class RecordingEngine(Engine):
    """Runs ``inner`` and keeps every output in order, to be saved as the split's cache afterwards."""

    inner: Engine
    rows: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name, self.guard = self.inner.name, self.inner.guard
        self.fp32_sha256, self.graph_sha256 = self.inner.fp32_sha256, self.inner.graph_sha256

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.inner.run(x)
        self.rows.append(out)
        return out

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for out in self.inner.stream(batches):
            self.rows.append(out)
            yield out

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def recorded(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)
