"""Explanations: Grad-CAM heatmaps for every model, their outputs (predict, serve, report), pointing test."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.pointing import MIN_PASSING, MIN_SHARE, paste_on_canvas, pointing_shares, share_on_side
from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig
from catsdogs.errors import ImageDecodeError
from catsdogs.evaluate.plots import mistakes_figure
from catsdogs.infer.explain import INDEX_NAME, Explainer, overlay, to_original, unique_stems
from catsdogs.infer.predictor import Predictor
from catsdogs.models.effnet import fold_for_inference
from catsdogs.models.factory import create_model
from catsdogs.models.registry import input_normalization, model_names
from catsdogs.models.transforms import load_image, load_rgb
from tests.fixtures import encode, jpeg_bytes, synthetic_image

# Smallest input each model family accepts quickly (seed needs >= 10 px, EfficientNet >= 32 px).
_SIZES = {"seed": 32, "cnn": 32}
_EFFNET_SIZE = 32


def _predictor(model: torch.nn.Module, size: int, classes: tuple[str, ...] = ("Cat", "Dog"),
               resize: str = "stretch", mean: tuple[float, ...] = (120.0,) * 3,
               std: tuple[float, ...] = (60.0,) * 3) -> Predictor:
    """A Predictor around an in-memory model, folded for inference like ``Predictor.from_run``."""
    return Predictor(model=fold_for_inference(model.eval()), classes=list(classes), size=size, resize=resize,
                     mean=mean, std=std, device=torch.device("cpu"), checkpoint={}, path=Path("memory"))


_CASES = [(name, ("Cat", "Dog")) for name in model_names()] + [(name, ("a", "b", "c"))
                                                             for name in ("seed", "cnn", "effnet_lite0")]


@pytest.mark.parametrize(("name", "classes"), _CASES)
def test_every_model_gets_a_heatmap_and_the_same_probabilities(name: str, classes: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    size = _SIZES.get(name, _EFFNET_SIZE)
    predictor = _predictor(create_model(name, len(classes), size, pretrained=False), size, classes)
    images = np.stack([synthetic_image(i, size, seed=i) for i in range(3)])
    found = Explainer(predictor).explain_arrays(images)
    probs = predictor.predict_arrays(images)
    for ex, p in zip(found, probs, strict=True):
        assert ex.heatmap.shape == (size, size) and ex.heatmap.dtype == np.float32
        assert 0.0 <= ex.heatmap.min() and ex.heatmap.max() <= 1.0
        assert ex.target == int(np.argmax(p))
        np.testing.assert_allclose(ex.probabilities, p, atol=1e-5)
    # The predictor's own model has no hooks: plain inference is untouched by explaining.
    np.testing.assert_allclose(predictor.predict_arrays(images), probs, atol=1e-6)


def test_ensemble_map_is_the_sum_of_its_members_maps() -> None:
    """For a GAP + linear head the CAM splits the logit: the ensemble's map sums its members' parts."""
    torch.manual_seed(0)
    size = _EFFNET_SIZE
    ens = create_model("effnet_lite12", 2, size, pretrained=False).eval()
    image = synthetic_image(1, size, seed=3)[None]
    both = Explainer(_predictor(ens, size)).explain_arrays(image, np.array([1]))[0]
    # Rebuild the same head over each member alone: each member's share of the logit is its own CAM.
    parts = []
    for k, member in enumerate(ens.members):
        solo = create_model("effnet_lite1", 2, size, pretrained=False).eval() if k == 0 else \
            create_model("effnet_lite2", 2, size, pretrained=False).eval()
        solo.load_state_dict({**member.state_dict(), "_fc.weight": ens._fc.weight[:, k * 1280:(k + 1) * 1280],
                              "_fc.bias": ens._fc.bias}, strict=False)
        parts.append(solo)
    # Signed maps of each member (before the positive part), summed, must give the ensemble's map.
    signed = []
    for solo in parts:
        ex = Explainer(_predictor(solo, size))
        x = torch.as_tensor(image).permute(0, 3, 1, 2).float()
        x = ((x - 120.0) / 60.0).contiguous(memory_format=torch.channels_last)
        with torch.enable_grad():
            ex._acts = []
            z = ex.model(x)[:, 0].sum()
            (a,) = ex._acts
            (g,) = torch.autograd.grad(z, [a])
        cam = (g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True)
        signed.append(torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear",
                                                      align_corners=False)[0, 0])
    total = torch.stack(signed).sum(0).clamp_min(0)
    np.testing.assert_allclose(both.heatmap, (total / total.max()).numpy(), atol=1e-4)


def test_unique_stems_are_deterministic_and_never_collide() -> None:
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("x-1.jpg"), Path("c/y.jpg"), Path("d/x.jpg")]
    stems = unique_stems(paths)
    assert stems == ["x-2", "x-3", "x-1", "y", "x-4"]
    assert len(set(stems)) == len(stems)
    assert unique_stems(paths) == stems


def test_heatmap_maps_back_through_every_resize_policy() -> None:
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[:, 9] = 1.0  # evidence at the right edge of the model's input
    stretched = to_original(heat, "stretch", 20, 60)
    assert stretched.shape == (20, 60) and stretched[:, -1].min() > 0.5 and stretched[:, :50].max() == 0
    # crop: the model saw the centre 20x20 square (columns 20..39); the cut-off sides get nothing.
    cropped = to_original(heat, "crop", 20, 60)
    assert cropped[:, :20].max() == 0 and cropped[:, 40:].max() == 0 and cropped[:, 39].min() > 0.5
    # pad: a 20x60 photo fills rows 3..6 of the 10x10 letterbox; the bars are dropped.
    pad = np.zeros((10, 10), dtype=np.float32)
    pad[:3] = 1.0  # evidence on the black bar only: none on the photo
    pad[3:7, 0] = 0.5
    padded = to_original(pad, "pad", 20, 60)
    assert padded.shape == (20, 60) and padded.max() <= 0.5 and padded[:, 0].min() > 0.2


def test_overlay_is_an_rgb_photo_coloured_where_the_heat_is() -> None:
    photo = np.full((30, 40, 3), 128, dtype=np.uint8)
    heat = np.zeros((30, 40), dtype=np.float32)
    heat[:, 20:] = 1.0
    out = overlay(photo, heat)
    assert out.shape == photo.shape and out.dtype == np.uint8
    hot, cold = out[:, 30].mean(0), out[:, 5].mean(0)
    assert hot[0] > hot[2] + 50  # hot: red
    assert cold[2] > cold[0] + 20 and cold.min() > 60  # cold: a blue tint, the photo still visible


def test_predict_explain_writes_png_and_npy_at_the_original_size(run_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    for folder in ("a", "b"):
        (src / folder).mkdir(parents=True)
        (src / folder / "x.jpg").write_bytes(jpeg_bytes(synthetic_image(0, 48, seed=1)[:, :40]))
    (src / "x-1.jpg").write_bytes(jpeg_bytes(synthetic_image(1, 32, seed=2)))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: the photo a user sees is 30 wide, 50 high
    (src / "rotated.jpg").write_bytes(encode(Image.fromarray(synthetic_image(1, 50, seed=3)[:30]), "JPEG",
                                             exif=exif.tobytes()))
    (src / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "why"
    assert cli_main(["predict", str(src), "--run", str(run_dir), "--explain", str(out),
                     "--output", str(tmp_path / "p.csv")]) == 0
    index = list(csv.DictReader(open(out / INDEX_NAME)))
    names = {Path(r["path"]).relative_to(src).as_posix(): r["overlay"] for r in index}
    assert names == {"a/x.jpg": "x-2.png", "b/x.jpg": "x-3.png", "x-1.jpg": "x-1.png",
                     "rotated.jpg": "rotated.png"}  # broken.jpg: an error row, no heatmap
    shapes = {"x-2": (48, 40), "x-3": (48, 40), "x-1": (32, 32), "rotated": (50, 30)}
    for stem, (h, w) in shapes.items():
        heat = np.load(out / f"{stem}.npy")
        assert heat.shape == (h, w) and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0
        with Image.open(out / f"{stem}.png") as img:
            assert img.format == "PNG" and img.size == (w, h) and img.mode == "RGB"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX_NAME, "config.json", *(f"{s}.{e}" for s in shapes for e in ("png", "npy"))])


def test_predict_explain_into_a_file_exits_2(run_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(jpeg_bytes(synthetic_image(0, 32)))
    assert cli_main(["predict", str(photo), "--run", str(run_dir), "--explain", str(photo)]) == 2
    assert "--explain" in capsys.readouterr().err


def test_serve_explain_adds_a_base64_overlay(run_dir: Path) -> None:
    from catsdogs.serve.app import EXPLAIN_SIDE, create_app

    photo = jpeg_bytes(np.tile(synthetic_image(1, 100, seed=4), (1, 10, 1)))  # 1000 x 100: shrunk
    with TestClient(create_app(ServeConfig(run=str(run_dir)))) as client:
        files = {"file": ("a.jpg", photo, "image/jpeg")}
        plain = client.post("/predict", files=files)
        why = client.post("/predict?explain=true", files=files)
        bad = client.post("/predict?explain=maybe", files=files)
    assert plain.status_code == 200 and "explanation" not in plain.json()
    assert why.status_code == 200
    body = why.json()
    assert body["label"] == plain.json()["label"] and body["probabilities"] == plain.json()["probabilities"]
    ex = body["explanation"]
    assert ex["label"] == body["label"]
    assert (ex["width"], ex["height"]) == (EXPLAIN_SIDE, EXPLAIN_SIDE // 10)
    with Image.open(io.BytesIO(base64.b64decode(ex["overlay_png"]))) as img:
        assert img.format == "PNG" and img.size == (ex["width"], ex["height"])
    assert "explain;dur=" in why.headers["server-timing"]
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"


def test_report_gallery_shows_photo_and_overlay_side_by_side() -> None:
    images = np.stack([synthetic_image(i, 32, seed=i) for i in range(3)])
    overlays = np.stack([overlay(img, np.ones((32, 32), np.float32)) for img in images])
    fig = mistakes_figure(images, ["Cat"] * 3, ["Dog"] * 3, [0.9] * 3, 3, 10, overlays)
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape[1] > 2 * 32 and np.array_equal(shown[:, :32], images[0])
    assert np.array_equal(shown[:, -32:], overlays[0])
    assert "Grad-CAM" in fig._suptitle.get_text()  # type: ignore[union-attr]


# --- The pointing test: the heatmap falls on the pet, not on the empty grey half ---------------------------

def _blob_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One bright disc (red: class 0, blue: class 1) anywhere on a noisy or a plain grey background.

    Plain backgrounds of any grey teach the model that flat grey carries no evidence for either class.
    """
    if rng.random() < 0.5:
        img = rng.integers(20, 110, size=(size, size, 3)).astype(np.int32)
    else:
        img = np.full((size, size, 3), int(rng.integers(40, 200)), dtype=np.int32)
    r = int(rng.integers(size // 6, size // 3))
    cy, cx = rng.integers(r, size - r, size=2)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disc] = [230, 40, 40] if label == 0 else [40, 40, 230]
    return np.clip(img, 0, 255).astype(np.uint8)


def test_pointing_on_generated_objects() -> None:
    """The seed CNN trained in seconds on localised objects points at them on the grey canvas."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size, n = 32, 384
    x = np.stack([_blob_image(rng, i % 2, size) for i in range(n)])
    y = torch.tensor([i % 2 for i in range(n)])
    model = create_model("seed", 2, size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt = ((torch.as_tensor(x).permute(0, 3, 1, 2).float() - 120.0) / 60.0)
    for _epoch in range(3):
        for idx in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt[idx])[:, 0], y[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    predictor = _predictor(model, size)
    photos = [_blob_image(rng, i // 2 % 2, 48) for i in range(40)]  # each class on both sides
    shares = np.array(pointing_shares(Explainer(predictor), photos))
    assert (shares >= MIN_SHARE).mean() >= MIN_PASSING, np.round(shares, 2)


def test_pointing_helpers() -> None:
    photo = np.zeros((4, 3, 3), dtype=np.uint8)
    canvas = paste_on_canvas(photo, "right")
    assert canvas.shape == (4, 6, 3) and canvas[:, :3].min() == 128 and canvas[:, 3:].max() == 0
    heat = np.zeros((4, 6), dtype=np.float32)
    heat[:, 4] = 3.0
    heat[:, 0] = 1.0
    assert share_on_side(heat, "right") == pytest.approx(0.75)
    assert share_on_side(np.zeros((4, 6)), "left") == 0.0


# Real photos: an ImageNet EfficientNet-Lite0 backbone with a logistic head fitted on a few hundred of them.
_TRAIN_PER_CLASS = 150
_POINT_PER_CLASS = 25
_REAL_SIZE = 180  # the PetImages copy's side, and the quick preset's model size


@pytest.mark.realdata
def test_pointing_on_real_photos(real_data: Path) -> None:
    from catsdogs.train.head import fit_head

    rng = np.random.default_rng(0)
    classes = ("Cat", "Dog")
    train, point = [], []
    for label, cls in enumerate(classes):
        files = sorted((real_data / cls).glob("*.jpg"))
        picked = rng.choice(len(files), size=_TRAIN_PER_CLASS + _POINT_PER_CLASS, replace=False)
        train += [(files[i], label) for i in picked[:_TRAIN_PER_CLASS]]
        point += [files[i] for i in picked[_TRAIN_PER_CLASS:]]
    model = create_model("effnet_lite0", 2, _REAL_SIZE, pretrained=True).eval()
    mean, std = input_normalization("effnet_lite0", (0.0,) * 3, (1.0,) * 3)
    predictor = _predictor(model, _REAL_SIZE, classes, mean=mean, std=std)
    images, labels = [], []
    for path, label in train:
        try:
            images.append(load_image(path.read_bytes(), _REAL_SIZE))
            labels.append(label)
        except ImageDecodeError:
            continue
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), 50):
            batch = torch.as_tensor(np.stack(images[start:start + 50]))
            x = ((batch.permute(0, 3, 1, 2).float() - torch.tensor(mean).view(1, 3, 1, 1))
                 / torch.tensor(std).view(1, 3, 1, 1)).contiguous(memory_format=torch.channels_last)
            feats.append(predictor.model.features(x).numpy())  # type: ignore[operator]
    f, y = np.concatenate(feats), np.array(labels)
    order = rng.permutation(len(y))
    cut = len(y) * 4 // 5
    w, b, metrics = fit_head(f[order[:cut]], y[order[:cut]], f[order[cut:]], y[order[cut:]], 2)
    assert metrics["val_acc"] > 0.9, metrics  # a head that cannot tell the classes apart explains nothing
    with torch.no_grad():
        predictor.model._fc.weight.copy_(w)  # type: ignore[union-attr]
        predictor.model._fc.bias.copy_(b)  # type: ignore[union-attr]
    photos = []
    for path in point:
        try:
            photos.append(load_rgb(path.read_bytes()))
        except ImageDecodeError:
            continue
    shares = np.array(pointing_shares(Explainer(predictor), photos))
    assert (shares >= MIN_SHARE).mean() >= MIN_PASSING, np.round(np.sort(shares), 2)
