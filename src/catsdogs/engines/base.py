"""What every engine does: normalised NCHW float32 images in, pooled float32 features out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Engine(ABC):
    """A compiled feature extractor. Stateless between calls and safe to call from several threads."""

    name: str
    """The engine name (one of ``names.ENGINES``) that actually runs."""
    guard: dict[str, Any] | None = None
    """For an int8 engine: the passed accuracy check it runs under (``engines/guard.py``)."""
    fp32_sha256: str = ""
    """Digest of the fp32 feature graph behind this engine ('' for torch eager)."""
    graph_sha256: str = ""
    """Digest of the graph this engine runs (the int8 graph's for an int8 engine; '' for torch)."""
    path: Path | None = None
    """The graph file this engine runs (None for torch eager, which runs the model itself)."""

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Return ``(n, d)`` float32 features of a contiguous ``(n, 3, H, W)`` float32 batch."""

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Features of each batch, in order. Runtimes that can overlap batches override this."""
        for x in batches:
            yield self.run(x)

    def features_of(self, batches: Iterable[np.ndarray]) -> np.ndarray:
        """All features of ``batches`` stacked ``(n, d)`` (``(0, 0)`` for none)."""
        out = list(self.stream(batches))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Torch in, torch out (CPU): the form the predictor and the feature pass use."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()  # NCHW, contiguous: one copy at most
        return torch.from_numpy(self.run(arr))

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: the engine name (and, for int8, the recorded accuracy check)."""
        return {"engine": self.name, **({"int8_check": self.guard} if self.guard else {})}
