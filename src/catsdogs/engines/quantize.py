"""Post-training static int8 quantisation of the feature graph (onnxruntime's quantiser, QDQ format).

Weights are int8 per output channel (depthwise convolutions vary by orders of magnitude between
channels; one scale per tensor would flatten the small ones), activations uint8 with ranges measured
on calibration images (MinMax: the ReLU6 network's activations are bounded, so outliers cannot stretch
a range). QDQ keeps the graph a plain ONNX file that onnxruntime and OpenVINO both run in int8.

The ranges are measured by a streaming calibrator (:func:`tensor_ranges`): onnxruntime's MinMax
calibrator augments the graph with a ReduceMin and a ReduceMax of every tensor to be quantised, but
then keeps every batch's outputs and runs the augmented graph unoptimised (measured at ~5 img/s and
4.1 GB for 8 images a step on 2 cores). Here the same augmented graph is compiled by OpenVINO and each
batch's minima and maxima are folded into a running pair per tensor, so memory stays at one batch and
the pass runs at OpenVINO's fp32 speed. The ranges reach the quantiser through its calibration cache
(``calibration_cache_path``), which is exactly what its own calibrator would hand over.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.engines.graph import INPUT_NAME
from catsdogs.progress import progress_bar
from catsdogs.runtime import cores

CALIBRATION_METHOD = "minmax-streaming"
"""Recorded with the int8 graph; see the module docstring for why MinMax, and how it is streamed."""
CALIBRATION_CHUNK = 16
"""Images per calibration step: the augmented graph returns two scalars per tensor, so a step's memory
is one batch of activations (16 Lite1 + Lite2 images at 260 px: ~1.3 GB peak)."""


def _augmented(fp32_path: Path, tmp: Path) -> tuple[Path, list[str]]:
    """Write the graph with a ReduceMin and ReduceMax output per calibrated tensor; return it and those names.

    The tensors are the ones onnxruntime's quantiser asks ranges for (its own selection and naming).
    """
    import onnx
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    out = tmp / "augmented.onnx"
    calibrater = MinMaxCalibrater(fp32_path, ops, augmented_model_path=str(out), symmetric=False)
    calibrater.augment_graph()
    outputs = [o.name for o in onnx.load(str(out), load_external_data=False).graph.output]
    return out, outputs[calibrater.num_model_outputs:]


def tensor_ranges(fp32_path: Path, batches: Iterable[np.ndarray], total: int = 0) -> Any:
    """MinMax ranges of the tensors to quantise, from one streamed pass over ``batches`` (TensorsData)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    from catsdogs.engines.openvino_runtime import compile_config, shared_core

    with tempfile.TemporaryDirectory(prefix="catsdogs-calib-") as tmp:
        path, names = _augmented(fp32_path, Path(tmp))
        core = shared_core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", compile_config("LATENCY", cores()))
        request = compiled.create_infer_request()
        ports = {compiled.output(name): name for name in names}
        low = {n: np.inf for n in names}
        high = {n: -np.inf for n in names}
        bar = progress_bar(total=total or None, desc="int8 calibration", unit="img", file=sys.stderr)
        seen = 0
        for batch in batches:
            for i in range(0, len(batch), CALIBRATION_CHUNK):
                chunk = np.ascontiguousarray(batch[i:i + CALIBRATION_CHUNK], dtype=np.float32)
                result = request.infer({INPUT_NAME: chunk}, share_inputs=True)
                for port, name in ports.items():
                    value = float(np.asarray(result[port]).reshape(-1)[0])
                    if name.endswith("_ReduceMin"):
                        low[name] = min(low[name], value)
                    else:
                        high[name] = max(high[name], value)
                seen += len(chunk)
                bar.update(len(chunk))
        bar.close()
        del request, compiled
    if not seen:
        raise ValueError("no calibration images")
    pairs = {}
    for i in range(0, len(names), 2):  # the calibrater adds each tensor's ReduceMin, then its ReduceMax
        tensor = names[i].rpartition("_")[0]
        pairs[tensor] = (np.array([low[names[i]]], np.float32), np.array([high[names[i + 1]]], np.float32))
    return TensorsData(CalibrationMethod.MinMax, pairs)


def saturating_cpu() -> bool:
    """True on an x86 CPU without VNNI (AVX2 only): quantise weights to 7 bits there.

    Its int8 kernels add u8 x s8 pairs into int16 with saturation (``vpmaddubsw``), so full 8-bit
    weights can overflow; onnxruntime's ``reduce_range`` (7-bit weights) avoids it. Measured here (2 AMD
    EPYC AVX2 cores): with 8-bit weights a seed CNN's int8
    features moved so far that its detector answered every photo "unknown" (tests/test_confidence.py
    failed on main); with 7-bit weights they pass. CPUs with VNNI or AMX keep 8-bit weights.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def quantize_graph(fp32_path: Path, batches: Iterable[np.ndarray], total: int = 0) -> Any:
    """Return the int8 QDQ ``ModelProto`` of the fp32 graph at ``fp32_path``, calibrated on ``batches``.

    ``total`` (images) sizes the progress bar.
    """
    import onnx  # lazy, as everywhere: only int8 engines need the quantiser
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from catsdogs.engines.onnx_runtime import ORT_ERRORS_ONLY

    ort.set_default_logger_severity(ORT_ERRORS_ONLY)
    ranges = tensor_ranges(fp32_path, batches, total)
    # The quantiser logs "consider pre-processing" on the root logger; its symbolic shape inference
    # adds nothing to these static-shape CNN graphs, so the advice is noise on the user's terminal.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="catsdogs-quant-") as tmp:
            out, cache = Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
            save_tensors_data(ranges, cache)
            quantize_static(str(fp32_path), str(out), None,  # type: ignore[arg-type]
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=saturating_cpu(),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibration_cache_path=str(cache),
                            extra_options={"CalibTensorRangeSymmetric": False})
            return onnx.load(str(out))
    finally:
        root.setLevel(level)
