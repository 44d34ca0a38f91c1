"""Paths given as ``file://`` URIs work end to end; other schemes fail with a hint at docs/cluster.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from catsdogs.cluster import QUICK_JVM_OPTS
from catsdogs.config import PreprocessConfig, TrainConfig, build_config
from catsdogs.errors import ConfigError
from tests.fixtures import make_image_tree


def test_file_uri_becomes_a_path() -> None:
    cfg = build_config(TrainConfig, {"data": "file:///tmp/with%20space/shards", "out": "file:/tmp/run"})
    assert (cfg.data, cfg.out) == ("/tmp/with space/shards", "/tmp/run")
    assert build_config(TrainConfig, {"data": "relative/shards"}).data == "relative/shards"


@pytest.mark.parametrize("uri", ["hdfs://namenode:8020/pets", "s3a://bucket/pets", "file://otherhost/pets"])
def test_other_schemes_name_the_flag(uri: str) -> None:
    with pytest.raises(ConfigError, match="--input"):
        build_config(PreprocessConfig, {"input": uri, "output": "/tmp/x"})


@pytest.mark.slow
def test_file_uris_end_to_end(tmp_path: Path) -> None:
    src = tmp_path / "Pet Images"  # a space: the URI is percent-encoded
    make_image_tree(src, per_class=10, odd=False)
    shards_uri = (tmp_path / "shards").as_uri()
    proc = subprocess.run([sys.executable, "-m", "catsdogs.cli", "preprocess", "--input", src.as_uri(),
                           "--output", shards_uri, "--size", "32", "--shard-rows", "8",
                           "--spark-conf", f"spark.driver.extraJavaOptions={QUICK_JVM_OPTS}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["stats"]["kept"] == 20
    from catsdogs.cli import main as cli_main

    run = tmp_path / "run"
    assert cli_main(["train", "--data", shards_uri, "--out", run.as_uri(), "--epochs", "1",
                     "--batch-size", "4", "--threads", "1"]) == 0
    assert (run / "best.pt").is_file() and (run / "metrics.csv").is_file()
