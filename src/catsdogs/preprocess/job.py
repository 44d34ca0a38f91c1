"""The Spark job of ``catsdogs preprocess``: one task per shard plan, with a progress bar.

Spark runs ONE TASK PER SHARD (a parallelized list of shard plans, one per partition); the work of a
task is :func:`catsdogs.preprocess.task.process_shard`. An RDD ``map``, not a DataFrame
``mapInArrow``: the same tasks through a plan DataFrame started their first task later on a cold
session (Catalyst planning, an extra Python worker feeding the plan rows), measured in
docs/benchmarks/preprocess.md.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from catsdogs.preprocess.plan import ShardPlan
from catsdogs.preprocess.task import TaskSettings, rdd_task
from catsdogs.spark import TaskProgress

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def _columns_to_rows(cols: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Turn one task's column lists into row dicts."""
    keys = list(cols)
    return [dict(zip(keys, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def run_shard_tasks(spark: SparkSession, plans: list[ShardPlan], settings: TaskSettings,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Run one Spark task per shard plan; return the collected metadata rows as dicts.

    One partition per shard; only paths and metadata move, never pixels.
    """
    sc = spark.sparkContext
    rows = [(p.split, p.index, list(p.paths), list(p.labels)) for p in plans]
    # One element per partition: parallelize slices a list of n items into n partitions of one,
    # so every Spark task is exactly one shard.
    source = sc.parallelize(rows, numSlices=len(rows))
    group = f"catsdogs-preprocess-{secrets.token_hex(4)}"
    sc.setJobGroup(group, f"catsdogs preprocess: {len(plans)} shards", interruptOnCancel=True)
    total = sum(len(p.paths) for p in plans)

    def collect() -> list[dict[str, Any]]:
        return [row for cols in source.map(rdd_task(settings)).collect() for row in _columns_to_rows(cols)]

    try:
        if progress:
            with TaskProgress(sc, group, total, len(plans), "preprocess"):
                return collect()
        return collect()
    except KeyboardInterrupt:
        sc.cancelJobGroup(group)
        raise
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]


