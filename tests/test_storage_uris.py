"""Paths given as ``file://`` URIs work end to end; unsupported schemes fail with a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catsdogs.config import PreprocessConfig, TrainConfig, build_config
from catsdogs.errors import ConfigError
from tests.fixtures import make_shards


def test_file_uri_becomes_a_path() -> None:
    cfg = build_config(TrainConfig, {"data": "file:///tmp/with%20space/shards", "output": "file:/tmp/run"})
    assert (cfg.data, cfg.output) == ("/tmp/with space/shards", "/tmp/run")
    assert build_config(TrainConfig, {"data": "relative/shards"}).data == "relative/shards"


@pytest.mark.parametrize("uri", ["gs://bucket/pets", "ftp://host/pets", "file://otherhost/pets"])
def test_other_schemes_name_the_flag(uri: str) -> None:
    with pytest.raises(ConfigError, match="--input"):
        build_config(PreprocessConfig, {"input": uri, "output": "/tmp/x"})


@pytest.mark.parametrize("uri", ["hdfs://namenode:8020/run", "s3a://bucket/run"])
def test_runs_stay_local(uri: str) -> None:
    """Shards may live on S3/HDFS (tests/test_storage_remote.py); run folders are local files."""
    with pytest.raises(ConfigError, match="--output"):
        build_config(TrainConfig, {"data": "/tmp/shards", "output": uri})


def test_file_uris_end_to_end(tmp_path: Path) -> None:
    """Train reads shards and writes the run through file:// URIs (preprocess with file:// URIs runs in
    tests/test_cluster.py, whose local[*] job takes them)."""
    data = tmp_path / "shards dir"  # a space: the URI is percent-encoded
    make_shards(data, counts={"train": 40, "val": 10, "test": 10}, shard_rows=20)
    from catsdogs.cli import main as cli_main

    run = tmp_path / "run"
    assert cli_main(["train", "--data", data.as_uri(), "--output", run.as_uri(), "--epochs", "1",
                     "--batch-size", "8", "--threads", "1"]) == 0
    assert (run / "best.pt").is_file() and (run / "metrics.csv").is_file()
    assert json.loads((run / "config.json").read_text())["data"] == str(data)
