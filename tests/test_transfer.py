"""Frozen-backbone transfer: features once, logistic head, a normal checkpoint that Predictor loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs import checkpoint as ckpt
from catsdogs import rundir, schema
from catsdogs.checkpoint import load_checkpoint
from catsdogs.cli import main as cli
from catsdogs.config import TrainConfig
from catsdogs.errors import ConfigError
from catsdogs.infer.predictor import Predictor
from catsdogs.shards.manifest import load_manifest
from catsdogs.train.contract import model_config
from catsdogs.train.frozen import train_frozen
from catsdogs.train.head import fit_head
from tests.fixtures import make_shards


def test_fit_head_folds_standardisation_into_linear_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 7.5).astype(np.int64)
    w, b, metrics = fit_head(x[:200], y[:200], x[200:], y[200:], num_classes=2)
    assert w.shape == (1, 6) and b.shape == (1,)
    logits = torch.from_numpy(x[200:]) @ w.T + b
    acc = ((logits[:, 0] > 0).numpy().astype(np.int64) == y[200:]).mean()
    assert acc == pytest.approx(metrics["val_acc"])
    assert acc > 0.9


@pytest.mark.parametrize("classes", [2, 3])
def test_a_head_fitted_by_passes_over_feature_shards_is_the_in_memory_fit(
    tmp_path: Path, classes: int
) -> None:
    """The streamed L-BFGS (sums shard by shard, each C from zero) finds scikit-learn's
    optimum: same C, same accuracies, weights within the solver's tolerance (binary and softmax)."""
    from catsdogs.shards.feature_shards import StreamedFeatures, write_feature_shard

    rng = np.random.default_rng(classes)
    x = rng.normal(2.0, 3.0, size=(700, 12)).astype(np.float16).astype(np.float32)  # as stored
    score = x[:, :classes] @ rng.normal(size=(classes, classes)) + rng.normal(0, 2.0, (700, classes))
    y = score.argmax(1).astype(np.int64)
    files = []
    for k, start in enumerate(range(0, 500, 160)):  # 4 shards: 160, 160, 160, 20 rows
        files.append(str(tmp_path / f"part_{k}.parquet"))
        end = min(start + 160, 500)
        write_feature_shard(files[-1], {"features": x[start:end], "labels": y[start:end]})
    streamed = StreamedFeatures(tuple((f, "features") for f in files), 500, 12)
    grid = (0.01, 0.1, 1.0)
    w_mem, b_mem, m_mem = fit_head(x[:500], y[:500], x[500:], y[500:], classes, c_grid=grid)
    w_str, b_str, m_str = fit_head(streamed, y[:500], x[500:], y[500:], classes, c_grid=grid)
    assert m_str["C"] == m_mem["C"] and m_str["val_acc"] == m_mem["val_acc"]
    assert abs(m_str["train_acc"] - m_mem["train_acc"]) <= 2 / 500  # a row on the boundary may flip
    assert m_str["val_loss"] == pytest.approx(m_mem["val_loss"], rel=1e-3)
    scale = float(w_mem.abs().max())
    np.testing.assert_allclose(w_str.numpy(), w_mem.numpy(), atol=2e-3 * scale)
    np.testing.assert_allclose(b_str.numpy(), b_mem.numpy(), atol=2e-3 * max(scale, float(b_mem.abs().max())))


def test_frozen_backbone_run_loads_in_predictor(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 60, "val": 20, "test": 20}, size=32, shard_rows=25)
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(data), output=str(out), model="effnet_lite0", freeze="backbone",
                      batch_size=32, threads=1)
    metrics = train_frozen(cfg)
    assert metrics["val_acc"] >= 0.75  # chance is 0.5: ImageNet features separate bright-left/right
    for name in (rundir.BEST_CKPT, rundir.LAST_CKPT, schema.CONFIG_NAME, rundir.METRICS_CSV):
        assert (out / name).is_file(), name
    assert json.loads((out / schema.CONFIG_NAME).read_text())["freeze"] == "backbone"
    rows = list(csv.DictReader(open(out / rundir.METRICS_CSV)))
    assert float(rows[0]["val_acc"]) == pytest.approx(metrics["val_acc"])

    # The engine the head was fitted on (the default int8 one, behind its guard): the same val accuracy.
    engine = load_checkpoint(out / rundir.BEST_CKPT)[ckpt.CKPT_ENGINE]
    pred = Predictor.from_run(out, backend=engine)
    assert pred.classes == ["Cat", "Dog"] and pred.size == 32
    assert pred.mean == (127.5,) * 3  # the pretrained normalisation, not the data statistics
    manifest = load_manifest(data)
    x = np.concatenate([np.load(data / s.x) for s in manifest.split_shards("val")])
    y = np.concatenate([np.load(data / s.y) for s in manifest.split_shards("val")])
    probs = pred.predict_arrays(x)
    assert probs.shape == (20, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == y).mean() == pytest.approx(metrics["val_acc"])


