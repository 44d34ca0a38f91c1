"""An exponential moving average of model weights (``--ema``), evaluated instead of the raw ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's parameters and float buffers.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short
    runs are not dominated by the random initial weights. Integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current weights into the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                avg.copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. an evaluation copy)."""
        model.load_state_dict(self.state, strict=True)

    def state_dict(self) -> dict[str, Any]:
        """Return a ``weights_only``-loadable dict of the average."""
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore an average saved with :meth:`state_dict`."""
        self.decay = float(d["decay"])
        self.updates = int(d["updates"])
        for k, v in d["state"].items():
            self.state[k].copy_(v)
