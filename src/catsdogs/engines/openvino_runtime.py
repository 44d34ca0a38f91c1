"""OpenVINO on CPU: the fp32 feature graph (ONNX read directly) or its int8 (QDQ) form.

OpenVINO turns the QDQ pairs of the int8 graph into its own quantised convolutions, which run on the
CPU's int8 units (AVX-512 VNNI / AMX here), so one quantised file serves both runtimes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.engines.base import Engine
from catsdogs.runtime import cores

PRECISION_FP32 = "f32"
"""Inference precision hint for the fp32 engine. OpenVINO's default on a CPU with AMX or AVX-512 BF16 is
bf16 (measured here: 2x faster, cosine 0.993 to fp32 at worst), which would make "openvino" silently
lower-precision than "torch"; int8 is what the int8 engines are for."""


_CORE: list[Any] = []
"""The process's one ``openvino.Core``, created on first use and never released: each Core loads the CPU
plugin, and destroying the last one unloads the plugin's library while its thread pool may still be
winding down; a long test process that built and dropped dozens of engines crashed (SIGSEGV)."""


def shared_core() -> Any:
    import openvino as ov  # lazy: ~0.5 s at import, only for the openvino engines

    if not _CORE:
        _CORE.append(ov.Core())
    return _CORE[0]


class OpenVinoEngine(Engine):
    """One compiled model and one infer request, used under a lock (requests are not thread-safe).

    Callers already batch and serialise forward passes (one server worker for this engine), so the lock
    costs nothing; per-thread requests were destroyed in whatever thread exited last, after their
    compiled model in a long test process, which crashed the interpreter.
    """

    def __init__(self, name: str, path: Path, threads: int = 0) -> None:
        self.name = name
        self.path = path
        core = shared_core()
        # LATENCY: one stream using every thread; callers already batch, and a THROUGHPUT stream
        # split would leave a single synchronous request on one core.
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or cores(),
            "INFERENCE_PRECISION_HINT": PRECISION_FP32})
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, int(self.compiled.output(0).get_partial_shape()[1].get_length())), np.float32)
        with self._lock:
            out = self._request.infer({0: x}, share_inputs=True)
            return np.array(out[0], dtype=np.float32, copy=True)  # the request reuses its output buffer
