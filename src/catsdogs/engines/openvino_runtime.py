"""OpenVINO on CPU: the fp32 feature graph (ONNX read directly) or its int8 (QDQ) form.

OpenVINO turns the QDQ pairs of the int8 graph into its own quantised convolutions, which run on the
CPU's int8 units (AVX-512 VNNI / AMX here), so one quantised file serves both runtimes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from catsdogs.engines.base import Engine
from catsdogs.runtime import cores

PRECISION_FP32 = "f32"
"""Inference precision hint for the fp32 engine. OpenVINO's default on a CPU with AMX or AVX-512 BF16 is
bf16 (measured here: 2x faster, cosine 0.993 to fp32 at worst), which would make "openvino" silently
lower-precision than "torch"; int8 is what the int8 engines are for."""


class OpenVinoEngine(Engine):
    """One compiled model; one infer request per calling thread (requests are not thread-safe)."""

    def __init__(self, name: str, path: Path, threads: int = 0) -> None:
        import openvino as ov  # lazy: ~0.5 s at import, only for the openvino engines

        self.name = name
        self.path = path
        core = ov.Core()
        # LATENCY: one stream using every thread; callers already batch, and a THROUGHPUT stream
        # split would leave a single synchronous request on one core.
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or cores(),
            "INFERENCE_PRECISION_HINT": PRECISION_FP32})
        self._local = threading.local()

    def run(self, x: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        if len(x) == 0:
            return np.zeros((0, int(self.compiled.output(0).get_partial_shape()[1].get_length())), np.float32)
        out = request.infer({0: x}, share_inputs=True)
        return np.array(out[0], dtype=np.float32, copy=True)  # the request reuses its output buffer
