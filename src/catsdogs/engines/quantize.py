"""Post-training static int8 quantisation of the feature graph (onnxruntime's quantiser, QDQ format).

Weights are int8 per output channel (depthwise convolutions vary by orders of magnitude between
channels; one scale per tensor would flatten the small ones), activations uint8 with ranges measured
on calibration images (MinMax: the ReLU6 network's activations are bounded, so outliers cannot stretch
a range). QDQ keeps the graph a plain ONNX file that onnxruntime and OpenVINO both run in int8.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from catsdogs.engines.graph import INPUT_NAME

CALIBRATION_METHOD = "minmax"
"""Recorded with the int8 graph; see the module docstring for why MinMax."""
CALIBRATION_CHUNK = 8
"""Images per calibration step. The calibration graph outputs the min and max of every tensor, so
onnxruntime cannot reuse activation buffers within a step: 64 images of the Lite1+Lite2 ensemble at
260 px took over 20 GB (killed for memory on a 24 GB machine), 16 peaked at 7.7 GB RSS."""


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of batches."""

    def __init__(self, batches: Iterable[np.ndarray], total: int) -> None:
        self._it: Iterator[np.ndarray] = (b[i:i + CALIBRATION_CHUNK] for b in batches
                                          for i in range(0, len(b), CALIBRATION_CHUNK))
        self._bar = tqdm(total=total, desc="int8 calibration", unit="img", file=sys.stderr)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is None:
            self._bar.close()
            return None
        self._bar.update(len(batch))
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # part of the protocol; one pass is all MinMax needs
        return None


def quantize_graph(fp32_path: Path, batches: Iterable[np.ndarray], total: int = 0) -> Any:
    """Return the int8 QDQ ``ModelProto`` of the fp32 graph at ``fp32_path``, calibrated on ``batches``.

    ``total`` (images) sizes the progress bar.
    """
    import onnx  # lazy, as everywhere: only int8 engines need the quantiser
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from catsdogs.engines.onnx_runtime import ORT_ERRORS_ONLY

    ort.set_default_logger_severity(ORT_ERRORS_ONLY)  # the calibration session's warnings, as in OnnxEngine
    # The quantiser logs "consider pre-processing" on the root logger; its symbolic shape inference
    # adds nothing to these static-shape CNN graphs, so the advice is noise on the user's terminal.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="catsdogs-quant-") as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_static(str(fp32_path), str(out), _Reader(batches, total),  # type: ignore[arg-type]
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibTensorRangeSymmetric": False})
            return onnx.load(str(out))
    finally:
        root.setLevel(level)
