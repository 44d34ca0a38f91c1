"""``create_engine``: build the engine a ``--backend`` name asks for, exporting and quantising once.

The fp32 feature graph is exported from the model in hand and compared by digest with the cached
``RUN/engine/features.onnx`` -- unless the caller names where the weights come from (``source``: the
checkpoint's SHA-256) and the graph's sidecar records that it was made from them, or passes the digest
of the graph it already holds: then nothing is traced. The int8 graph is rebuilt only when its recorded
source digest differs. So a frozen-backbone run's graphs, made during training, are reused by evaluate,
predict and serve without tracing the model again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from catsdogs.engines import graph
from catsdogs.engines.base import Engine
from catsdogs.engines.eager import TorchEngine
from catsdogs.engines.names import ENGINES, ONNX, OPENVINO, TORCH, is_quantized, runtime_of
from catsdogs.engines.quantize import CALIBRATION_METHOD, quantize_graph, saturating_cpu
from catsdogs.errors import ConfigError
from catsdogs.rundir import RunDir

log = logging.getLogger(__name__)

Calibration = Callable[[], Iterable[np.ndarray]]
"""Returns normalised float32 NCHW training batches (a few hundred images) for int8 calibration."""


class EngineUnavailable(RuntimeError):
    """An int8 engine cannot be built here (no calibration images and no cached int8 graph)."""


def ensure_fp32_graph(model: nn.Module, size: int, run: RunDir, source: str = "",
                      known: str = "") -> tuple[str, bool]:
    """Export ``model.features`` to ``RUN/engine/features.onnx`` unless an identical one is cached.

    ``source`` (a checkpoint's SHA-256) skips the export when the sidecar records the cached graph as
    made from it; ``known`` (a graph digest this process got from an earlier call for the same model)
    skips it while the file still holds that graph. After an export, ``source`` is recorded. Returns
    the graph's digest and whether it was (re)written.
    """
    path = run.features_graph
    sidecar = run.features_sources
    cached = graph.known_digest(path, sidecar, source)
    if cached:
        return cached, False
    if known and graph.read_metadata(path).get("graph_sha256") == known:
        return known, False
    t0 = time.perf_counter()
    proto = graph.export_features(model, size)
    digest = graph.graph_digest(proto)
    log.info("feature graph traced in %.1f s", time.perf_counter() - t0)
    wrote = graph.read_metadata(path).get("graph_sha256") != digest
    if wrote:
        path.parent.mkdir(parents=True, exist_ok=True)
        graph.save_graph(proto, path, {"graph_sha256": digest, "size": size, "precision": "fp32"})
    if source:
        graph.record_source(path, sidecar, digest, source)
    return digest, wrote


def record_checkpoint(run: RunDir, fp32_sha256: str, checkpoint_sha256: str) -> None:
    """Record that the checkpoint with ``checkpoint_sha256`` exports to the current fp32 graph."""
    if run.features_graph.is_file() and fp32_sha256:
        graph.record_source(run.features_graph, run.features_sources, fp32_sha256, checkpoint_sha256)


def ensure_int8_graph(source_digest: str, run: RunDir, calibration: Calibration | None,
                      calibration_rows: int) -> str:
    """Quantise ``RUN/engine/features.onnx`` to ``features-int8.onnx`` unless a current one is cached.

    ``calibration_rows`` 0 accepts a cached graph whatever it was calibrated on (inference: the graph
    made at training time). Returns the int8 graph's digest.
    """
    path = run.int8_graph
    meta = graph.read_metadata(path)
    if meta.get("source_sha256") == source_digest and calibration_rows in (0, meta.get("calibration_rows")):
        return str(meta["graph_sha256"])
    if calibration is None:
        raise EngineUnavailable("no int8 graph is cached for these weights and no training images "
                                "are at hand to calibrate one")
    t0 = time.perf_counter()
    batches = list(calibration())
    rows = sum(len(b) for b in batches)
    print(f"catsdogs: calibrating the int8 graph on {rows} training images ...", file=sys.stderr)
    proto = quantize_graph(run.features_graph, batches, rows)
    digest = graph.graph_digest(proto)
    graph.save_graph(proto, path, {"graph_sha256": digest, "source_sha256": source_digest,
                                   "calibration_rows": calibration_rows or rows, "calibrated_on": rows,
                                   "calibration_method": CALIBRATION_METHOD, "precision": "int8",
                                   "weights_7bit": saturating_cpu()})
    log.info("int8 graph: %d calibration images in %.1f s", rows, time.perf_counter() - t0)
    return digest


def create_engine(name: str, model: nn.Module, size: int, run: RunDir, *, threads: int | None = None,
                  device: torch.device | str = "cpu", calibration: Calibration | None = None,
                  calibration_rows: int = 0, source: str = "", fp32_sha256: str = "") -> Engine:
    """Return the engine ``name`` (one of ``ENGINES``) for ``model`` at ``size`` px, graphs under ``run``.

    ``source`` / ``fp32_sha256``: see :func:`ensure_fp32_graph` (they spare the export). Raises
    :class:`EngineUnavailable` for an int8 engine that can be neither loaded nor calibrated.
    """
    if name not in ENGINES:
        raise ConfigError(f"--backend must be one of {', '.join(ENGINES)}, got {name!r}")
    runtime = runtime_of(name)
    if runtime == TORCH:
        return TorchEngine(model, device)
    digest, _ = ensure_fp32_graph(model, size, run, source, fp32_sha256)
    path = run.features_graph
    engine_digest = digest
    if is_quantized(name):
        engine_digest = ensure_int8_graph(digest, run, calibration, calibration_rows)
        path = run.int8_graph
    engine: Engine
    if runtime == ONNX:
        from catsdogs.engines.onnx_runtime import OnnxEngine  # lazy: loads onnxruntime

        engine = OnnxEngine(name, path, threads)
    elif runtime == OPENVINO:
        from catsdogs.engines.openvino_runtime import OpenVinoEngine  # lazy: loads OpenVINO

        engine = OpenVinoEngine(name, path, threads)
    else:
        raise ConfigError(f"--backend {name!r} has no runtime here")  # unreachable while ENGINES agrees
    engine.fp32_sha256, engine.graph_sha256 = digest, engine_digest
    return engine

