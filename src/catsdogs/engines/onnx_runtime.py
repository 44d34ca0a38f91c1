"""onnxruntime on CPU: the fp32 feature graph or its int8 (QDQ) form."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catsdogs.engines.base import Engine
from catsdogs.engines.graph import INPUT_NAME
from catsdogs.runtime import cores

ORT_ERRORS_ONLY = 3
"""onnxruntime log severity: errors only. Its warnings (unused initialisers of the exported graph, one
line each) would bury the progress bars."""


class OnnxEngine(Engine):
    """One onnxruntime session; ``run`` is thread-safe (onnxruntime allows concurrent ``run`` calls)."""

    def __init__(self, name: str, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # lazy: ~0.4 s at import, only for the onnx engines

        self.name = name
        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cores()
        opts.inter_op_num_threads = 1  # one graph at a time: callers batch and serialise forward passes
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = ORT_ERRORS_ONLY
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.session.get_outputs()[0].shape[1]), np.float32)
        return np.asarray(self.session.run(None, {INPUT_NAME: x})[0], dtype=np.float32)
