"""Inference backends for the server: the PyTorch model itself, or an onnxruntime session.

Both decode exactly like training (:meth:`catsdogs.infer.predictor.Predictor.decode`) and return class
probabilities for a uint8 NHWC batch, so the app and the batcher do not care which one runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from catsdogs.config import ServeConfig
from catsdogs.infer.export import INPUT_NAME, ensure_onnx
from catsdogs.infer.predictor import Answers, Predictor
from catsdogs.models.calibration import temper_probabilities
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS
from catsdogs.runtime import cores, select_device, setup

BACKENDS: tuple[str, ...] = ("torch", "onnx")
"""Values of ``serve --backend``: the checkpoint's PyTorch model, or its ONNX export in onnxruntime."""


class Backend(Protocol):
    """What the server needs from a model: metadata, decoding and batched probabilities."""

    name: str
    classes: list[str]
    size: int

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray: ...

    def predict_arrays(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray: ...

    def answer(self, images: np.ndarray) -> Answers: ...

    def describe(self) -> dict[str, Any]: ...


class TorchBackend:
    """Runs the checkpoint's PyTorch model (channels_last, inference mode)."""

    name = "torch"

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.classes = predictor.classes
        self.size = predictor.size

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return self.predictor.decode(data, max_pixels)

    def predict_arrays(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        return self.predictor.predict_arrays(images, tta=tta)

    def answer(self, images: np.ndarray) -> Answers:
        """Probabilities, OOD scores and known flags under the run's (or overridden) settings."""
        return self.predictor.answer(images)

    def describe(self) -> dict[str, Any]:
        return public_facts(self.predictor, self.name)


class OnnxBackend:
    """Runs the exported ONNX graph (uint8 NHWC in, probabilities out) with onnxruntime on CPU."""

    name = "onnx"

    def __init__(self, predictor: Predictor, onnx_path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort  # lazy: ~0.4 s at import, and the torch backend never needs it

        self.predictor = predictor
        self.classes = predictor.classes
        self.size = predictor.size
        self.path = Path(onnx_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cores()
        opts.inter_op_num_threads = 1  # one graph at a time: the batcher serialises forward passes
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self._input = INPUT_NAME
        if predictor.settings.reject:
            # The export outputs probabilities only; the detector needs the model's features.
            print("catsdogs serve: the onnx backend has no out-of-distribution detector (the export "
                  "outputs probabilities only); no image is 'unknown'; use --backend torch for it",
                  file=sys.stderr)
            predictor.settings.reject = False

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return self.predictor.decode(data, max_pixels)

    def predict_arrays(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        settings = self.predictor.settings
        tta = settings.tta if tta is None else tta
        t = self.predictor.temperature if settings.calibrate else 1.0
        x = np.ascontiguousarray(images, dtype=np.uint8)
        if x.shape[0] == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        probs = temper_probabilities(np.asarray(self.session.run(None, {self._input: x})[0]), t)
        if tta:
            flipped = np.ascontiguousarray(x[:, :, ::-1, :])  # NHWC: mirror the W axis
            probs = (probs + temper_probabilities(self.session.run(None, {self._input: flipped})[0], t)) / 2
        return np.asarray(probs, dtype=np.float32)

    def answer(self, images: np.ndarray) -> Answers:
        """Probabilities under the run's TTA and temperature; no detector (every image is known)."""
        probs = self.predict_arrays(images)
        n = len(probs)
        return Answers(probs, np.full(n, np.nan, dtype=np.float32), np.ones(n, dtype=bool))

    def describe(self) -> dict[str, Any]:
        return {**public_facts(self.predictor, self.name), "onnx": self.path.name}


def public_facts(predictor: Predictor, backend: str) -> dict[str, Any]:
    """The predictor's facts as clients may see them: the run and checkpoint by name, not by path."""
    facts = predictor.describe()
    facts["checkpoint"] = predictor.path.name
    facts["run"] = predictor.path.parent.name
    return {**facts, "backend": backend}


def on_cuda(backend: Backend) -> bool:
    """Return True when the backend runs its model on a CUDA GPU."""
    predictor = getattr(backend, "predictor", None)
    return isinstance(predictor, Predictor) and predictor.device.type == "cuda"


def plan_workers(cfg: ServeConfig, on_cuda: bool) -> tuple[int, int]:
    """Return ``(forward workers, intra-op threads per worker)`` from ``--workers`` / ``--threads``.

    Defaults follow what each backend does with one image on CPU (measured, docs/benchmarks.md):
    torch's batch-1 forward barely uses a second thread, so it gets one single-threaded worker per
    core; onnxruntime parallelises one image well (EfficientNet-Lite12 at 260 px: 22 ms on 2 threads,
    39 ms on 1), so it gets one worker with every core. A GPU gets one worker.
    """
    workers = cfg.workers or (1 if on_cuda or cfg.backend == "onnx" else cores())
    threads = cfg.threads or max(1, cores() // workers)
    return workers, threads


def load_backend(cfg: ServeConfig) -> Backend:
    """Load the run's model for ``--backend``; for onnx, export RUN/model.onnx first if missing or stale."""
    device = select_device("auto") if cfg.backend == "torch" else torch.device("cpu")
    _workers, threads = plan_workers(cfg, device.type == "cuda")
    setup(threads, device.type)
    overrides = {"tta": cfg.tta, "reject": cfg.reject, "calibrate": cfg.calibrate}
    if cfg.backend == "onnx":
        predictor = Predictor.from_run(cfg.run, "cpu", **overrides)
        path, _made = ensure_onnx(predictor, cfg.run)
        return OnnxBackend(predictor, path, threads)
    return TorchBackend(Predictor.from_run(cfg.run, device, **overrides))
