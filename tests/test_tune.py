"""catsdogs tune: a tiny Optuna study on synthetic shards writes every output."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from catsdogs.cli import main as cli_main
from catsdogs.config import TrainConfig, TuneConfig, build_config, read_config_file
from catsdogs.errors import ConfigError
from catsdogs.train.tune import BEST_CONFIG, HISTORY_PNG, STUDY_CSV, run_study
from tests.fixtures import make_shards


def test_tiny_study_writes_best_config_csv_and_plot(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 64, "val": 32, "test": 16}, size=32, shard_rows=32)
    out = tmp_path / "tune"
    rc = cli_main(["tune", "--data", str(data), "--output", str(out), "--model", "cnn", "--trials", "2",
                   "--epochs", "1", "--minutes", "5", "--threads", "1"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / STUDY_CSV)))
    assert len(rows) == 2 and {"number", "value", "state", "params_dropout"} <= set(rows[0])
    assert all(r["state"] == "COMPLETE" for r in rows)
    # best_config.json is a TrainConfig file: it loads through the same path as --config.
    cfg = build_config(TrainConfig, read_config_file(out / BEST_CONFIG, "train"))
    assert cfg.model == "cnn" and cfg.epochs == 1 and cfg.data == str(data)
    assert "out" not in read_config_file(out / BEST_CONFIG)
    best = max(rows, key=lambda r: float(r["value"]))
    assert cfg.label_smoothing == pytest.approx(float(best["params_label_smoothing"]))
    with Image.open(out / HISTORY_PNG) as img:
        assert img.format == "PNG" and img.width > 100
    # Only the best trial keeps its checkpoint; every trial keeps its metrics.
    kept = sorted(p.parent.name for p in (out / "trials").glob("*/best.pt"))
    assert kept == [f"{int(best['number']):04d}"]
    assert len(list((out / "trials").glob("*/metrics.csv"))) == 2


def test_tune_needs_a_validation_split(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 20, "test": 10}, size=32)
    with pytest.raises(ConfigError, match="val"):
        run_study(TuneConfig(data=str(data), output=str(tmp_path / "t"), trials=1, epochs=1))
