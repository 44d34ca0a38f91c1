"""Predict's output written by the Spark tasks: one part file per task, committed whole by the driver.

Each task writes its rows, in input order, as ``part-NNNNN.<ext>`` (NNNNN: the task's partition, so
name order is input order) into a hidden staging folder beside --output, ``.NAME.parts-TOKEN``, which
the driver made; for an s3a:// or hdfs:// --output, under a staging prefix there. Only a count per
task reaches the driver, so ``spark.driver.maxResultSize`` and the driver's memory bound nothing.
Then the driver commits:

* ``--parts``: the staging folder becomes --output (a rename; on S3 one copy per part), with
  ``_SUCCESS`` written last, as Spark's own writers do. No row passes through the driver.
* otherwise: the parts are appended, in name order, into the one file --output names (one part in
  memory at a time), published atomically as local predict's output is.

A killed driver leaves only the hidden staging folder, which nothing takes for a result.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from catsdogs.cluster.session import USER_ERROR
from catsdogs.infer.predict import parquet_schema, write_csv, write_json_records, write_rows
from catsdogs.infer.prediction import Prediction
from catsdogs.io import storage
from catsdogs.io.atomic import atomic_open

PART_PREFIX = "part-"
"""Part files are ``part-00000.csv``, ``part-00001.csv``, ...: the task's partition, zero-padded."""
SUCCESS = "_SUCCESS"
"""Written last into a --parts output: its presence says every part is there (Spark's convention)."""
STDOUT_SUFFIX = ".csv"
"""Format of the parts when rows go to stdout (no --output): CSV, as local predict prints."""


def part_name(index: int, suffix: str) -> str:
    """File name of partition ``index``'s part."""
    return f"{PART_PREFIX}{index:05d}{suffix}"


def suffix_of(output: str | None) -> str:
    """The parts' format: --output's extension (CSV for stdout)."""
    return Path(output).suffix.lower() if output else STDOUT_SUFFIX


def make_staging(output: str | None) -> str:
    """Create the hidden staging folder for ``output`` (a private temporary one for stdout)."""
    if not output:
        return tempfile.mkdtemp(prefix="catsdogs-predict-")
    token = secrets.token_hex(4)
    if storage.is_remote(output):
        parent, _, name = output.rstrip("/").rpartition("/")
        return f"{parent}/.{name}.parts-{token}"  # S3 needs no folder; HDFS's is made by the upload
    out = Path(output).absolute()
    staging = out.parent / f".{out.name}.parts-{token}"
    staging.mkdir(parents=True)
    return str(staging)


def write_part(rows: Sequence[Prediction], staging: str, index: int, suffix: str) -> None:
    """Write one task's rows as its part (on an executor); atomic, so a retried task just rewrites it."""
    name = part_name(index, suffix)
    if storage.is_remote(staging):
        write_rows(rows, storage.join(staging, name))  # its own upload-then-move: whole or absent
        return
    if not os.path.isdir(staging):  # atomic_open would create it on this machine, where nobody reads it
        raise RuntimeError(f"{USER_ERROR}the output folder {os.path.dirname(staging)!r} is not visible on "
                           f"this executor; give --output on storage every machine reads (s3a://, hdfs:// "
                           f"or a shared folder)")
    write_rows(rows, os.path.join(staging, name))


def _read(staging: str, name: str) -> bytes:
    if storage.is_remote(staging):
        return storage.read_bytes(storage.join(staging, name))
    return Path(staging, name).read_bytes()


def _append(staging: str, names: Sequence[str], suffix: str, fh: IO[bytes]) -> None:
    """Append the parts ``names`` (in order) into ``fh`` as one file of ``suffix``'s format."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only Parquet output needs it

        with pq.ParquetWriter(fh, parquet_schema()) as writer:
            for name in names:
                writer.write_table(pq.read_table(io.BytesIO(_read(staging, name))))
        return
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")  # the CSV and JSON writers write text
    if suffix == ".json":
        records = (r for name in names for r in json.loads(_read(staging, name)))
        write_json_records(records, text)
    else:
        write_csv([], text)  # the header, once
        for name in names:
            body = _read(staging, name).decode()
            text.write(body.split("\n", 1)[1] if "\n" in body else "")
    text.flush()
    text.detach()  # leave fh open: its owner closes it


def merge(staging: str, names: Sequence[str], output: str | None) -> None:
    """Append the parts into the one file ``output`` names (stdout when empty), published whole."""
    suffix = suffix_of(output)
    if not output:
        _append(staging, names, suffix, sys.stdout.buffer)
        sys.stdout.flush()
    elif storage.is_remote(output):
        with tempfile.TemporaryDirectory(prefix="catsdogs-predict-") as tmp:
            local = Path(tmp) / f"rows{suffix}"
            with open(local, "wb") as fh:
                _append(staging, names, suffix, fh)
            storage.publish(local, output)
    else:
        with atomic_open(output, "wb") as fh:
            _append(staging, names, suffix, fh)


def commit_folder(staging: str, names: Sequence[str], output: str) -> None:
    """Make the staging folder the --parts output: parts as written, then ``_SUCCESS``."""
    if storage.is_remote(output):
        for name in names:
            storage.copy(storage.join(staging, name), storage.join(output, name))
        with tempfile.TemporaryDirectory(prefix="catsdogs-predict-") as tmp:
            marker = Path(tmp) / SUCCESS
            marker.touch()
            storage.upload(marker, storage.join(output, SUCCESS))
        return
    Path(staging, SUCCESS).touch()
    os.rename(staging, output)  # atomic: the folder appears with every part and its marker


def remove(staging: str) -> None:
    """Delete the staging folder (after a commit or a failure); a missing one is fine."""
    if storage.is_remote(staging):
        storage.delete_tree(staging)
    else:
        shutil.rmtree(staging, ignore_errors=True)
