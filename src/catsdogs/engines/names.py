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
DEFAULT_ENGINE = OPENVINO + INT8_SUFFIX
"""OpenVINO int8, measured on the default preset (docs/engines.md): the fastest engine, and the head
fitted on its features stays within the guard; where its guard refuses, OpenVINO fp32 runs instead."""


def engine_for(given: str | None, recorded: str | None = None) -> str:
    """The engine to run: the one asked for, else the one the run records, else :data:`DEFAULT_ENGINE`.

    The one rule for train (no run yet: the default) and evaluate, predict, serve and the Python API
    (the run's engine: ``infer.engine.recorded_engine``).
    """
    return given or recorded or DEFAULT_ENGINE


def is_quantized(name: str) -> bool:
    """Return True for an int8 engine name."""
    return name.endswith(INT8_SUFFIX)


def runtime_of(name: str) -> str:
    """Return the runtime behind an engine name: torch, onnx or openvino."""
    return name.removesuffix(INT8_SUFFIX)


MAX_DROP_PT = 0.1
"""Largest validation-accuracy drop (percentage points) an int8 engine may cost against fp32 (the
guard, ``engines/guard.py``): about 2 of the 1,800 validation images of the dev data."""
MAX_UNKNOWN_RISE_PT = 1.0
"""Most the share of validation images answered "unknown" may rise (percentage points) on an int8 engine
against fp32: the run's detector was thresholded on fp32 (or recorded) features, and features that moved
too far would refuse real photos. A tiny from-scratch CNN's features moved by more than its whole kNN
threshold on an AVX2 machine, and every photo became unknown."""
CALIBRATION_IMAGES = 64
"""Training images that set the int8 activation ranges: one batch of 64. MinMax ranges of the bounded
(ReLU6) activations settle early. On the default preset's VALIDATION split, 64 / 128 / 256 images gave
99.17 / 99.17 / 99.11 % with a 256-image run's head and 99.28 / 99.28 / 99.33 % with a 64-image run's,
and the same mean cosine to fp32 features (0.9887 / 0.9886 / 0.9885), while calibration costs ~50 ms
per image (the augmented graph): the engine builds in 14-15 s with 64, 22-24 s with 256
(``python -m benchmarks.calibration``). The int8 guard still checks every run."""
