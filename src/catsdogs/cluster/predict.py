"""``catsdogs predict --master ...``: classify a folder, a remote prefix or a Parquet table as Spark tasks.

Inputs become one DataFrame of ``(name, uri, content)`` rows, partitions in input order: files listed on
the driver (a folder the executors can read, an ``s3a://``/``hdfs://`` prefix read through
:mod:`catsdogs.io.storage` by the tasks) or a Parquet table of paths or image bytes (read by Spark). Each
task (``mapInPandas``) runs the very code of local predict, :func:`catsdogs.infer.predict.predict_files`
(decode ahead in threads, the predictor's own answer, ``error`` rows for unreadable files) with the
driver's predictor rebuilt once per executor process (:mod:`catsdogs.cluster.ship`).

Each task writes its own rows as a part file and returns only its counts (:mod:`catsdogs.cluster.parts`):
no row passes through Spark's results, so ``spark.driver.maxResultSize`` never bounds the input. The
driver then merges the parts into the one file --output names, or with ``--parts`` keeps them as a
folder. Either is committed whole: a killed driver leaves no file under the output's name.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catsdogs.cluster import parts
from catsdogs.cluster.session import NEEDED, run_job, runtime_modules, spark_session
from catsdogs.cluster.ship import PredictorSpec, Shipment
from catsdogs.config import PredictConfig, check_required, need
from catsdogs.errors import ConfigError, InputError, OutputExistsError
from catsdogs.infer.load import load_predictor
from catsdogs.infer.predict import (
    NamedImage,
    check_output,
    expand_paths,
    is_candidate,
    predict_files,
    summary_line,
    tally,
)
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Predictor
from catsdogs.io import storage

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

ROWS_PER_TASK = 1024
"""Files per task of a listed input (at least two tasks per executor core, for balance at the end)."""
ARROW_ROWS_PATHS = 1024
"""Rows per Arrow batch handed to a task when rows carry paths only (a few bytes each)."""
ARROW_BATCHES_BYTES = 2
"""Forward batches per Arrow batch when rows carry image bytes: bounds a task's memory to a few MB
per image times ``2 x --batch-size``, whatever the table's photos weigh."""
DECODE_THREADS = 2
"""Decode threads per task, as local predict on 2 cores: decoding overlaps the forward pass."""
TABLE_SUFFIX = ".parquet"
"""An input ending in .parquet (a file or a folder of part files) is a table, not an image folder."""
CONTENT_COLUMNS: tuple[str, ...] = ("content", "image", "bytes")
"""Binary columns of a table taken as the image bytes (``content`` is what Spark's binaryFile writes)."""
PATH_COLUMN = "path"
"""String column of a table naming each image (read from it when the table holds no bytes)."""
SUMMARY_DDL = "part int, rows int, errors int, labels string, host string, pid int"
"""What a task returns to the driver: its partition (= its part file), its counts (labels as JSON) and
the process that answered; a few dozen bytes, whatever the task's rows."""


def _inputs(batch: pd.DataFrame) -> list[NamedImage]:
    contents = batch["content"].tolist()
    return [NamedImage(name=str(n), uri=str(u or ""), content=None if c is None else bytes(c))
            for n, u, c in zip(batch["name"].tolist(), batch["uri"].tolist(), contents, strict=True)]


