"""One Spark job over a shards folder: a task per shard (or per group of shards), arrays back per shard.

The executors read the shards themselves (a shared path, or ``s3a://``/``hdfs://``, each task fetching
only its own shard and checking its sha256 against the manifest), run a picklable per-batch *work*
(:mod:`catsdogs.cluster.work`: the feature pass, evaluate's answers, audit's pixel facts) and send
back small arrays. Pixels never cross the network to the driver; features do, either collected (at
most :data:`COLLECT_LIMIT_BYTES`) or, above that, as Parquet feature shards written by the tasks into
a folder the driver reads back (``spill``).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from catsdogs.cluster import ship
from catsdogs.io import storage
from catsdogs.shards.cache import fetch_verified
from catsdogs.shards.feature_shards import read_feature_shard, write_feature_shard
from catsdogs.shards.manifest import Manifest, ShardInfo
from catsdogs.shards.reader import open_shard, shard_batches

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

COLLECT_LIMIT_BYTES = 512 << 20
"""Largest estimated result collected through the driver JVM (Spark's default
``spark.driver.maxResultSize`` is 1 GiB, and the local driver's heap 1 GiB); above it the tasks write
Parquet feature shards instead. The default preset's 14,400 training images are 155 MB of features."""

Arrays = dict[str, np.ndarray]
Key = tuple[str, int]
"""``(split, position of the shard in the split's shard list)``."""


class BatchWork(Protocol):
    """Per-batch work of a task: uint8 NHWC images, labels and their split in, named arrays out.

    Every returned array has one row per image. ``spec`` is what the work builds on an executor (an
    engine or predictor spec), counted in the job's report.
    """

    spec: object

    def __call__(self, x: np.ndarray, y: np.ndarray, split: str) -> Arrays: ...


@dataclass(frozen=True)
class Item:
    """One shard of a task: where it sits in its split and the manifest's entry for it."""

    split: str
    pos: int
    info: ShardInfo


@dataclass
class JobReport:
    """What the job did, for the log line and the tests."""

    tasks: int = 0
    rows: int = 0
    seconds: float = 0.0
    processes: set[tuple[str, int]] = field(default_factory=set)
    """``(host, pid)`` of every Python worker that ran a task."""
    builds: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    """What each of those processes built, in order (:func:`catsdogs.cluster.ship.builds`)."""
    key: str = ""
    """``repr`` of the spec the job's work builds (its engine or predictor)."""
    spilled: bool = False
    files: dict[Key, str] = field(default_factory=dict)
    """The feature shard each task wrote, per shard (with ``spill``)."""

    @property
    def engine_builds(self) -> int:
        """How often the job's engine was built, over all processes: one per process when cached."""
        return sum(b.count(self.key) for b in self.builds.values())

    def line(self, desc: str, master: str) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        return (f"catsdogs: {desc}: {self.rows:,} images in {self.tasks} Spark tasks on {master} "
                f"({len(self.processes)} executor processes, {self.engine_builds} engine builds), "
                f"{self.seconds:.1f} s ({rate:.1f} images/s)"
                f"{'; features via Parquet feature shards' if self.spilled else ''}")


def shard_items(manifest: Manifest, splits: tuple[str, ...]) -> list[Item]:
    """Every shard of ``splits``, in split then shard order."""
    return [Item(split, pos, info) for split in splits
            for pos, info in enumerate(manifest.split_shards(split))]


def group_items(items: list[Item], groups: int) -> list[list[Item]]:
    """One task per shard (``groups`` 0), or ``groups`` tasks balanced by rows (largest shard first)."""
    if groups <= 0 or groups >= len(items):
        return [[it] for it in items]
    bins: list[list[Item]] = [[] for _ in range(groups)]
    load = [0] * groups
    for it in sorted(items, key=lambda i: -i.info.rows):
        k = load.index(min(load))
        bins[k].append(it)
        load[k] += it.info.rows
    return [b for b in bins if b]


@contextmanager
def opened(data: str, info: ShardInfo, size: int) -> Iterator[tuple[Any, np.ndarray]]:
    """Open one shard on an executor: in place (shared path), or fetched and verified (remote URI)."""
    if not storage.is_remote(data):
        yield open_shard(data, info, size)
        return
    with tempfile.TemporaryDirectory(prefix="catsdogs-shard-") as tmp:
        for rel, sha in dict(((info.x, info.x_sha256), (info.y, info.y_sha256))).items():
            fetch_verified(data, rel, Path(tmp) / rel, sha)
        yield open_shard(tmp, info, size)


def _spill_path(spill: str, key: Key) -> str:
    return storage.join(spill, key[0], f"part_{key[1]:05d}.parquet") if storage.is_remote(spill) \
        else os.path.join(spill, key[0], f"part_{key[1]:05d}.parquet")


def shard_arrays(x: Any, y: np.ndarray, split: str, work: BatchWork, batch_size: int,
                 each_batch: Callable[[], object] | None = None) -> Arrays:
    """Run ``work`` over one opened shard, ``batch_size`` rows at a time; its arrays, concatenated.

    What a Spark task does with each of its shards, and :func:`run_local` with each shard here.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for _start, xb, yb in shard_batches(x, y, batch_size):
        for name, a in work(xb, yb, split).items():
            parts.setdefault(name, []).append(a)
        if each_batch is not None:
            each_batch()
    return {name: np.concatenate(v) for name, v in parts.items()}


def run_local(data: str | Path, manifest: Manifest, splits: tuple[str, ...], work: BatchWork, *,
              batch_size: int, desc: str, progress: bool = True) -> dict[Key, Arrays]:
    """:func:`run_shards` on this machine: the same work over every shard of ``splits``, arrays per shard.

    One shard is open at a time, one batch of pixels in memory. A shard without rows gives no arrays.
    """
    from catsdogs.progress import progress_bar

    items = shard_items(manifest, splits)
    total = sum(-(-it.info.rows // batch_size) for it in items)
    results: dict[Key, Arrays] = {}
    with progress_bar(total=total, desc=desc, unit="batch", disable=not progress) as bar:
        for it in items:
            x, y = open_shard(data, it.info, manifest.size)
            results[(it.split, it.pos)] = shard_arrays(x, y, it.split, work, batch_size,
                                                       lambda: bar.update(1))
    return results


def _task(data: str, size: int, batch_size: int, work: BatchWork, spill: str
          ) -> Callable[[list[Item]], list[tuple[dict[str, Any], Arrays]]]:
    """Return the RDD ``map`` function: one group of shards in, ``(meta, arrays)`` per shard out."""

    def run(items: list[Item]) -> list[tuple[dict[str, Any], Arrays]]:
        out = []
        for it in items:
            t0 = time.perf_counter()
            with opened(data, it.info, size) as (x, y):
                arrays = shard_arrays(x, y, it.split, work, batch_size)
            meta: dict[str, Any] = {"split": it.split, "pos": it.pos, "rows": it.info.rows,
                                    "host": socket.gethostname(), "pid": os.getpid(),
                                    "builds": ship.builds(), "seconds": time.perf_counter() - t0}
            if spill:
                meta["file"] = _spill_path(spill, (it.split, it.pos))
                write_feature_shard(meta["file"], arrays)
                arrays = {}
            out.append((meta, arrays))
        return out

    return run


def run_shards(spark: SparkSession, master: str, data: str, manifest: Manifest, splits: tuple[str, ...],
               work: BatchWork, *, batch_size: int, groups: int = 0, desc: str = "features",
               spill: str = "", keep: tuple[str, ...] = (), progress: bool = True
               ) -> tuple[dict[Key, Arrays], JobReport]:
    """Run ``work`` over every shard of ``splits`` on the executors; return arrays per shard and a report.

    ``data`` is where executors read the shards (a path all nodes share, or a remote URI). ``spill``
    (a folder all nodes and the driver share) makes the tasks write Parquet feature shards there
    instead of sending arrays back; they are read back, except for the splits in ``keep``: those stay
    on disk (their labels are read), named in ``report.files``, for a pass that streams them.
    """
    from catsdogs.cluster.session import run_job  # lazy: keeps this module importable on executors

    items = shard_items(manifest, splits)
    report = JobReport(rows=sum(it.info.rows for it in items), spilled=bool(spill), key=repr(work.spec))
    tasks = group_items(items, groups)
    report.tasks = len(tasks)
    if not tasks:
        return {}, report
    sc = spark.sparkContext
    rdd = sc.parallelize(tasks, numSlices=len(tasks)).map(_task(data, manifest.size, batch_size, work, spill))
    t0 = time.perf_counter()
    rows = run_job(spark, master, lambda: rdd.collect(), f"catsdogs {desc}",
                   progress=(report.rows, len(tasks), desc) if progress else None)
    report.seconds = time.perf_counter() - t0
    results: dict[Key, Arrays] = {}
    for group in rows:
        for meta, arrays in group:
            proc = (str(meta["host"]), int(meta["pid"]))
            report.processes.add(proc)
            report.builds[proc] = list(meta["builds"])
            key = (meta["split"], int(meta["pos"]))
            if spill:
                report.files[key] = meta["file"]
                arrays = read_feature_shard(meta["file"], ["labels"] if key[0] in keep else None)
            results[key] = arrays
    print(report.line(desc, master), file=sys.stderr, flush=True)
    return results, report


def in_shard_order(results: dict[Key, Arrays], split: str, shards: int) -> list[Arrays]:
    """The per-shard results of ``split`` in shard order (tasks finish in any order; a local pass doesn't)."""
    return [results[(split, pos)] for pos in range(shards)]
