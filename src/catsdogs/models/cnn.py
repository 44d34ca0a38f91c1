"""From-scratch CNNs: the classic small CNN (``seed``) and a small residual network (``cnn``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from catsdogs.errors import ConfigError
from catsdogs.models.heads import num_logits


class SeedCNN(nn.Module):
    """The classic small CNN: 2 x (conv 3x3 + ReLU + max-pool 2), dropout, FC 128, output."""

    def __init__(self, num_classes: int = 2, size: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(n, 128)`` input of the final linear layer (after FC 128 + ReLU)."""
        return self.classifier[:-1](self.body(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the final linear layer (``forward`` is ``classify`` of ``features``)."""
        return self.classifier[-1](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def cam_layers(self) -> list[nn.Module]:
        """Modules whose outputs are the last conv feature maps, for class-activation heatmaps."""
        return [self.body]


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
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(ch, num_logits(num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled ``(n, 4 * width)`` input of the final linear layer."""
        return self.pool(self.body(x)).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Apply dropout and the final linear layer (``forward`` is ``classify`` of ``features``)."""
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def cam_layers(self) -> list[nn.Module]:
        """Modules whose outputs are the last conv feature maps, for class-activation heatmaps."""
        return [self.body]


def seed_cnn(num_classes: int, size: int, dropout: float = 0.5, **_: Any) -> nn.Module:
    """Build the classic small CNN (registry entry ``seed``); other models' settings are ignored."""
    return SeedCNN(num_classes, size, dropout)


def resnet_cnn(num_classes: int, size: int, dropout: float = 0.2, width: int = 32, depth: int = 1,
               **_: Any) -> nn.Module:
    """Build the residual CNN (registry entry ``cnn``); other models' settings are ignored."""
    return ResNetCNN(num_classes, size, width=width, depth=depth, dropout=dropout)
