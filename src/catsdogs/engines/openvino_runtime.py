"""OpenVINO on CPU: the fp32 feature graph (ONNX read directly) or its int8 (QDQ) form.

OpenVINO turns the QDQ pairs of the int8 graph into its own quantised convolutions, which run on the
CPU's int8 units (AVX-512 VNNI / AMX here), so one quantised file serves both runtimes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
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


STREAMS = 2
"""Parallel inference streams of the feature pass (``stream``): one per core of the 2-core machine, each
single-threaded, so no layer waits at a barrier for the other core (docs/engines.md has the measured
rates of each setting)."""


def pinning(threads: int | None) -> bool:
    """Whether OpenVINO may pin its threads to cores: only when the engine owns every core.

    OpenVINO pins by default, and each process pins from core 0 up, so two one-thread engines in two
    processes (two Spark executors, or ``local[2]``'s two Python workers) share one core and the other
    idles: two processes x 1 thread ran 13.4 it/s each pinned, 25.9 unpinned, 26.0 alone
    (``python -m benchmarks.probes pinning``).
    """
    return (threads or 0) >= cores()


def compile_config(hint: str, threads: int | None, **extra: Any) -> dict[str, Any]:
    """OpenVINO CPU settings for ``threads`` inference threads: fp32 precision, pinning by :func:`pinning`."""
    return {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads or 0,  # 0: OpenVINO's own choice
            "ENABLE_CPU_PINNING": pinning(threads), "INFERENCE_PRECISION_HINT": PRECISION_FP32, **extra}


STREAM_BATCH = 8
"""Images per request of the feature pass: 8 images' uint8 activations of the largest Lite2 layer
(~4 MB) stay in the 32 MB L3 cache, 64 (~35 MB, and 140 MB in fp32) do not."""


class OpenVinoEngine(Engine):
    """One compiled model and one infer request, used under a lock (requests are not thread-safe).

    Callers already batch and serialise forward passes (one server worker for this engine), so the lock
    costs nothing; per-thread requests were destroyed in whatever thread exited last, after their
    compiled model in a long test process, which crashed the interpreter. The bulk feature pass
    (``stream``) compiles the graph a second time, lazily, for several streams with one async queue.
    """

    def __init__(self, name: str, path: Path, threads: int | None = None) -> None:
        self.name = name
        self.path = path
        self.threads = threads or cores()
        core = shared_core()
        self._model = core.read_model(str(path))
        # LATENCY: one stream using every thread, for one batch at a time (serving, evaluate).
        self.compiled = core.compile_model(self._model, "CPU", compile_config("LATENCY", self.threads))
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        self._throughput: Any = None

    @property
    def width(self) -> int:
        return int(self.compiled.output(0).get_partial_shape()[1].get_length())

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.width), np.float32)
        if len(x) > STREAM_BATCH and self._throughput is not None:
            # Once a feature pass has compiled the streams, a batch of several requests runs on them too.
            # Never compiled here: the first large batch of a server would wait seconds for the compile
            # (measured: a c=16 load test stalled behind it), so serving keeps the one-stream request.
            return np.concatenate(list(self.stream([x])))
        return self.request(x)

    def request(self, x: np.ndarray) -> np.ndarray:
        """``x`` as one request on the one-stream, all-threads compile (whatever its size)."""
        if len(x) == 0:
            return np.zeros((0, self.width), np.float32)
        with self._lock:
            out = self._request.infer({0: x}, share_inputs=True)
            return np.array(out[0], dtype=np.float32, copy=True)  # the request reuses its output buffer

    def _streams(self) -> Any:
        if self._throughput is None:
            streams = max(1, min(STREAMS, self.threads))
            self._throughput = shared_core().compile_model(
                self._model, "CPU", compile_config("THROUGHPUT", self.threads, NUM_STREAMS=streams))
        return self._throughput

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Features of each batch in order.

        Each batch runs as ``STREAM_BATCH``-image requests, one per stream in flight at once.
        """
        import openvino as ov

        compiled = self._streams()
        queue = ov.AsyncInferQueue(compiled, max(1, int(compiled.get_property("NUM_STREAMS"))))
        results: dict[tuple[int, int], np.ndarray] = {}
        parts: dict[int, list[np.ndarray]] = {}  # each batch's chunks, shared with the requests until done

        def done(request: Any, key: tuple[int, int]) -> None:
            results[key] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

        def finished(index: int) -> bool:
            return all((index, j) in results for j in range(len(parts[index])))

        def collect(index: int) -> np.ndarray:
            chunks = [results.pop((index, j)) for j in range(len(parts.pop(index)))]
            return np.concatenate(chunks) if chunks else np.zeros((0, self.width), np.float32)

        queue.set_callback(done)
        ready = 0
        try:
            for index, x in enumerate(batches):
                parts[index] = [x[i:i + STREAM_BATCH] for i in range(0, len(x), STREAM_BATCH)]
                for j, chunk in enumerate(parts[index]):
                    # Waits for a free request; the chunk stays referenced in parts until its result is taken.
                    queue.start_async({0: chunk}, userdata=(index, j), share_inputs=True)
                while ready in parts and finished(ready):
                    yield collect(ready)
                    ready += 1
            queue.wait_all()
            while ready in parts:
                yield collect(ready)
                ready += 1
        finally:
            queue.wait_all()  # an abandoned pass still finishes its requests before they are dropped
            del queue
