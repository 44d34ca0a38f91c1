"""What every engine does: normalised NCHW float32 images in, pooled float32 features out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


class Engine(ABC):
    """A compiled feature extractor. Stateless between calls and safe to call from several threads."""

    name: str
    """The engine name (one of ``names.ENGINES``) that actually runs."""
    guard: dict[str, Any] | None = None
    """For an int8 engine: the passed accuracy check it runs under (``engines/guard.py``)."""

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Return ``(n, d)`` float32 features of a contiguous ``(n, 3, H, W)`` float32 batch."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Torch in, torch out (CPU): the form the predictor and the feature pass use."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()  # NCHW, contiguous: one copy at most
        return torch.from_numpy(self.run(arr))

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: the engine name (and, for int8, the recorded accuracy check)."""
        return {"engine": self.name, **({"int8_check": self.guard} if self.guard else {})}
