"""The model registry: every ``--model`` name, the function that builds it, and its input contract.

Deliberately free of torch (importing it costs ~1.5 s): the config validates ``--model`` against
:func:`model_names` before any heavy import, and :func:`catsdogs.models.factory.create_model`
imports a model's builder only when that model is built (timm-style registry, lazy entry points).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """One registered model."""

    builder: str
    """``module:function`` called as ``function(num_classes=, size=, **kwargs)``."""
    pretrained: bool = False
    """The backbone starts from ImageNet weights and expects their input normalisation."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Fixed keyword arguments of the builder (e.g. which EfficientNet-Lite variant)."""


PRETRAINED_MEAN: tuple[float, ...] = (127.5,) * 3
PRETRAINED_STD: tuple[float, ...] = (128.0,) * 3
"""Input scaling of the EfficientNet-Lite ImageNet weights, ``(x - 127.5) / 128`` in pixel units; it
measured better than ImageNet mean/std with these weights. From-scratch models use the data's own."""

REGISTRY: dict[str, ModelSpec] = {
    "seed": ModelSpec("catsdogs.models.cnn:seed_cnn"),
    "cnn": ModelSpec("catsdogs.models.cnn:resnet_cnn"),
    "effnet_lite0": ModelSpec("catsdogs.models.effnet:create_lite", True, {"variants": ("lite0",)}),
    "effnet_lite1": ModelSpec("catsdogs.models.effnet:create_lite", True, {"variants": ("lite1",)}),
    "effnet_lite2": ModelSpec("catsdogs.models.effnet:create_lite", True, {"variants": ("lite2",)}),
    # Lite1 and Lite2 side by side (features concatenated, one head): +0.3 points over Lite2 alone
    # as a frozen probe (docs/models.md).
    "effnet_lite12": ModelSpec("catsdogs.models.effnet:create_lite", True, {"variants": ("lite1", "lite2")}),
}
"""Every model ``--model`` accepts, by name."""


def model_names() -> tuple[str, ...]:
    """Return the registered model names, sorted."""
    return tuple(sorted(REGISTRY))


def pretrained_names() -> tuple[str, ...]:
    """Return the names of models whose backbone starts from ImageNet weights."""
    return tuple(name for name in model_names() if REGISTRY[name].pretrained)


def input_normalization(name: str, data_mean: tuple[float, ...], data_std: tuple[float, ...]
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the (mean, std) in 0..255 pixel units model ``name`` expects: the data's unless pretrained."""
    if REGISTRY[name].pretrained:
        return PRETRAINED_MEAN, PRETRAINED_STD
    return data_mean, data_std
