"""``create_model``: every model is built from ``(name, num_classes, size, **kwargs)``.

A checkpoint stores exactly those arguments (its ``model_config``, see :mod:`catsdogs.checkpoint`), so
:func:`create_from_config` rebuilds any trained model from its checkpoint alone. Names and builders
live in :mod:`catsdogs.models.registry`; builders ignore keyword arguments meant for other models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from catsdogs.errors import ConfigError
from catsdogs.models.registry import REGISTRY, model_names


def _builder(name: str) -> Callable[..., nn.Module]:
    """Return the builder function registered for ``name``; an unknown name names ``--model``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown --model {name!r}; choose one of {', '.join(model_names())}")
    module, func = REGISTRY[name].builder.split(":")
    return getattr(importlib.import_module(module), func)


def create_model(name: str, num_classes: int, size: int, **kwargs: Any) -> nn.Module:
    """Build a registered model (ImageNet backbone for pretrained ones unless ``pretrained=False``)."""
    return _builder(name)(num_classes=num_classes, size=size, **{**REGISTRY[name].kwargs, **kwargs})


def create_from_config(model_config: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild a model from a checkpoint's ``model_config``; load ``state`` strictly when given.

    ``pretrained=False`` skips loading ImageNet weights: the checkpoint's own weights replace them.
    """
    mc = dict(model_config)
    model = create_model(mc.pop("name"), **{**mc, "pretrained": False})
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model

