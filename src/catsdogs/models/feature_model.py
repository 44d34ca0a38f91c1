"""The contract every catsdogs model keeps: a classifier split at its last linear layer.

The engines run :meth:`FeatureModel.features` (the frozen feature pass, evaluate, predict and serve),
the head and the detector read its output, and Grad-CAM hooks :meth:`FeatureModel.cam_layers`. Every
model the registry builds (``seed``, ``cnn``, the EfficientNet-Lite family) implements it, so no stage
probes a model for methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class FeatureModel(Protocol):
    """A model whose forward is ``classify(features(x))``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled ``(n, d)`` features of normalised NCHW images: the input of the final linear layer."""
        ...

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, k)`` of :meth:`features`' output (the final linear layer)."""
        ...

    def cam_layers(self) -> list[nn.Module]:
        """The convolutional layers Grad-CAM may hook, last one first."""
        ...
