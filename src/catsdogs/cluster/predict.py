"""``catsdogs predict --master ...``: classify a folder, a remote prefix or a Parquet table as Spark tasks.

Inputs become one DataFrame of ``(name, uri, content)`` rows: files listed on the driver (a folder the
executors can read, an ``s3a://``/``hdfs://`` prefix read through :mod:`catsdogs.io.storage` by the
tasks) or a Parquet table of paths or image bytes (read by Spark). Each task runs the very code of
local predict, :func:`catsdogs.infer.predict.predict_files` (decode ahead in threads, the predictor's
own answer, the same rows, ``error`` rows for unreadable files) with the driver's predictor rebuilt
once per executor process (:mod:`catsdogs.cluster.ship`). Two Spark APIs run it: ``mapInPandas``
(default) and ``pyspark.ml.functions.predict_batch_udf``; docs/cluster.md measures both.

The rows come back to the driver (about 100 bytes each), are put back in input order and written
whole by :func:`catsdogs.infer.predict.write_rows`: a temporary file renamed (local) or uploaded and
moved (S3, HDFS). A killed driver leaves no file under the output's name.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs.cluster.session import NEEDED, run_job, runtime_modules, spark_session
from catsdogs.cluster.ship import PredictorSpec, Shipment
from catsdogs.config import PredictConfig, check_required
from catsdogs.errors import ConfigError, InputError, OutputExistsError
from catsdogs.infer.load import load_predictor
from catsdogs.infer.predict import (
    Input,
    check_output,
    expand_paths,
    is_candidate,
    predict_files,
    summary,
    write_rows,
)
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Predictor
from catsdogs.io import storage

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

APIS: tuple[str, ...] = ("pandas", "udf")
"""Spark APIs that run the tasks: ``mapInPandas`` and ``predict_batch_udf`` (same rows)."""
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
ROW_DDL = "path string, error string, record string"
"""A task's answer per input: the row's name and error (readable in Spark's UI and logs), and the whole
:meth:`~catsdogs.infer.prediction.Prediction.to_dict` record as JSON text, so every field local predict
fills (``looks_like`` and any added later) reaches the driver without a schema change."""


def result_ddl() -> str:
    """Spark DDL of a task's output rows: the sort keys, the answering process, the row itself."""
    return "_input int, _order bigint, _host string, _pid int, " + ROW_DDL


def _frame(keys: pd.DataFrame, rows: list[Prediction]) -> pd.DataFrame:
    """Output rows of one batch as a pandas frame matching :func:`result_ddl`."""
    import pandas as pd

    return pd.DataFrame({"_input": keys["_input"].to_numpy(np.int32),
                         "_order": keys["_order"].to_numpy(np.int64),
                         "_host": socket.gethostname(), "_pid": np.int32(os.getpid()),
                         "path": [r.path for r in rows], "error": [r.error for r in rows],
                         "record": [json.dumps(r.to_dict()) for r in rows]})


def _inputs(batch: pd.DataFrame) -> list[Input]:
    contents = batch["content"].tolist()
    return [Input(name=str(n), uri=str(u or ""), content=None if c is None else bytes(c))
            for n, u, c in zip(batch["name"].tolist(), batch["uri"].tolist(), contents, strict=True)]


def pandas_task(spec: PredictorSpec, batch_size: int, max_pixels: int):  # noqa: ANN201 - Spark's callable
    """The ``mapInPandas`` function: every Arrow batch of a partition through local predict's path."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        predictor = spec.build()
        for batch in batches:
            rows = predict_files(predictor, _inputs(batch), batch_size, max_pixels=max_pixels,
                                 workers=DECODE_THREADS, progress=False)
            yield _frame(batch, rows)

    return run


def udf_predict(spec: PredictorSpec, batch_size: int, max_pixels: int):  # noqa: ANN201 - Spark's callable
    """The ``predict_batch_udf`` column: the same rows, one batch of ``batch_size`` inputs per call."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL(result_ddl())

    def make() -> Any:
        import pandas as pd

        predictor = spec.build()

        def predict(source: np.ndarray, order: np.ndarray, name: np.ndarray, uri: np.ndarray,
                    content: np.ndarray) -> dict[str, np.ndarray]:
            batch = pd.DataFrame({"_input": source, "_order": order, "name": name, "uri": uri,
                                  "content": content})
            rows = predict_files(predictor, _inputs(batch), batch_size, max_pixels=max_pixels,
                                 workers=DECODE_THREADS, progress=False)
            frame = _frame(batch, rows)
            return {c: frame[c].to_numpy() for c in frame.columns}

        return predict

    return predict_batch_udf(make, return_type=schema, batch_size=batch_size)


def check_target(output: str) -> None:
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
    # A table of paths is small: spread it over the cores. Image bytes keep Spark's file splits (moving
    # them between executors would cost more than any imbalance).
    return frame if content else frame.repartition(partitions)


def _input_frame(spark: SparkSession, files: list[tuple[int, str, str]], tables: list[tuple[int, str]]
                 ) -> tuple[DataFrame, int]:
    """One DataFrame of every input row, and how many rows it holds."""
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL("_input int, _order bigint, name string, uri string, content binary")
    slots = max(1, spark.sparkContext.defaultParallelism)
    frames = []
    total = len(files)
    if files:
        tasks = min(len(files), max(2 * slots, math.ceil(len(files) / ROWS_PER_TASK)))
        rows = [(k, i, name, uri, None) for i, (k, name, uri) in enumerate(files)]
        frames.append(spark.createDataFrame(spark.sparkContext.parallelize(rows, tasks), schema))
    for k, uri in tables:
        frame = _table_frame(spark, k, uri, 2 * slots)
        total += frame.count()  # Parquet metadata only
        frames.append(frame)
    out = frames[0]
    for frame in frames[1:]:
        out = out.unionByName(frame)
    return out, total


def to_rows(table: Any, classes: list[str]) -> tuple[list[Prediction], set[tuple[str, int]]]:
    """Predictions of the collected Arrow table in input order, and the executor processes that answered."""
    records = table.to_pylist()
    records.sort(key=lambda r: (r["_input"], r["_order"]))
    rows = [Prediction.from_dict(json.loads(r["record"]), classes) for r in records]
    return rows, {(str(r["_host"]), int(r["_pid"])) for r in records}


def predict_on_spark(spark: SparkSession, cfg: PredictConfig, predictor: Predictor, api: str = "pandas"
                     ) -> tuple[list[Prediction], set[tuple[str, int]]]:
    """Classify ``cfg.paths`` as Spark tasks with ``predictor`` (shipped); rows in input order."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    files, tables = list_sources(cfg.paths)
    frame, total = _input_frame(spark, files, tables)
    arrow_rows = ARROW_BATCHES_BYTES * cfg.batch_size if tables else ARROW_ROWS_PATHS
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_rows))
    with Shipment(spark.sparkContext) as shipment:
        spec = shipment.predictor(predictor, cfg.threads)
        if api == "pandas":
            result = frame.mapInPandas(pandas_task(spec, cfg.batch_size, cfg.max_pixels), result_ddl())
        else:
            column = udf_predict(spec, cfg.batch_size, cfg.max_pixels)
            answers = column("_input", "_order", "name", "uri", "content").alias("r")
            result = frame.select(answers).select("r.*")
        tasks = frame.rdd.getNumPartitions()
        table = run_job(spark, cfg.master, result.toArrow, "catsdogs predict",
                        progress=(total, tasks, "predict"))
    return to_rows(table, list(predictor.classes))


def main(cfg: PredictConfig, api: str = "pandas") -> int:
    """Run ``catsdogs predict --master``: list inputs, answer them on Spark, write the rows whole."""
    check_output(cfg.output)
    if cfg.explain:
        raise ConfigError("--explain draws heatmaps on this machine; run it without --master (on a few "
                          "files)")
    check_target(cfg.output)
    check_required(cfg)
    predictor = load_predictor(cfg.run, cfg, tracking_uri=cfg.tracking_uri)
    modules = NEEDED + runtime_modules(predictor.backend)
    start = time.perf_counter()
    with spark_session(cfg.master, "catsdogs-predict", cfg.spark_conf, modules) as spark:
        rows, processes = predict_on_spark(spark, cfg, predictor, api)
    check_target(cfg.output)  # another run may have finished meanwhile
    write_rows(rows, cfg.output)
    seconds = time.perf_counter() - start
    print(f"{summary(rows, seconds)} on {cfg.master} ({len(processes)} executor processes)", file=sys.stderr)
    return 0
