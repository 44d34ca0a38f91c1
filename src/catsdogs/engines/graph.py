"""The feature graph on disk: ``model.features`` exported once to ONNX, fp32, with a dynamic batch axis.

Both runtimes read this one file (OpenVINO reads ONNX directly), and the int8 graph is quantised from
it, so every engine computes the same function. Its metadata holds the SHA-256 of the exported graph
(weights and shapes): a cached file is reused only when a fresh export is byte-identical.

Tracing Lite1 + Lite2 takes seconds, so a sidecar (``RUN/engine/features.sources.json``) records which
checkpoints (by SHA-256) the graph on disk was made from, with the file's size and mtime: loading one of
those checkpoints reuses the graph without exporting it again.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs.io.atomic import atomic_write_bytes, atomic_write_text
from catsdogs.models.effnet import fold_for_inference

INPUT_NAME = "images"
"""Graph input: normalised float32 ``(batch, 3, size, size)``, as the torch model takes it."""
OUTPUT_NAME = "features"
METADATA_KEY = "catsdogs_engine"
ONNX_OPSET = 17
"""Opset 17: read by onnxruntime 1.32, OpenVINO 2026.4 and the quantiser alike."""
TRACE_BATCH = 2
"""Batch of the tracing example; the exported batch axis is dynamic."""


class _Features(nn.Module):
    """``model.features`` as a module of its own (the head is not in the graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)  # type: ignore[operator]


def export_features(model: nn.Module, size: int) -> Any:
    """Return ``model.features`` as an fp32 ONNX ``ModelProto`` (BatchNorm folded, dynamic batch).

    Uses the TorchScript-based exporter (``dynamo=False``): no onnxscript dependency, exact for these
    plain CNNs.
    """
    import onnx  # lazy: ~0.3 s at import, needed only when an ONNX or OpenVINO engine is built

    module = _Features(fold_for_inference(copy.deepcopy(model).to("cpu").eval())).eval()
    example = torch.zeros(TRACE_BATCH, 3, size, size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is expected
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def graph_digest(proto: Any) -> str:
    """SHA-256 of a graph without its metadata: the identity of the function it computes."""
    bare = type(proto)()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    return hashlib.sha256(bare.SerializeToString()).hexdigest()


def save_graph(proto: Any, path: Path, facts: dict[str, Any]) -> Path:
    """Write ``proto`` atomically with ``facts`` as its catsdogs metadata."""
    write_metadata(proto, facts)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def write_metadata(proto: Any, facts: dict[str, Any]) -> None:
    """Set the graph's catsdogs metadata entry to ``facts`` (JSON)."""
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(facts, sort_keys=True)
    proto.producer_name = "catsdogs"


def read_metadata(path: Path) -> dict[str, Any]:
    """Return a graph's catsdogs engine metadata ({} when the file is absent or unreadable)."""
    return read_json_property(path, METADATA_KEY)


def read_json_property(path: Path, key: str) -> dict[str, Any]:
    """Return the JSON metadata entry ``key`` of an ONNX file ({} when absent or unreadable)."""
    import onnx  # lazy, as in export_features

    if not path.is_file():
        return {}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure means "build it again"
        return {}
    for prop in proto.metadata_props:
        if prop.key == key:
            try:
                return dict(json.loads(prop.value))
            except (json.JSONDecodeError, TypeError):
                return {}
    return {}


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_sources(sidecar: Path) -> dict[str, Any]:
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def known_digest(path: Path, sidecar: Path, source: str) -> str:
    """The digest of the graph at ``path`` if the sidecar records it as made from ``source``, else ''.

    '' also when the file changed since the sidecar was written (size or mtime differ) or is gone.
    """
    data = _read_sources(sidecar)
    digest = str(data.get("sources", {}).get(source, "")) if source else ""
    if not digest or digest != data.get("graph_sha256"):
        return ""
    try:
        return digest if _stamp(path) == data.get("stamp") else ""
    except OSError:
        return ""


def record_source(path: Path, sidecar: Path, digest: str, source: str) -> None:
    """Record that the graph at ``path`` (digest ``digest``) is what ``source`` (a checkpoint) exports to.

    Sources of an older graph are dropped: only the current file can be reused.
    """
    data = _read_sources(sidecar)
    sources = data.get("sources", {}) if data.get("graph_sha256") == digest else {}
    sources[source] = digest
    atomic_write_text(sidecar, json.dumps({"graph_sha256": digest, "stamp": _stamp(path),
                                           "sources": sources}, indent=2, sort_keys=True) + "\n")
