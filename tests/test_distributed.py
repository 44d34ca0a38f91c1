"""``catsdogs train --distributed 2`` (TorchDistributor, DDP on gloo) against one process."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.config import TrainConfig
from catsdogs.errors import ConfigError, OutputExistsError
from catsdogs.runtime import select_device
from catsdogs.train import launch as distributed
from tests.fixtures import make_shards

EPOCHS = 2


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 240, "val": 80, "test": 20}, shard_rows=40)  # 6 train shards
    common = ["train", "--data", str(data), "--epochs", str(EPOCHS), "--batch-size", "16", "--seed", "3"]
    single = tmp_path / "single"
    from catsdogs.cli import main as cli_main

    assert cli_main([*common, "--output", str(single), "--threads", "1"]) == 0
    ddp = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "catsdogs.cli", *common, "--output", str(ddp),
                           "--distributed", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "replicas in sync: 2 ranks" in proc.stdout  # DDP really synchronised the two models
    # Exactly one set of outputs, written by rank 0.
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.csv"]
    one, two = metrics(single), metrics(ddp)
    assert [r["epoch"] for r in two] == [str(e) for e in range(1, EPOCHS + 1)]
    # Each rank streamed half of the train shards: half the optimiser steps per epoch.
    steps_one, steps_two = int(one[0]["step"]), int(two[0]["step"])
    assert steps_two == steps_one // 2, (steps_one, steps_two)
    acc_one, acc_two = float(one[-1]["val_acc"]), float(two[-1]["val_acc"])
    assert acc_one >= 0.9 and acc_two >= 0.9
    assert abs(acc_one - acc_two) <= 0.1
    # best.pt holds the plain (unwrapped) model: it loads for inference and classifies held-out data.
    from catsdogs.infer.predictor import Predictor

    x, y = np.load(data / "test" / "X_part_00000.npy"), np.load(data / "test" / "y_part_00000.npy")
    probs = Predictor.from_run(ddp).predict_arrays(x)
    assert (probs.argmax(1) == y).mean() >= 0.9


def test_plan_cpu_uses_gloo_and_splits_cores() -> None:
    plan = distributed.plan_launch(TrainConfig(distributed=2, device="cpu"), cores=8)
    assert (plan.backend, plan.use_gpu, plan.local_mode, plan.threads) == ("gloo", False, True, 4)
    plan = distributed.plan_launch(TrainConfig(distributed=3, device="cpu", threads=2,
                                               master="spark://10.0.0.1:7077"), cores=8)
    assert (plan.local_mode, plan.threads) == (False, 2)


def test_plan_cuda_uses_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    plan = distributed.plan_launch(TrainConfig(distributed=2, device="auto"))
    assert (plan.backend, plan.use_gpu) == ("nccl", True)
    with pytest.raises(ConfigError, match="--distributed 4 needs 4 GPUs"):
        distributed.plan_launch(TrainConfig(distributed=4, device="cuda"))


def test_cuda_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="--device cuda"):
        distributed.plan_launch(TrainConfig(distributed=2, device="cuda"))
    assert select_device("auto").type == "cpu"


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_bf16_autocast_only_on_cuda(shards: Path, tmp_path: Path) -> None:
    from catsdogs.train.loop import Trainer

    trainer = Trainer(TrainConfig(data=str(shards), output=str(tmp_path / "r"), device="cpu", amp=True))
    assert trainer.amp is False  # --amp is ignored on CPU
    trainer.amp = True  # what a CUDA device selects: bfloat16 autocast around the forward pass
    ctx = trainer._autocast()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_preflight_errors(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds the 4 train shards"):
        distributed.preflight(TrainConfig(data=str(shards), output=str(tmp_path / "r"), distributed=5))
    run = tmp_path / "old"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="--overwrite"):  # train/contract.py, before any Spark work
        distributed.train_distributed(TrainConfig(data=str(shards), output=str(run), distributed=2))
    with pytest.raises(ConfigError, match="--freeze backbone"):
        distributed.plan_launch(TrainConfig(distributed=2, device="cpu", freeze="backbone"))
