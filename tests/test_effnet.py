"""EfficientNet-Lite: architecture, strict ImageNet weight loading, zero-shot sanity on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from catsdogs.models import effnet
from catsdogs.models.factory import create_model
from catsdogs.models.registry import input_normalization


def _parameters(model: torch.nn.Module) -> int:
    """Trainable and frozen parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_imagenet_weights_load_strictly_key_for_key(variant: str) -> None:
    shipped = torch.load(effnet.weights_path(variant), map_location="cpu", weights_only=True)
    model = effnet.efficientnet_lite(variant, 1000, 224, pretrained=True)
    ours = model.state_dict()
    assert set(ours) == set(shipped)  # strict: no missing, no unexpected key
    for key, value in shipped.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def test_head_is_replaced_and_backbone_kept() -> None:
    shipped = torch.load(effnet.weights_path("lite0"), map_location="cpu", weights_only=True)
    model = create_model("effnet_lite0", num_classes=2, size=96)
    assert model._fc.weight.shape == (1, 1280)
    assert torch.equal(model._conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(model._blocks[15]._project_conv.weight, shipped["_blocks.15._project_conv.weight"])


@pytest.mark.parametrize(("name", "blocks", "params"), [
    ("effnet_lite0", 16, 3_372_289), ("effnet_lite1", 21, 4_136_961), ("effnet_lite2", 21, 4_812_353)])
def test_architecture_sizes(name: str, blocks: int, params: int) -> None:
    model = create_model(name, num_classes=2, size=64, pretrained=False)
    assert len(model._blocks) == blocks
    assert _parameters(model) == params


@pytest.mark.parametrize("size", [64, 97])
@pytest.mark.parametrize("classes", [2, 3])
def test_output_shapes(size: int, classes: int) -> None:
    model = create_model("effnet_lite0", num_classes=classes, size=size, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last))
        feats = model.features(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1 if classes == 2 else classes)
    assert feats.shape == (2, effnet.FEATURE_DIM)


def test_same_padding_matches_tensorflow() -> None:
    # TF SAME: output ceil(n/s); stride-2 on even sizes pads more after than before.
    assert effnet.same_padding(224, 3, 2) == (0, 1)
    assert effnet.same_padding(224, 5, 2) == (1, 2)
    assert effnet.same_padding(225, 3, 2) == (1, 1)
    assert effnet.same_padding(7, 5, 1) == (2, 2)
    conv = effnet.Conv2dStaticSamePadding(3, 4, 3, 2, image_size=10)
    assert conv(torch.randn(1, 3, 10, 10)).shape[-1] == 5


def test_round_filters_like_reference() -> None:
    assert effnet.round_filters(320, 1.1) == 352
    assert effnet.round_filters(16, 1.1) == 16
    assert effnet.round_filters(40, 1.1) == 48


def test_normalization_is_minus_one_to_one_for_effnet() -> None:
    mean, std = input_normalization("effnet_lite0", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert mean == (127.5,) * 3 and std == (128.0,) * 3
    assert input_normalization("cnn", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


@pytest.mark.realdata
def test_zero_shot_imagenet_cat_vs_dog_classes_beat_chance(real_data: Path) -> None:
    """Summed ImageNet cat (281-285) vs dog (151-268) probabilities must classify real photos."""
    from catsdogs.errors import ImageDecodeError
    from catsdogs.models.transforms import load_image, normalize

    images, labels = [], []
    for label, cls in enumerate(("Cat", "Dog")):
        files = sorted((real_data / cls).glob("*.jpg"), key=lambda p: p.name)[:30]
        for f in files:
            try:
                images.append(load_image(f.read_bytes(), 160))
            except ImageDecodeError:
                continue
            labels.append(label)
            if labels.count(label) == 20:
                break
    model = effnet.efficientnet_lite("lite0", 1000, 160, pretrained=True).eval()
    x = normalize(torch.from_numpy(np.stack(images)), (127.5,) * 3, (128.0,) * 3)
    with torch.inference_mode():
        p = model(x).softmax(1)
    dog_vs_cat = p[:, 151:269].sum(1) > p[:, 281:286].sum(1)
    acc = (dog_vs_cat.long() == torch.tensor(labels)).float().mean().item()
    assert len(labels) == 40
    assert acc >= 0.75, acc  # chance is 0.5; measured ~0.9
    # An untrained network of the same shape must not do this: the weights carry the knowledge.
    assert p[:, 151:269].sum(1).mean() + p[:, 281:286].sum(1).mean() > 0.5


def test_folded_batchnorm_gives_the_same_features() -> None:
    torch.manual_seed(0)
    model = effnet.efficientnet_lite("lite0", 1, 64, pretrained=True).eval()
    folded = effnet.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded.features(x), model.features(x), rtol=1e-4, atol=1e-4)


def test_lite12_ensemble_concatenates_both_imagenet_backbones() -> None:
    model = create_model("effnet_lite12", num_classes=2, size=64).eval()
    assert isinstance(model, effnet.EfficientNetLiteEnsemble) and model.variants == ("lite1", "lite2")
    for member, variant in zip(model.members, model.variants, strict=True):
        shipped = torch.load(effnet.weights_path(variant), map_location="cpu", weights_only=True)
        own = member.state_dict()
        # Every backbone tensor is the shipped one (the ImageNet head is the only thing dropped).
        assert set(own) == {k for k in shipped if not k.startswith("_fc.")}
        assert all(torch.equal(own[k], shipped[k]) for k in own)
    assert model._fc.weight.shape == (1, 2 * 1280)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.features(x)
        assert f.shape == (2, 2560)
        torch.testing.assert_close(f[:, 1280:], model.members[1].features(x))
        assert model(x).shape == (2, 1)
        folded = effnet.fold_for_inference(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    # Rebuilt without ImageNet files (from a checkpoint), it has the same parameter names.
    assert set(create_model("effnet_lite12", 2, 64, pretrained=False).state_dict()) == set(model.state_dict())
