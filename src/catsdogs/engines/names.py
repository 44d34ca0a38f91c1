"""The engine names (``--backend`` of train, evaluate, predict and serve) and what each one means.

Light on purpose (no torch, no runtimes): the config takes its choices and default from here.
"""

from __future__ import annotations

TORCH = "torch"
ONNX = "onnx"
OPENVINO = "openvino"
INT8_SUFFIX = "-int8"
ENGINES: tuple[str, ...] = (TORCH, ONNX, OPENVINO, ONNX + INT8_SUFFIX, OPENVINO + INT8_SUFFIX)
"""torch eager fp32, onnxruntime fp32, OpenVINO fp32, and the two runtimes on the int8 graph
(post-training static quantisation, calibrated on training images, guarded on validation)."""
DEFAULT_ENGINE = OPENVINO
"""OpenVINO fp32 (docs/benchmarks/engines.md): the fastest engine that gives exactly torch's answers.
On the default preset's run OpenVINO int8 failed the guard (99.22 % vs 99.33 % validation accuracy, 2
of 1,800 images over the 0.1-point bound) and onnx-int8 passed (0.06 points) but ran no faster than
OpenVINO fp32, after 76 s of calibration; so int8 is opt-in, behind its guard."""


def is_quantized(name: str) -> bool:
    """Return True for an int8 engine name."""
    return name.endswith(INT8_SUFFIX)


def runtime_of(name: str) -> str:
    """Return the runtime behind an engine name: torch, onnx or openvino."""
    return name.removesuffix(INT8_SUFFIX)


MAX_DROP_PT = 0.1
"""Largest validation-accuracy drop (percentage points) an int8 engine may cost against fp32 (the
guard, ``engines/guard.py``): about 2 of the 1,800 validation images of the dev data."""
CALIBRATION_IMAGES = 256
"""Training images that set the int8 activation ranges: 4 batches of 64. MinMax ranges of the bounded
(ReLU6) activations settle within a few hundred images (docs/benchmarks/engines.md)."""