def test_freeze_needs_a_pretrained_model(tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(tmp_path), output=str(tmp_path / "run"), model="cnn", freeze="backbone")
    with pytest.raises(ConfigError, match="--freeze backbone"):
        train_frozen(cfg)


def test_extract_features_resizes_to_the_models_size(tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F

    from catsdogs.models.factory import create_model
    from catsdogs.shards.reader import open_shard
    from catsdogs.train.features import extract_features

    data = tmp_path / "shards"
    manifest = make_shards(data, counts={"train": 10, "val": 6}, size=32, shard_rows=4, fmt="parquet")
    model = create_model("effnet_lite0", 2, 48, pretrained=True).eval()
    mean, std = (127.5,) * 3, (128.0,) * 3
    feats, labels = extract_features(model, data, manifest, "val", mean, std, batch_size=4, flip=True,
                                     size=48, progress=False)
    assert feats.shape == (12, 1280) and labels.tolist()[:6] == labels.tolist()[6:]
    x = np.concatenate([open_shard(data, s, 32)[0][0:s.rows] for s in manifest.split_shards("val")])
    t = F.interpolate((torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.5) / 128, size=(48, 48),
                      mode="bilinear", antialias=True)
    with torch.no_grad():
        np.testing.assert_allclose(feats[:6], model.features(t).numpy(), atol=1e-3)
        np.testing.assert_allclose(feats[6:], model.features(t.flip(-1)).numpy(), atol=1e-3)


def frozen_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(out), "--model", "effnet_lite0", "--freeze",
            "backbone", "--backend", "torch", "--batch-size", "32", "--threads", "1", "--depth", "2", *extra]


def test_frozen_head_follows_the_loops_run_folder_contract(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 40, "val": 16, "test": 8}, size=32, shard_rows=20)
    out = tmp_path / "run"
    assert cli(frozen_args(data, out)) == 0
    state = load_checkpoint(out / rundir.BEST_CKPT)
    cfg = TrainConfig(**state[ckpt.CKPT_TRAIN_CONFIG])
    assert state[ckpt.CKPT_MODEL_CONFIG] == model_config(cfg, 2, 32)  # the loop's, --depth included
    assert state[ckpt.CKPT_MODEL_CONFIG]["depth"] == 2
    first = (out / rundir.BEST_CKPT).stat().st_mtime_ns
    capsys.readouterr()

    assert cli(frozen_args(data, out)) == 2  # a finished run is not clobbered
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert cli(frozen_args(data, out, "--resume")) == 0  # complete: nothing to do
    assert "complete" in capsys.readouterr().err
    assert (out / rundir.BEST_CKPT).stat().st_mtime_ns == first
    assert cli(frozen_args(data, out, "--resume", "--lr", "0.5")) == 2  # the head has no learning rate
    assert "--lr" in capsys.readouterr().err
    assert cli(frozen_args(data, out, "--overwrite")) == 0
    assert (out / rundir.BEST_CKPT).stat().st_mtime_ns != first


@pytest.mark.parametrize(("extra", "needle"), [
    (("--epochs", "3"), "--epochs"),
    (("--lr", "0.001"), "--lr"),  # the default value, typed: still refused
])
def test_frozen_head_refuses_flags_it_cannot_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   extra: tuple[str, ...], needle: str) -> None:
    out = tmp_path / "run"
    assert cli(frozen_args(tmp_path / "missing", out, *extra)) == 2  # before any work, even on bad --data
    err = capsys.readouterr().err.strip()
    assert needle in err and "drop " + needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_the_loop_refuses_frozen_only_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                "--backend", "onnx"]) == 2
    assert "--backend applies to the frozen-backbone feature pass only" in capsys.readouterr().err