def task(spec: PredictorSpec, batch_size: int, max_pixels: int, staging: str, suffix: str):  # noqa: ANN201
    """The ``mapInPandas`` function: a partition through local predict's path, written as its part."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import pandas as pd
        from pyspark import TaskContext

        predictor = spec.build()
        rows: list[Prediction] = []
        for batch in batches:
            rows += predict_files(predictor, _inputs(batch), batch_size, max_pixels=max_pixels,
                                  workers=DECODE_THREADS, progress=False)
        index = TaskContext.get().partitionId()
        if rows:
            parts.write_part(rows, staging, index, suffix)
        images, errors, labels = tally(rows)
        yield pd.DataFrame({"part": [index], "rows": [images], "errors": [errors],
                            "labels": [json.dumps(labels)], "host": [socket.gethostname()],
                            "pid": [os.getpid()]}).astype({"part": "int32", "rows": "int32",
                                                           "errors": "int32", "pid": "int32"})

    return run


def check_target(output: str | None) -> None:
    """Refuse an --output that exists: a batch job never replaces a finished result."""
    if not output:
        return
    found = storage.exists(output) if storage.is_remote(output) else (Path(output).exists()
                                                                      or Path(output).is_symlink())
    if found:
        raise OutputExistsError(f"--output {output!r} already exists; remove it or choose another --output "
                                f"(predict --master never replaces a finished result)")


def list_sources(patterns: list[str]) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """Split PATHS into listed files ``(input, name, uri)`` and Parquet tables ``(input, uri)``.

    Local entries follow local predict's rules (folders recursively, globs, named files); an s3a:// or
    hdfs:// prefix is listed recursively with the same extension rules; its files are named by URI.
    """
    if not patterns:
        raise InputError("no input given; pass image folders, files, s3a:// / hdfs:// prefixes or Parquet "
                         "tables as PATHS")
    files: list[tuple[int, str, str]] = []
    tables: list[tuple[int, str]] = []
    for k, text in enumerate(patterns):
        if text.rstrip("/").lower().endswith(TABLE_SUFFIX):
            if not storage.is_remote(text) and not Path(text).exists():
                raise InputError(f"table {text!r} does not exist (fix PATHS)")
            tables.append((k, text if storage.is_remote(text) else os.path.abspath(text)))
        elif storage.is_remote(text):
            kind = storage.file_type(text, "PATHS")
            if kind == "file":
                files.append((k, text, text))
                continue
            found = [rel for rel, _ in storage.list_files(text, "PATHS")
                     if is_candidate(Path(rel)) and not any(p.startswith(".") for p in rel.split("/"))]
            if not found:
                raise InputError(f"no image files found under {text!r} (fix PATHS)")
            files.extend((k, storage.join(text, rel), storage.join(text, rel)) for rel in sorted(found))
        else:
            # absolute, not resolved: executors run elsewhere, and a broken link must stay a link
            files.extend((k, str(p), os.path.abspath(p)) for p in expand_paths([text]))
    return files, tables


def _table_frame(spark: SparkSession, k: int, uri: str, partitions: int) -> DataFrame:
    """A Parquet table of paths or image bytes as input rows, in the table's order."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType

    try:
        table = spark.read.parquet(uri)
    except Exception as exc:
        if "No FileSystem for scheme" in str(exc):
            raise ConfigError(f"Spark cannot read {uri!r} itself: give the cluster Hadoop's client for that "
                              f"scheme (for s3a://: --spark-conf spark.jars.packages="
                              f"org.apache.hadoop:hadoop-aws:<Hadoop version>), or list the images' prefix "
                              f"instead of a table") from None
        raise ConfigError(f"cannot read Parquet table {uri!r}: {str(exc).splitlines()[0][:300]}") from None
    types = dict(table.dtypes)
    content = next((c for c in CONTENT_COLUMNS
                    if c in types and isinstance(table.schema[c].dataType, BinaryType)), None)
    has_path = PATH_COLUMN in types and isinstance(table.schema[PATH_COLUMN].dataType, StringType)
    if content is None and not has_path:
        raise ConfigError(f"table {uri!r} has neither a binary {'/'.join(CONTENT_COLUMNS)} column nor a "
                          f"string {PATH_COLUMN!r} column (it has {', '.join(types)}); write one of them")
    order = F.monotonically_increasing_id()
    frame = table.select(
        F.lit(k).cast("int").alias("_input"), order.alias("_order"),
        (F.col(PATH_COLUMN) if has_path else F.concat(F.lit(f"{uri}#"), order.cast("string"))).alias("name"),
        (F.col(PATH_COLUMN) if has_path else F.lit(None).cast("string")).alias("uri"),
        (F.col(content) if content else F.lit(None).cast("binary")).alias("content"))
    # A table of paths is small: spread it over the cores in contiguous ranges, so that partition order
    # stays table order. Image bytes keep Spark's file splits (moving them between executors would cost
    # more than any imbalance); monotonically_increasing_id already follows them.
    if content:
        return frame
    return frame.repartitionByRange(partitions, "_order").sortWithinPartitions("_order")


