"""``catsdogs export``: ONNX and TorchScript files that reproduce the PyTorch probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.cli import main as cli_main
from catsdogs.infer.export import ensure_onnx, onnx_is_fresh, read_onnx_metadata
from catsdogs.infer.predictor import Predictor
from tests.fixtures import make_run


def batch(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_onnx_matches_torch_with_a_dynamic_batch(run_dir: Path) -> None:
    import onnxruntime as ort

    assert cli_main(["export", "--run", str(run_dir)]) == 0
    path = run_dir / "model.onnx"
    assert path.is_file()
    assert not list(run_dir.glob(".model.onnx.*"))  # no temporary files left behind
    predictor = Predictor.from_run(run_dir, backend="torch")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5, 17):  # the batch axis is dynamic
        x = batch(n, seed=n)
        got = session.run(None, {"images": x})[0]
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, predictor.predict_arrays(x), atol=1e-4)
    meta = read_onnx_metadata(path)
    assert meta["classes"] == ["Cat", "Dog"] and meta["size"] == 32
    assert json.loads(session.get_modelmeta().custom_metadata_map["catsdogs"]) == meta


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch 2.13 deprecates torch.jit
def test_torchscript_loads_and_matches(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported" / "net.ts"
    assert cli_main(["export", "--run", str(run_dir), "--format", "torchscript", "--output", str(out)]) == 0
    extra = {"catsdogs.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["catsdogs.json"])["classes"] == ["Cat", "Dog"]
    predictor = Predictor.from_run(run_dir, backend="torch")
    for n in (1, 6):
        x = batch(n, seed=10 + n)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, predictor.predict_arrays(x), atol=1e-4)


def test_stale_onnx_is_reexported(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", seed=1)
    predictor = Predictor.from_run(run)
    path, made = ensure_onnx(predictor, run)
    assert made and onnx_is_fresh(path, predictor)
    assert ensure_onnx(predictor, run) == (path, False)  # fresh: reused
    make_run(run, seed=2)  # retrained: new weights in best.pt
    retrained = Predictor.from_run(run)
    assert not onnx_is_fresh(path, retrained)
    path2, made2 = ensure_onnx(retrained, run)
    assert made2 and path2 == path and onnx_is_fresh(path, retrained)


def test_export_errors_exit_2(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", "--run", str(tmp_path / "missing")]) == 2
    assert "--run" in capsys.readouterr().err
    assert cli_main(["export", "--run", str(run_dir), "--format", "tflite"]) == 2
    assert "--format" in capsys.readouterr().err
