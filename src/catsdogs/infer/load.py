"""Load a run's predictor under the inference settings, one way for every entry point.

Evaluate, predict, serve, the Python API (``catsdogs.load``) and the MLflow pyfunc all build it here, so
all of them answer alike.

The settings are :class:`catsdogs.config.InferenceConfig` (TTA, "unknown", temperature, engine, device,
threads); unset ones are the run's recorded ones (:meth:`Predictor.from_run`).
"""

from __future__ import annotations

from pathlib import Path

from catsdogs.config import InferenceConfig
from catsdogs.infer.predictor import Predictor
from catsdogs.rundir import BEST_CKPT
from catsdogs.runtime import setup
from catsdogs.track.registry import local_run


def load_predictor(run: str | Path, settings: InferenceConfig, *, tracking_uri: str | None = None,
                   checkpoint: str = BEST_CKPT, shards: str | None = None, engine_threads: int | None = None
                   ) -> Predictor:
    """Load ``run`` (a run folder, a .pt file, or a models:/ or runs:/ URI) with ``settings`` applied.

    ``shards`` (evaluate's --data) calibrates and checks an int8 engine when the run records no check;
    ``engine_threads`` overrides ``settings.threads`` for the onnx/openvino engines (serve divides the
    cores among its forward workers).
    """
    folder = local_run(str(run), tracking_uri)  # models:/ or runs:/ -> a downloaded run folder
    device = setup(settings.threads, settings.device)
    return Predictor.from_run(folder, device, checkpoint, tta=settings.tta, reject=settings.reject,
                              calibrate=settings.calibrate, backend=settings.backend,
                              threads=settings.threads if engine_threads is None else engine_threads,
                              int8_max_drop=settings.int8_max_drop, shards=shards)
