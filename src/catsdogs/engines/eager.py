"""torch eager fp32: the model's own ``features`` (BatchNorm folded, channels_last, inference mode)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from catsdogs.engines.base import Engine
from catsdogs.engines.names import TORCH
from catsdogs.models.effnet import fold_for_inference


class TorchEngine(Engine):
    """Runs ``model.features`` in torch; the only engine that also runs on CUDA."""

    name = TORCH

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model: nn.Module = fold_for_inference(model.eval()).to(self.device).to(
            memory_format=torch.channels_last)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model.features(x).float()  # type: ignore[operator]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.features(torch.from_numpy(x)).cpu().numpy()
