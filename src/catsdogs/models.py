"""Model factory: every model is built from ``(name, num_classes, size, **kwargs)``.

A checkpoint stores exactly those arguments (see :mod:`catsdogs.checkpoint`), so any model can be
rebuilt from its checkpoint alone. Two classes use one logit (sigmoid + BCE); N > 2 use N logits
(softmax + cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from catsdogs.errors import ConfigError


def num_logits(num_classes: int) -> int:
    """Return the head width: 1 for binary (sigmoid output), N for N classes (softmax)."""
    return 1 if num_classes == 2 else num_classes


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Turn head outputs ``(n, 1)`` or ``(n, C)`` into class probabilities ``(n, C)``."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0].float())
        return torch.stack([1.0 - p1, p1], dim=1)
    return torch.softmax(logits.float(), dim=1)


class SeedCNN(nn.Module):
    """The classic small CNN: 2 x (conv 3x3 + ReLU + max-pool 2), dropout, FC 128, output."""

    def __init__(self, num_classes: int = 2, size: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        # Valid 3x3 conv shrinks by 2, pool halves (floor): the flat size follows --size.
        side = ((size - 2) // 2 - 2) // 2
        if side <= 0:
            raise ConfigError(f"--size {size} is too small for the seed model (needs >= 10)")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_logits(num_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name`` (used by ``--model``)."""

    def wrap(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = fn
        return fn

    return wrap


@register("seed")
def _seed(num_classes: int, size: int, dropout: float = 0.5, **_: Any) -> nn.Module:
    return SeedCNN(num_classes, size, dropout)


def model_names() -> list[str]:
    """Return the registered model names."""
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, size: int, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names raise a :class:`ConfigError` naming ``--model``."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown --model {name!r}; choose one of {', '.join(model_names())}")
    return _REGISTRY[name](num_classes=num_classes, size=size, **kwargs)


def input_normalization(name: str, data_mean: tuple[float, ...], data_std: tuple[float, ...]
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the (mean, std) in 0..255 pixel units the model expects: data stats unless pretrained."""
    return data_mean, data_std
