"""``catsdogs export``: write a trained model as a self-contained ONNX or TorchScript file.

The exported graph takes the same input the server decodes, uint8 images ``(batch, size, size, 3)``,
and returns class probabilities ``(batch, C)``: normalisation and the sigmoid/softmax are inside,
so a consumer needs no catsdogs code. Classes, size, resize policy and the SHA-256 of the source
checkpoint are stored as metadata; the digest tells ``serve --backend onnx`` when a file is stale.
"""

from __future__ import annotations

import copy
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs import __version__
from catsdogs.config import ExportConfig, check_required, need
from catsdogs.engines.graph import read_json_property
from catsdogs.engines.names import TORCH
from catsdogs.errors import ConfigError
from catsdogs.infer.predictor import Predictor
from catsdogs.io.atomic import atomic_save, atomic_write_bytes
from catsdogs.io.checksum import sha256_file
from catsdogs.models.heads import probabilities
from catsdogs.rundir import RunDir

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
METADATA_KEY = "catsdogs"
"""Key of the JSON metadata entry (ONNX metadata_props / TorchScript extra file ``catsdogs.json``)."""
ONNX_OPSET = 17


class ExportModule(nn.Module):
    """uint8 NHWC images -> class probabilities, with the training normalisation built in."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return probabilities(self.model((x - self.mean) / self.std))


def metadata(predictor: Predictor) -> dict[str, Any]:
    """Return the facts stored next to the exported graph."""
    return {
        "classes": predictor.classes,
        "size": predictor.size,
        "resize": predictor.resize,
        "model": predictor.describe().get("name"),
        "checkpoint": str(predictor.path),
        "checkpoint_sha256": sha256_file(predictor.path),
        "input": f"{INPUT_NAME}: uint8 (batch, {predictor.size}, {predictor.size}, 3) RGB",
        "output": f"{OUTPUT_NAME}: float32 (batch, {len(predictor.classes)})",
        "catsdogs_version": __version__,
    }


def export_module(predictor: Predictor) -> ExportModule:
    """Wrap a CPU, contiguous-format copy of the predictor's model for export."""
    model = copy.deepcopy(predictor.model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    return ExportModule(model, predictor.mean, predictor.std).eval()


def example_input(predictor: Predictor, batch: int = 2) -> torch.Tensor:
    """Return a deterministic uint8 example batch for tracing."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, predictor.size, predictor.size, 3), dtype=torch.uint8, generator=g)


def export_onnx(predictor: Predictor, output: str | Path) -> Path:
    """Export to ONNX with a dynamic batch axis and metadata; write ``output`` atomically.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript`` dependency
    and handles these plain CNNs exactly.
    """
    import onnx  # lazy: ~0.3 s at import, needed only when exporting or serving --backend onnx

    module = export_module(predictor)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is expected
        torch.onnx.export(module, (example_input(predictor),), buf, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata(predictor))
    proto.producer_name = "catsdogs"
    onnx.checker.check_model(proto)
    output = Path(output)
    atomic_write_bytes(output, proto.SerializeToString())
    return output


def export_torchscript(predictor: Predictor, output: str | Path) -> Path:
    """Trace to TorchScript (batch size is free) with metadata; write ``output`` atomically."""
    module = export_module(predictor)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        traced = torch.jit.trace(module, (example_input(predictor),))
    extra = {f"{METADATA_KEY}.json": json.dumps(metadata(predictor))}
    output = Path(output)
    atomic_save(output, lambda fh: torch.jit.save(traced, fh, _extra_files=extra))
    return output


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """Return the catsdogs metadata of an ONNX file ({} when absent or unreadable)."""
    return read_json_property(Path(path), METADATA_KEY)


def onnx_is_fresh(path: str | Path, predictor: Predictor) -> bool:
    """Return True if ``path`` exists and was exported from the predictor's exact checkpoint."""
    if not Path(path).is_file():
        return False
    return read_onnx_metadata(path).get("checkpoint_sha256") == sha256_file(predictor.path)


def ensure_onnx(predictor: Predictor, run: str | Path) -> tuple[Path, bool]:
    """Return RUN/model.onnx, exporting it first if missing or stale; the flag says if it was made."""
    path = RunDir.from_arg(run).export("onnx")
    if onnx_is_fresh(path, predictor):
        return path, False
    return export_onnx(predictor, path), True


def export(predictor: Predictor, fmt: str, output: str | Path) -> Path:
    """Export ``predictor`` in ``fmt`` (onnx or torchscript) to ``output``."""
    if fmt == "onnx":
        return export_onnx(predictor, output)
    if fmt == "torchscript":
        return export_torchscript(predictor, output)
    raise ConfigError(f"--format must be onnx or torchscript, got {fmt!r}")


def main(cfg: ExportConfig) -> int:
    """Run ``catsdogs export``: load the run's checkpoint and write the exported file."""
    check_required(cfg)
    run = need(cfg, "run")
    predictor = Predictor.from_run(run, "cpu", backend=TORCH)  # exports the torch model itself
    output = Path(cfg.output) if cfg.output else RunDir.from_arg(run).export(cfg.format)
    if output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a folder; give a file name")
    path = export(predictor, cfg.format, output)
    size_kb = path.stat().st_size / 1024
    print(f"catsdogs export: wrote {path} ({cfg.format}, {size_kb:.0f} KiB, input {INPUT_NAME} uint8 "
          f"(batch, {predictor.size}, {predictor.size}, 3), output {OUTPUT_NAME})", file=sys.stderr)
    return 0