def _input_frame(spark: SparkSession, files: list[tuple[int, str, str]], tables: list[tuple[int, str]]
                 ) -> tuple[DataFrame, int]:
    """One DataFrame of every input row, partitions in input order, and how many rows it holds.

    Partition order is input order (a union keeps its frames' partitions in turn), so the parts that
    the tasks write, read in name order, are the rows in input order.
    """
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL("_input int, _order bigint, name string, uri string, content binary")
    slots = max(1, spark.sparkContext.defaultParallelism)
    frames, total = [], 0
    pieces: list[tuple[int, object]] = sorted([(k, list(g)) for k, g in groupby(files, key=itemgetter(0))]
                                              + tables, key=itemgetter(0))
    for k, piece in pieces:
        if isinstance(piece, str):
            frame = _table_frame(spark, k, piece, 2 * slots)
            total += frame.count()  # Parquet metadata only
            frames.append(frame)
            continue
        listed = [(k, i, name, uri, None) for i, (_, name, uri) in enumerate(piece)]
        tasks = min(len(listed), max(2 * slots, math.ceil(len(listed) / ROWS_PER_TASK)))
        frames.append(spark.createDataFrame(spark.sparkContext.parallelize(listed, tasks), schema))
        total += len(listed)
    out = frames[0]
    for frame in frames[1:]:
        out = out.union(frame)
    return out, total


def predict_on_spark(spark: SparkSession, cfg: PredictConfig, predictor: Predictor) -> list[Any]:
    """Classify ``cfg.paths`` as Spark tasks that write the parts; commit them; return the tasks' counts."""
    files, tables = list_sources(cfg.paths)
    frame, total = _input_frame(spark, files, tables)
    arrow_rows = ARROW_BATCHES_BYTES * cfg.batch_size if tables else ARROW_ROWS_PATHS
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_rows))
    suffix = parts.suffix_of(cfg.output)
    staging = parts.make_staging(cfg.output)
    try:
        with Shipment(spark.sparkContext) as shipment:
            spec = shipment.predictor(predictor, cfg.threads)
            result = frame.mapInPandas(task(spec, cfg.batch_size, cfg.max_pixels, staging, suffix),
                                       SUMMARY_DDL)
            counts = run_job(spark, need(cfg, "master"), result.collect, "catsdogs predict",
                             progress=(total, frame.rdd.getNumPartitions(), "predict"))
        counts.sort(key=lambda c: c.part)
        names = [parts.part_name(c.part, suffix) for c in counts if c.rows]
        check_target(cfg.output)  # another run may have finished meanwhile
        if cfg.parts:
            parts.commit_folder(staging, names, need(cfg, "output"))
        else:
            parts.merge(staging, names, cfg.output)
    finally:
        parts.remove(staging)
    return counts


def main(cfg: PredictConfig) -> int:
    """Run ``catsdogs predict --master``: list inputs, answer and write them on Spark, commit the whole."""
    check_output(cfg.output)
    if cfg.explain:
        raise ConfigError("--explain draws heatmaps on this machine; run it without --master (on a few "
                          "files)")
    if cfg.parts and not cfg.output:
        raise ConfigError("--parts writes a folder of part files: give it a name with --output (e.g. "
                          "--output answers.csv)")
    check_target(cfg.output)
    check_required(cfg)
    start = time.perf_counter()
    # The model loads (engine compile included) while the JVM starts: two fixed costs paid at once.
    with ThreadPoolExecutor(1, thread_name_prefix="catsdogs-load") as pool:
        loading = pool.submit(load_predictor, need(cfg, "run"), cfg, tracking_uri=cfg.tracking_uri)
        modules = lambda: NEEDED + runtime_modules(loading.result().backend)  # noqa: E731
        try:
            with spark_session(need(cfg, "master"), "catsdogs-predict", cfg.spark_conf, modules) as spark:
                counts = predict_on_spark(spark, cfg, loading.result())
        except BaseException:
            if loading.done() and loading.exception() is not None:
                raise loading.exception() from None  # a bad --run is the error, not what followed it
            raise
    seconds = time.perf_counter() - start
    labels: Counter[str] = Counter()
    for c in counts:
        labels.update(json.loads(c.labels))
    line = summary_line(sum(c.rows for c in counts), sum(c.errors for c in counts), labels, seconds)
    processes = {(c.host, c.pid) for c in counts if c.rows}
    print(f"{line} on {cfg.master} ({len(processes)} executor processes)", file=sys.stderr)
    return 0
