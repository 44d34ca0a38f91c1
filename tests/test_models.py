"""Model registry and the from-scratch cnn: shapes, sizes, errors, rebuild from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from catsdogs.errors import ConfigError
from catsdogs.models.cnn import ResNetCNN
from catsdogs.models.factory import create_model
from catsdogs.models.heads import num_logits, probabilities
from catsdogs.models.registry import model_names


def _parameters(model: torch.nn.Module) -> int:
    """Trainable and frozen parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())

def test_registry_lists_every_model() -> None:
    assert set(model_names()) >= {"seed", "cnn", "effnet_lite0", "effnet_lite1", "effnet_lite2",
                                  "effnet_lite12"}


def test_unknown_model_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--model"):
        create_model("resnet9000", num_classes=2, size=64)


@pytest.mark.parametrize("size", [64, 96, 128])
@pytest.mark.parametrize("classes", [2, 5])
def test_cnn_output_shapes(size: int, classes: int) -> None:
    model = create_model("cnn", num_classes=classes, size=size, width=8, depth=1).eval()
    x = torch.randn(3, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_logits(classes))
    assert probabilities(out).shape == (3, classes)


def test_cnn_width_and_depth_change_capacity() -> None:
    small = _parameters(create_model("cnn", 2, 64, width=16, depth=0))
    wide = _parameters(create_model("cnn", 2, 64, width=32, depth=0))
    deep = _parameters(create_model("cnn", 2, 64, width=16, depth=2))
    assert small < wide and small < deep
    # width 32, depth 1: convs 3x3 of 3->16, 16->32, 32->64, 64->128 + 3 residual pairs, ~0.6 M.
    n = _parameters(create_model("cnn", 2, 128, width=32, depth=1))
    assert 400_000 < n < 800_000


def test_cnn_factory_ignores_other_models_kwargs() -> None:
    model = create_model("cnn", 2, 64, width=8, pretrained=False, variant="x")
    assert isinstance(model, ResNetCNN)


@pytest.mark.parametrize(("kwargs", "flag"), [({"width": 2}, "--width"), ({"depth": -1}, "--depth"),
                                              ({"size": 8}, "--size")])
def test_cnn_bad_settings_name_the_flag(kwargs: dict, flag: str) -> None:
    args = {"num_classes": 2, "size": 64, **kwargs}
    with pytest.raises(ConfigError, match=flag):
        create_model("cnn", **args)


def test_cnn_learns_a_trivial_batch() -> None:
    """A few steps on a separable batch must drive the loss down (gradients flow through the res blocks)."""
    torch.manual_seed(0)
    model = create_model("cnn", 2, 32, width=8, depth=1, dropout=0.0)
    x = torch.randn(16, 3, 32, 32)
    y = (torch.arange(16) % 2).float()
    x[y == 1, 0] += 2.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(("name", "kwargs"), [("cnn", {"width": 8, "depth": 2, "dropout": 0.1}),
                                              ("effnet_lite0", {"dropout": 0.3})])
def test_rebuild_from_checkpoint_matches_outputs(tmp_path: Path, name: str, kwargs: dict) -> None:
    torch.manual_seed(1)
    size = 48
    model = create_model(name, num_classes=2, size=size, pretrained=False, **kwargs)
    # Non-trivial BN statistics so a mismatch in buffers would show.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    model.eval()
    state = {
        ckpt.CKPT_FORMAT: ckpt.FORMAT_VERSION,
        ckpt.CKPT_MODEL_STATE: model.state_dict(),
        ckpt.CKPT_MODEL_CONFIG: {"name": name, "num_classes": 2, "size": size, **kwargs},
        ckpt.CKPT_CLASSES: ["Cat", "Dog"],
        ckpt.CKPT_NORM: {"mean": [0.0] * 3, "std": [1.0] * 3},
        ckpt.CKPT_IMAGE: {"size": size, "resize": "stretch"},
    }
    save_checkpoint(tmp_path / "best.pt", state)
    rebuilt = build_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_cnn_trained_by_catsdogs_train_rebuilds_with_its_width_and_depth(tmp_path: Path) -> None:
    from catsdogs.cli import main as cli_main
    from catsdogs.infer.predictor import Predictor
    from tests.fixtures import make_shards

    data = tmp_path / "shards"
    make_shards(data, counts={"train": 32, "val": 16, "test": 8}, size=32, shard_rows=16)
    out = tmp_path / "run"
    rc = cli_main(["train", "--data", str(data), "--output", str(out), "--model", "cnn", "--width", "8",
                   "--depth", "2", "--epochs", "1", "--batch-size", "16", "--threads", "1"])
    assert rc == 0
    pred = Predictor.from_run(out)
    assert pred.checkpoint[ckpt.CKPT_MODEL_CONFIG]["depth"] == 2
    assert isinstance(pred.model, ResNetCNN) and pred.model.fc.in_features == 32
    assert sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "Residual"
               for m in pred.model.modules()) == 6
