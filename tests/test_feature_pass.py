"""The fast feature pass (issue 26): streamed engines, screened int8 guard, feature cache, no re-trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.checkpoint import load_checkpoint, save_checkpoint
from catsdogs.engines import feature_cache, graph, guard
from catsdogs.engines.batches import SplitImages, prefetched, split_batches
from catsdogs.infer.predictor import Predictor
from catsdogs.rundir import RunDir
from catsdogs.shards.manifest import load_manifest
from catsdogs.train.features import extract_features
from tests.fixtures import make_shards

SIZE = 32


def test_prefetched_keeps_order_and_raises_the_producers_error() -> None:
    assert [int(x[0]) for x in prefetched(np.full(1, i) for i in range(7))] == list(range(7))

    def broken():  # type: ignore[no-untyped-def]
        yield np.zeros(1)
        raise ValueError("shard unreadable")

    with pytest.raises(ValueError, match="shard unreadable"):
        list(prefetched(broken()))


@pytest.mark.parametrize("name", ["openvino", "onnx"])
def test_streamed_features_equal_batch_by_batch_ones_in_order(run_dir: Path, shards: Path, name: str) -> None:
    pred = Predictor.from_run(run_dir, backend=name)
    engine = pred.feature_engine
    manifest = load_manifest(shards)
    xs = [x for x, _y in split_batches(shards, manifest, "val", pred.mean, pred.std, 7)]
    one_by_one = np.concatenate([engine.run(x) for x in xs])
    np.testing.assert_allclose(engine.features_of(iter(xs)), one_by_one, atol=1e-5)
    # extract_features streams through the same engine, flipped rows appended after the originals.
    feats, labels = extract_features(pred.model, shards, manifest, "val", pred.mean, pred.std, 7, flip=True,
                                     engine=engine, progress=False)
    n = manifest.split_rows("val")
    assert feats.shape == (2 * n, one_by_one.shape[1]) and np.array_equal(labels[:n], labels[n:])
    np.testing.assert_allclose(feats[:n], one_by_one, atol=1e-5)
    flipped = np.concatenate([engine.run(np.ascontiguousarray(x[..., ::-1])) for x in xs])
    np.testing.assert_allclose(feats[n:], flipped, atol=1e-5)


def test_split_images_take_returns_the_rows_asked_for(shards: Path) -> None:
    manifest = load_manifest(shards)
    images = SplitImages(shards, manifest, "val", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), batch_size=4)
    every = np.concatenate([x for x, _y in images.batches()])
    index = np.array([0, 59, 3, 50, 49, 17])  # across shards (50 rows each), out of order
    np.testing.assert_array_equal(np.concatenate(list(images.take(index))), every[index])


def _linear(w: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda f: f[:, :1] * w


def test_screened_guard_runs_fp32_only_near_the_boundary_and_matches_the_full_check() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    int8 = rng.normal(0, 4, size=(n, 3)).astype(np.float32)
    labels = (int8[:, 0] + rng.normal(0, 1, n) > 0).astype(np.int64)
    noise = rng.normal(0, 0.05, size=(n, 3)).astype(np.float32)
    fp32 = int8 + noise  # quantisation error: small next to most margins, flips a few near the boundary
    asked: list[int] = []

    def fp32_features(index: np.ndarray) -> np.ndarray:
        asked.extend(index.tolist())
        return fp32[index]

    full = guard.check("x", _linear(1.0), fp32, int8, labels)
    screened = guard.screened_check("x", _linear(1.0), int8, labels, fp32_features, sample=128)
    assert len(asked) == len(set(asked)) == screened.fp32_rows < n // 4  # each image at most once
    assert screened.fp32_acc == pytest.approx(full.fp32_acc)
    assert screened.int8_acc == pytest.approx(full.int8_acc)
    flips = np.flatnonzero((fp32[:, 0] > 0) != (int8[:, 0] > 0))
    assert len(flips) > 0 and set(flips) <= set(asked)  # every image that flips was run in fp32
    assert screened.screen >= guard.SIGMA_FACTOR * screened.error_rms and screened.flip_bound < 1e-3
    # A split no larger than the sample is checked in full.
    small = guard.screened_check("x", _linear(1.0), int8[:100], labels[:100], lambda i: fp32[i], sample=128)
    assert small.fp32_rows == 0 and small.fp32_acc == pytest.approx(guard.check(
        "x", _linear(1.0), fp32[:100], int8[:100], labels[:100]).fp32_acc)


def test_a_larger_quantisation_error_widens_the_screen() -> None:
    rng = np.random.default_rng(1)
    int8 = rng.normal(0, 4, size=(1000, 1)).astype(np.float32)
    labels = (int8[:, 0] > 0).astype(np.int64)
    widths = []
    for sd in (0.01, 0.3):
        fp32 = int8 + rng.normal(0, sd, size=int8.shape).astype(np.float32)
        widths.append(guard.screened_check("x", _linear(1.0), int8, labels, lambda i, f=fp32: f[i]))
    assert widths[1].screen > 10 * widths[0].screen and widths[1].fp32_rows > widths[0].fp32_rows


def test_loading_a_checkpoint_the_graph_was_made_from_traces_nothing(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from catsdogs.io.checksum import sha256_file

    first = Predictor.from_run(run_dir, backend="onnx")
    assert first.feature_engine.name == "onnx"  # traced once, and the checkpoint recorded as its source
    run = RunDir(run_dir)
    assert sha256_file(run.best) in graph._read_sources(run.features_sources)["sources"]

    def no_export(*args: object, **kw: object) -> None:
        raise AssertionError("the graph was traced again")

    monkeypatch.setattr(graph, "export_features", no_export)
    again = Predictor.from_run(run_dir, backend="openvino")
    assert again.feature_engine.name == "openvino"
    # Another checkpoint (other weights) is traced: its graph is not the one on disk.
    state = load_checkpoint(run.best)
    key = next(k for k, v in state["model_state"].items() if v.dtype.is_floating_point)
    state["model_state"][key] = state["model_state"][key] + 1.0
    save_checkpoint(run.best, state)
    with pytest.raises(AssertionError, match="traced again"):
        _ = Predictor.from_run(run_dir, backend="onnx").feature_engine


def _key(root: Path, checkpoint: str = "c" * 64) -> dict[str, object]:
    manifest = load_manifest(root)
    return feature_cache.base_key(root, manifest, "test", checkpoint, "openvino-int8", 0.1, (0.0,) * 3,
                                  (1.0,) * 3, SIZE)


def test_feature_cache_is_invalidated_when_the_shards_or_the_checkpoint_change(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    make_shards(root, counts={"train": 10, "val": 10, "test": 20}, size=SIZE, shard_rows=10)
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    graph_file = engine_dir / "features-int8.onnx"
    graph_file.write_bytes(b"graph")

    class FakeEngine(feature_cache.ReplayEngine):
        path = graph_file

    feats, labels = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    cache = engine_dir / "features" / "test.openvino-int8.npz"
    made_by = FakeEngine(cached=feats, name="openvino-int8")
    assert feature_cache.save(cache, feats, labels, _key(root), made_by)
    hit = feature_cache.load(cache, _key(root), engine_dir)
    assert hit is not None and hit.engine == "openvino-int8" and np.array_equal(hit.feats, feats)
    # Another checkpoint: another key.
    assert feature_cache.load(cache, _key(root, "d" * 64), engine_dir) is None
    # The graph file re-made: not the engine that made the cache.
    st = os.stat(graph_file)
    os.utime(graph_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert feature_cache.load(cache, _key(root), engine_dir) is None
    os.utime(graph_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert feature_cache.load(cache, _key(root), engine_dir) is not None
    # A test shard rewritten in place (same manifest): its size/mtime differ, so does the key.
    shard = root / load_manifest(root).split_shards("test")[0].x
    x = np.load(shard)
    x[0, 0, 0, 0] ^= 1
    np.save(shard, x)
    assert feature_cache.load(cache, _key(root), engine_dir) is None
    # A torch engine (no graph file to pin) is not cached.
    torch_like = feature_cache.ReplayEngine(cached=feats)
    assert feature_cache.save(cache, feats, labels, _key(root), torch_like) is False


def _evaluate(run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "catsdogs.cli", "evaluate", "--run", str(run), "--backend", "onnx-int8",
           "--int8-max-drop", "100", "--threads", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def test_frozen_run_caches_test_features_for_evaluate_until_the_checkpoint_changes(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 60, "val": 20, "test": 20}, size=SIZE, shard_rows=25)
    out = tmp_path / "run"
    settings = {"data": str(data), "output": str(out), "model": "effnet_lite0", "freeze": "backbone",
                "batch_size": 16, "threads": 1, "backend": "onnx-int8", "calibration_images": 32,
                "int8_max_drop": 100.0}
    # In a child process, as catsdogs run trains (engines built in the test process crash late suites),
    # with the test split cached as catsdogs run asks for it.
    code = ("import json, sys; from catsdogs.config import TrainConfig, build_config; "
            "from catsdogs.train.frozen import train_frozen; "
            "train_frozen(build_config(TrainConfig, json.loads(sys.argv[1])), cache_splits=('test',))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert RunDir(out).feature_cache("test", "onnx-int8").is_file()
    first = _evaluate(out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "test features of onnx-int8 reused" in first.stderr  # made by training's pass
    metrics = RunDir(out).eval_metrics.read_text()
    # The checkpoint changes (its backbone too): the cache is stale, the features are computed again.
    run = RunDir(out)
    state = load_checkpoint(run.best)
    key = next(k for k, v in state["model_state"].items() if "_conv_stem" in k)
    state["model_state"][key] = state["model_state"][key] * 1.01
    save_checkpoint(run.best, state)
    second = _evaluate(out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reused" not in second.stderr
    third = _evaluate(out)  # the second evaluation cached its own features (int8, or fp32 if refused)
    assert third.returncode == 0 and "test features of onnx" in third.stderr and "reused" in third.stderr
    assert metrics  # the first report was written from the cached features
