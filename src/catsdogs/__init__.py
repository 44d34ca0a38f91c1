"""catsdogs: tell cats from dogs (or any classes of photos you have), and say "unknown" for anything else.

From a folder of labelled photos it makes a model and answers for new photos: Spark decodes, checks and
splits the photos into shards (preprocess), PyTorch trains a small CNN or an ImageNet-pretrained
EfficientNet-Lite on them (train), one HTML report shows how good it is (evaluate), and the model
answers from the command line (predict), over HTTP with a web page (serve) and from Python
(catsdogs.load). CPU first; the heavy stages also run on a Spark cluster.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API: dict[str, str] = {"load": "catsdogs.api", "Model": "catsdogs.api", "Explanation": "catsdogs.api",
                        "Prediction": "catsdogs.infer.prediction"}
"""The Python API by name and the module holding it, imported on first use: ``import catsdogs`` (and
with it every CLI start) must not pay for torch."""
__all__ = ["Explanation", "Model", "Prediction", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """Import an API name on first use (PEP 562)."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'catsdogs' has no attribute {name!r}")
