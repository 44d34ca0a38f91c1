"""Engines (--backend): fp32 runtimes agree with torch, int8 is calibrated, guarded and recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import load_checkpoint
from catsdogs.engines import guard, select
from catsdogs.engines.graph import read_metadata
from catsdogs.engines.names import ENGINES, is_quantized, runtime_of
from catsdogs.infer.predictor import Predictor
from catsdogs.rundir import RunDir
from tests.fixtures import make_shards, synthetic_image

SIZE = 32


def _images(n: int = 6) -> np.ndarray:
    return np.stack([synthetic_image(i % 2, SIZE, seed=40 + i) for i in range(n)])


def test_engine_names_split_into_runtime_and_precision() -> None:
    assert [runtime_of(n) for n in ENGINES] == ["torch", "onnx", "openvino", "onnx", "openvino"]
    assert [is_quantized(n) for n in ENGINES] == [False, False, False, True, True]


def test_fp32_engines_answer_like_torch_and_reuse_their_graph(run_dir: Path) -> None:
    x = _images()
    want = Predictor.from_run(run_dir, backend="torch").answer(x).probs
    run = RunDir(run_dir)
    for name in ("onnx", "openvino"):
        pred = Predictor.from_run(run_dir, backend=name)
        assert pred.feature_engine.name == name
        np.testing.assert_allclose(pred.answer(x).probs, want, atol=1e-4)
    stamp = run.features_graph.stat().st_mtime_ns
    Predictor.from_run(run_dir, backend="onnx")  # same weights: the cached graph is kept
    assert run.features_graph.stat().st_mtime_ns == stamp
    assert read_metadata(run.features_graph)["precision"] == "fp32"


def test_int8_engine_is_calibrated_checked_on_val_and_the_check_recorded(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A generous bound: an untrained CNN's accuracy is noise; the bound is tested on its own below.
    pred = Predictor.from_run(run_dir, backend="onnx-int8", int8_max_drop=100.0)
    assert "calibrating" not in capsys.readouterr().err  # nothing is built until the first answer
    assert pred.feature_engine.name == "onnx-int8"
    err = capsys.readouterr().err
    assert "calibrating the int8 graph on" in err and "checking onnx-int8 against fp32" in err
    assert pred.feature_engine.name == "onnx-int8"
    run = RunDir(run_dir)
    meta = read_metadata(run.int8_graph)
    assert meta["precision"] == "int8" and meta["calibrated_on"] > 0
    record = json.loads(run.int8_guard.read_text())["onnx-int8"]
    assert record["passed"] and record["rows"] > 0 and record["max_drop_pt"] == 100.0
    assert pred.describe()["engine"]["int8_check"]["rows"] == record["rows"]
    probs = pred.answer(_images()).probs
    assert probs.shape == (6, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # Loaded again: graph and check are reused, nothing is calibrated or checked.
    again = Predictor.from_run(run_dir, backend="onnx-int8", int8_max_drop=100.0)
    assert again.feature_engine.name == "onnx-int8"
    assert "calibrating" not in capsys.readouterr().err and again.answer(_images()).probs.shape == (6, 2)


def test_a_failed_guard_falls_back_to_fp32_with_one_line(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def failing(engine: str, *args: object, **kw: object) -> guard.GuardResult:
        return guard.GuardResult(engine=engine, fp32_acc=0.99, int8_acc=0.95, rows=100, max_drop_pt=0.1)

    monkeypatch.setattr(select.guard, "screened_check", failing)
    pred = Predictor.from_run(run_dir, backend="openvino-int8")
    assert pred.feature_engine.name == "openvino"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "refused" in ln]
    assert len(lines) == 1 and "a drop of 4.00 points > the 0.1 allowed (--int8-max-drop)" in lines[0]
    record = json.loads(RunDir(run_dir).int8_guard.read_text())["openvino-int8"]
    assert record["passed"] is False  # recorded, so the next load refuses without checking again


def test_int8_without_calibration_images_runs_fp32_and_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures import make_run

    run = make_run(tmp_path / "run", data=str(tmp_path / "gone"))
    pred = Predictor.from_run(run, backend="onnx-int8")
    assert pred.feature_engine.name == "onnx"
    assert "--backend onnx-int8 unavailable" in capsys.readouterr().err


def test_frozen_training_on_int8_features_records_engine_and_check(tmp_path: Path) -> None:
    # Through the CLI in its own processes, as users run it: in one pytest process, after ~170 earlier
    # tests (Spark, servers, other engines), building this run's engines in-process crashed the
    # interpreter (SIGSEGV, no Python frame); alone, or after any few earlier test files, it passed.
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 60, "val": 20, "test": 20}, size=SIZE, shard_rows=25)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "catsdogs.cli", "train", "--data", str(data), "--output", str(out),
           "--model", "effnet_lite0", "--freeze", "backbone", "--batch-size", "32", "--threads", "1",
           "--backend", "onnx-int8", "--calibration-images", "32", "--int8-max-drop", "100"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    state = load_checkpoint(out / "best.pt")
    assert state[ckpt.CKPT_ENGINE] == "onnx-int8"
    run = RunDir(out)
    assert read_metadata(run.int8_graph)["calibrated_on"] == 32
    record = json.loads(run.int8_guard.read_text())["onnx-int8"]
    assert record["passed"] and record["rows"] == 20
    # Evaluating the run reuses the check made in training (its key is this checkpoint's digest).
    cmd = [sys.executable, "-m", "catsdogs.cli", "evaluate", "--run", str(out), "--backend", "onnx-int8",
           "--int8-max-drop", "100", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checking onnx-int8" not in done.stderr and "calibrating" not in done.stderr
    assert json.loads(RunDir(out).eval_metrics.read_text())["engine"] == "onnx-int8"


def test_guard_refuses_int8_features_that_turn_validation_images_unknown() -> None:
    from catsdogs.engines.guard import GuardResult, check

    feats = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    labels = (feats[:, 0] > 0).astype(np.int64)
    head = lambda f: f[:, :1]  # noqa: E731 - same accuracy on both "engines"
    moved = feats * 1.01  # the same signs: the same accuracy
    ok = check("openvino-int8", head, feats, moved, labels, accepts=lambda f: np.ones(len(f), bool))
    assert ok.passed and ok.unknown_rise_pt == 0.0
    # The detector accepts everything on fp32 features and 95 % on int8 ones: 5 points > the 1 allowed.
    bad = check("openvino-int8", head, feats, moved, labels,
                accepts=lambda f: np.arange(len(f)) >= (10 if f is moved else 0))
    assert not bad.passed and bad.unknown_rise_pt == pytest.approx(5.0)
    assert "more 'unknown'" in bad.refusal() and "using fp32" in bad.refusal()
    # Records written before the detector was checked have no acceptance: only accuracy decides.
    legacy = GuardResult("openvino-int8", 0.99, 0.99, 200, 0.1)
    assert legacy.passed


def test_openvino_pins_threads_only_when_it_owns_every_core(run_dir: Path) -> None:
    # Two one-thread engines in two processes (Spark executors) pinned from core 0 up shared one core
    # (docs/cluster.md): an engine with fewer threads than cores must leave placement to the OS.
    from catsdogs.engines.openvino_runtime import OpenVinoEngine
    from catsdogs.runtime import cores

    graph = Predictor.from_run(run_dir, backend="openvino").feature_engine.path  # exports the fp32 graph
    one = OpenVinoEngine("openvino", graph, threads=1)
    assert one.compiled.get_property("ENABLE_CPU_PINNING") is (cores() <= 1)
    assert one._streams().get_property("ENABLE_CPU_PINNING") is (cores() <= 1)
    every = OpenVinoEngine("openvino", graph, threads=cores())
    assert every.compiled.get_property("ENABLE_CPU_PINNING") is True
    x = np.ascontiguousarray(_images().transpose(0, 3, 1, 2), dtype=np.float32)
    np.testing.assert_allclose(one.run(x), every.run(x), atol=1e-5)
