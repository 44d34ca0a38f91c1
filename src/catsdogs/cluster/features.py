"""The frozen-backbone feature pass as one Spark job (``train --freeze backbone`` on a cluster, audit).

The driver has already built the engine (export, int8 calibration, as a local run does); the job ships
its graph, runs :class:`catsdogs.cluster.work.FeatureWork` over every shard of the asked splits and
returns each split's features in shard order with mirrored rows appended, exactly the arrays
:func:`catsdogs.train.features.extract_features` returns in one process.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from catsdogs.cluster.shardjob import COLLECT_LIMIT_BYTES, Arrays, JobReport, Key, run_shards
from catsdogs.cluster.ship import Shipment
from catsdogs.cluster.work import FeatureWork, split_features
from catsdogs.engines.base import Engine
from catsdogs.shards.feature_shards import Part, PartFn, PartMapper, StreamedFeatures, part_arrays
from catsdogs.shards.manifest import Manifest

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

Features = dict[str, tuple[np.ndarray | StreamedFeatures, np.ndarray]]


def feature_width(engine: Engine, side: int) -> int:
    """Length of one image's feature vector (one forward pass of a blank image on the driver)."""
    return int(engine.run(np.zeros((1, 3, side, side), np.float32)).shape[1])


STREAMED_SPLIT = "train"
"""The split whose features may stay on disk: the head and detector fit on it by passes; validation's
are always held (the C choice, the int8 guard, the threshold and the temperature read them whole)."""


def spark_features(spark: SparkSession, master: str, data: str, manifest: Manifest, engine: Engine,
                   model: nn.Module, model_config: dict[str, Any], mean: tuple[float, ...],
                   std: tuple[float, ...], splits: dict[str, bool], *, batch_size: int,
                   threads: int | None = None, groups: int = 0, size: int | None = None,
                   spill: Path | None = None, stream_above: int | None = None, desc: str = "features"
                   ) -> tuple[Features, JobReport]:
    """Features and labels of each split in ``splits`` (value: also its mirror images), run on Spark.

    ``data`` is read by the executors (shared path or remote URI). Above
    :data:`~catsdogs.cluster.shardjob.COLLECT_LIMIT_BYTES` of features, and with ``spill`` (a folder
    the executors and the driver share), the tasks write Parquet feature shards there; they are read
    back and deleted. When :data:`STREAMED_SPLIT`'s float32 features would exceed ``stream_above``
    bytes (and ``spill`` is given) its shards stay there instead, returned as
    :class:`~catsdogs.shards.feature_shards.StreamedFeatures`: the caller deletes ``spill`` when done.
    """
    names = tuple(s for s in splits if manifest.split_rows(s))
    rows = {s: manifest.split_rows(s) * (2 if splits[s] else 1) for s in names}
    width = feature_width(engine, size or manifest.size)
    stream = tuple(s for s in names if s == STREAMED_SPLIT and spill is not None and stream_above is not None
                   and rows[s] * width * 4 > stream_above)
    use_spill = spill is not None and (bool(stream) or sum(rows.values()) * width * 4 > COLLECT_LIMIT_BYTES)
    if use_spill:
        _clear(spill, names)  # a killed run's leftovers (other splits' streamed shards stay)
    try:
        with Shipment(spark.sparkContext) as shipment:
            spec = shipment.engine(engine, model, model_config, threads)
            work = FeatureWork(spec, tuple(mean), tuple(std), tuple(s for s in names if splits[s]), size)
            results, report = run_shards(spark, master, data, manifest, names, work, batch_size=batch_size,
                                         groups=groups, desc=f"{desc} {'+'.join(names)} ({engine.name})",
                                         spill=str(spill) if use_spill else "", keep=stream)
    except BaseException:
        if use_spill:
            _clear(spill, names)
        raise
    out: Features = {}
    for s in names:
        if s in stream:
            out[s] = _streamed(results, report, manifest, s, splits[s], width, executor_mapper(spark, master))
            print(f"{desc} {s}: {rows[s] * width * 4 >> 20} MB of float32 features stay on disk as feature "
                  f"shards; the head is fitted by passes over them", file=sys.stderr)
        else:
            out[s] = split_features(results, len(manifest.split_shards(s)), s)
    if use_spill:
        _clear(spill, tuple(s for s in names if s not in stream))  # read back: no longer needed
    for s in splits:
        out.setdefault(s, (np.zeros((0, 0), np.float32), np.zeros(0, np.int64)))
    return out, report


def _clear(spill: Path | None, splits: tuple[str, ...]) -> None:
    """Delete the feature shards of ``splits`` under ``spill`` (one folder per split)."""
    for s in splits:
        if spill is not None:
            shutil.rmtree(spill / s, ignore_errors=True)


def executor_mapper(spark: SparkSession, master: str) -> PartMapper:
    """A :data:`~catsdogs.shards.feature_shards.PartMapper` that runs each part as a Spark task.

    One job per call, one task per feature shard, read by the executor that runs it: a head pass over
    millions of rows reads them on every executor at once, and the driver only sums what comes back
    (a gradient of ``logits x width`` float64 per shard: 20 KB at 2,560 features).
    """
    from catsdogs.cluster.session import run_job  # lazy: keeps this module importable on executors

    def run(fn: PartFn, parts: Sequence[Part]) -> list[Any]:
        if not parts:
            return []
        rdd = spark.sparkContext.parallelize(list(parts), len(parts))
        rdd = rdd.map(lambda part: fn(*part_arrays(*part)))
        return run_job(spark, master, rdd.collect, "catsdogs head pass")

    return run


def _streamed(results: dict[Key, Arrays], report: JobReport, manifest: Manifest, split: str, flip: bool,
              width: int, mapper: PartMapper) -> tuple[StreamedFeatures, np.ndarray]:
    """A kept split's feature shards as streamed features (mirrored rows after), and its labels."""
    shards = range(len(manifest.split_shards(split)))
    files = [report.files[(split, pos)] for pos in shards]
    columns = ("features", "flipped") if flip else ("features",)
    labels = np.concatenate([results[(split, pos)]["labels"] for pos in shards]).astype(np.int64)
    labels = np.concatenate([labels] * len(columns))
    parts = tuple((f, c) for c in columns for f in files)
    return StreamedFeatures(parts, len(labels), width, mapper), labels
