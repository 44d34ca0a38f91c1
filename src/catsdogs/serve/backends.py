"""The server's model: the run's predictor with its feature pass on the ``--backend`` engine.

It decodes exactly like training (:meth:`catsdogs.infer.predictor.Predictor.decode`) and returns class
probabilities for a uint8 NHWC batch, so the app and the batcher do not care which engine runs.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from catsdogs.config import ServeConfig, need
from catsdogs.engines.names import TORCH
from catsdogs.infer.load import load_predictor
from catsdogs.infer.predictor import Answers, Predictor
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS
from catsdogs.runtime import cores, set_threads


class Backend(Protocol):
    """What the server needs from a model: metadata, decoding and batched probabilities."""

    name: str
    classes: list[str]
    size: int
    predictor: Predictor | None
    """The torch predictor behind it: Grad-CAM explains its model, and it says where the model runs
    (None: nothing to explain, the CPU)."""

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray: ...

    def predict_arrays(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray: ...

    def answer(self, images: np.ndarray) -> Answers: ...

    def describe(self) -> dict[str, Any]: ...


class PredictorBackend:
    """The run's predictor with its feature pass on the ``--backend`` engine.

    Head, detector and temperature stay in torch, so every engine answers "unknown" the same way.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.name = predictor.feature_engine.name
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


def public_facts(predictor: Predictor, backend: str) -> dict[str, Any]:
    """The predictor's facts as clients may see them: the run and checkpoint by name, not by path."""
    facts = predictor.describe()
    facts["checkpoint"] = predictor.path.name
    facts["run"] = predictor.path.parent.name
    return {**facts, "backend": backend}


def on_cuda(backend: Backend) -> bool:
    """Return True when the backend runs its model on a CUDA GPU."""
    return backend.predictor is not None and backend.predictor.device.type == "cuda"


def plan_workers(cfg: ServeConfig, backend: str, on_cuda: bool) -> tuple[int, int]:
    """Return ``(forward workers, intra-op threads per worker)`` from ``--workers`` / ``--threads``.

    Defaults follow what each engine does with one image on CPU (measured, docs/benchmarks.md):
    torch's batch-1 forward barely uses a second thread, so it gets one single-threaded worker per
    core; onnxruntime and OpenVINO parallelise one image well, so they get one worker with every core.
    A GPU gets one worker. ``backend`` is the engine the run is served with.
    """
    workers = cfg.workers or (1 if on_cuda or backend != TORCH else cores())
    threads = cfg.threads or max(1, cores() // workers)
    return workers, threads


def load_backend(cfg: ServeConfig) -> Backend:
    """Load the run's model with its engine (graphs built once into RUN/engine/), threads per worker."""
    # The onnx/openvino engines run one worker (unless --workers) with all its cores: their threads are
    # fixed when built; torch's are set per process below, once the engine is known.
    engine_threads = cfg.threads or max(1, cores() // (cfg.workers or 1))
    predictor = load_predictor(need(cfg, "run"), cfg, engine_threads=engine_threads)
    _workers, threads = plan_workers(cfg, predictor.backend, predictor.device.type == "cuda")
    set_threads(threads)
    return PredictorBackend(predictor)
