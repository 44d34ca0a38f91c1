"""Model factory: every model is built from ``(name, num_classes, size, **kwargs)``.

A checkpoint stores exactly those arguments (see :mod:`catsdogs.checkpoint`), so any model can be
rebuilt from its checkpoint alone. Two classes use one logit (sigmoid + BCE); N > 2 use N logits
(softmax + cross-entropy).

Models: ``seed`` (the classic 2-conv CNN), ``cnn`` (a small residual network trained from scratch,
ResNet-9-like), ``effnet_lite0/1/2`` (EfficientNet-Lite with ImageNet weights, see
:mod:`catsdogs.effnet`) and ``effnet_lite12`` (Lite1 and Lite2 side by side, one head).
Factories ignore keyword arguments meant for other models (``**_``).
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


def conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias: BN follows) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` = two conv-BN-ReLU layers at constant width (ResNet-9's res block)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(ch, ch), conv_bn(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetCNN(nn.Module):
    """From-scratch residual CNN sized for 2 CPU cores (ResNet-9 / airbench style).

    A stride-2 stem (``width/2`` channels) halves the image at once because full-resolution convs
    dominate the cost; then 3 stages of conv-BN-ReLU (channels ``width``, ``2*width``, ``4*width``)
    + 2x2 max-pool + ``depth`` residual blocks; global average pool, dropout, linear head.
    At 128 px and width 32 this is ~0.12 GMAC per image.
    """

    def __init__(self, num_classes: int = 2, size: int = 128, width: int = 32, depth: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if width < 4:
            raise ConfigError(f"--width {width} is too small for the cnn model (needs >= 4)")
        if depth < 0:
            raise ConfigError(f"--depth {depth} must be >= 0 for the cnn model")
        if size < 16:
            raise ConfigError(f"--size {size} is too small for the cnn model (needs >= 16)")
        layers: list[nn.Module] = [conv_bn(3, max(width // 2, 3), stride=2)]
        ch = max(width // 2, 3)
        for mult in (1, 2, 4):
            out = width * mult
            layers += [conv_bn(ch, out), nn.MaxPool2d(2)]
            layers += [Residual(out) for _ in range(depth)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(ch, num_logits(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


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


@register("cnn")
def _cnn(num_classes: int, size: int, dropout: float = 0.2, width: int = 32, depth: int = 1,
         **_: Any) -> nn.Module:
    return ResNetCNN(num_classes, size, width=width, depth=depth, dropout=dropout)


def _effnet_factory(variant: str) -> ModelFactory:
    def factory(num_classes: int, size: int, dropout: float = 0.2, pretrained: bool = True,
                **_: Any) -> nn.Module:
        from catsdogs.effnet import efficientnet_lite

        return efficientnet_lite(variant, num_logits(num_classes), size, dropout=dropout,
                                 pretrained=pretrained)

    factory.__doc__ = f"EfficientNet-{variant.capitalize()} (ImageNet backbone unless pretrained=False)."
    return factory


ENSEMBLES: dict[str, tuple[str, ...]] = {"effnet_lite12": ("lite1", "lite2")}
"""Ensembles of EfficientNet-Lite backbones (features concatenated, one head), by model name."""


def _ensemble_factory(variants: tuple[str, ...]) -> ModelFactory:
    def factory(num_classes: int, size: int, dropout: float = 0.2, pretrained: bool = True,
                **_: Any) -> nn.Module:
        from catsdogs.effnet import EfficientNetLiteEnsemble

        return EfficientNetLiteEnsemble(variants, num_logits(num_classes), size, dropout=dropout,
                                        pretrained=pretrained)

    factory.__doc__ = f"EfficientNet-{' + '.join(v.capitalize() for v in variants)} ensemble."
    return factory


PRETRAINED_MODELS: tuple[str, ...] = ("effnet_lite0", "effnet_lite1", "effnet_lite2", *ENSEMBLES)
"""Models whose backbone starts from ImageNet weights (and expects their input normalisation)."""

for _name in PRETRAINED_MODELS:
    if _name in ENSEMBLES:
        register(_name)(_ensemble_factory(ENSEMBLES[_name]))
    else:
        register(_name)(_effnet_factory(_name.removeprefix("effnet_")))


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
    """Return the (mean, std) in 0..255 pixel units the model expects: data stats unless pretrained.

    The EfficientNet-Lite weights were trained on inputs scaled to [-1, 1] (``(x - 127.5) / 128``);
    that measured better than ImageNet mean/std with these weights.
    """
    if name in PRETRAINED_MODELS:
        return (127.5,) * 3, (128.0,) * 3
    return data_mean, data_std


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable and frozen parameters (BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())
