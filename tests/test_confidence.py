"""Answers you can trust: the "unknown" detector, temperature scaling, ECE, and one answer everywhere."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import load_checkpoint
from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig, TrainConfig
from catsdogs.evaluate.metrics import expected_calibration_error, reliability_bins
from catsdogs.infer.predictor import UNKNOWN, Predictor
from catsdogs.models.calibration import fit_temperature, nll
from catsdogs.models.ood import Detector, calibrate_threshold, fit_detector, flat_images, ledoit_wolf
from catsdogs.serve.app import create_app
from tests.fixtures import make_run, make_shards, synthetic_image
from tests.ood_set import generated_images, png_bytes

SIZE = 32


# ------------------------------------------------------------------------------- detector math

def temper_probabilities(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: temperature applied to probabilities, the reference the tests compare with."""
    if temperature == 1.0 or len(probs) == 0:
        return probs
    lp = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    lp -= lp.max(axis=1, keepdims=True)
    e = np.exp(lp)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

def _two_blobs(n: int = 400, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d)  # anisotropic: Mahalanobis != Euclidean
    x[:, 0] += np.where(y == 0, -4.0, 4.0)
    return x.astype(np.float32), y


def test_ledoit_wolf_matches_sklearn() -> None:
    x, _ = _two_blobs(200, 8)
    xc = x - x.mean(0)
    cov, shrink = ledoit_wolf(torch.from_numpy(xc))
    sk_cov, sk_shrink = sk_ledoit_wolf(xc, assume_centered=True)
    assert shrink == pytest.approx(sk_shrink, rel=1e-6)
    np.testing.assert_allclose(cov.numpy(), sk_cov, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_detector_scores_far_points_higher_and_threshold_accepts_the_chosen_share(method: str) -> None:
    x, y = _two_blobs()
    det = fit_detector(method, x, y, num_classes=2)
    vx, _vy = _two_blobs(200, seed=1)
    logits = torch.zeros(len(vx), 1)
    val_scores = det.score(torch.from_numpy(vx), logits).numpy()
    calibrate_threshold(det, val_scores, accept_rate=0.95)
    assert det.known(val_scores).mean() >= 0.95
    assert det.known(val_scores).mean() < 1.0  # the threshold is a real quantile, not "accept all"
    far = np.random.default_rng(2).normal(size=(50, x.shape[1])).astype(np.float32) * 3 + 25.0
    far_scores = det.score(torch.from_numpy(far), torch.zeros(50, 1)).numpy()
    assert (~det.known(far_scores)).all()
    # Between the two class means is unlike both classes for Mahalanobis (class-conditional means).
    if method == "mahalanobis":
        mid = np.zeros((1, x.shape[1]), np.float32)
        assert det.score(torch.from_numpy(mid), torch.zeros(1, 1)).item() > np.median(val_scores)


def test_mahalanobis_distance_is_the_textbook_formula() -> None:
    x, y = _two_blobs(300, 4)
    det = fit_detector("mahalanobis", x, y, num_classes=2)
    xs = x.astype(np.float64)
    means = np.stack([xs[y == c].mean(0) for c in (0, 1)])
    cov, _ = sk_ledoit_wolf(xs - means[y], assume_centered=True)
    prec = np.linalg.inv(cov)
    q = xs[:5]
    expected = np.min([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], axis=0)
    got = det.score(torch.from_numpy(x[:5]), torch.zeros(5, 1)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_energy_score_uses_logits_and_threshold_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    det = fit_detector("energy", np.zeros((4, 2)), np.array([0, 1, 0, 1]), 2)
    confident, unsure = torch.tensor([[8.0]]), torch.tensor([[0.0]])
    assert det.score(torch.zeros(1, 2), confident).item() < det.score(torch.zeros(1, 2), unsure).item()
    calibrate_threshold(det, np.array([-3.0, -2.0, -1.0]), accept_rate=2 / 3)
    assert det.threshold == -2.0
    path = tmp_path / "d.pt"
    torch.save(fit_detector("mahalanobis", *_two_blobs(), 2).to_state(), path)
    state = torch.load(path, weights_only=True)  # tensors, floats and strings only
    assert Detector.from_state(state).method == "mahalanobis"


def test_threshold_without_validation_rows_accepts_everything() -> None:
    det = calibrate_threshold(fit_detector("knn", *_two_blobs(), 2), np.zeros(0), 0.99)
    assert det.threshold == math.inf


def test_flat_images_are_blank_or_single_colour_only() -> None:
    blank = np.zeros((2, 8, 8, 3), np.uint8)
    blank[1] = (200, 30, 90)
    busy = np.stack([synthetic_image(0, 8), synthetic_image(1, 8)])
    assert flat_images(blank).all()
    assert not flat_images(busy).any()


# ------------------------------------------------------------------------------- calibration
def test_temperature_fit_softens_overconfident_logits_and_lowers_nll() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    true_logit = rng.normal(0, 2, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    logits = torch.from_numpy(3.0 * true_logit[:, None]).float()  # 3x too confident
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.15)
    assert nll(logits, torch.from_numpy(y), t) < nll(logits, torch.from_numpy(y), 1.0)
    assert fit_temperature(np.zeros((0, 1)), np.zeros(0)) == 1.0


def test_temper_probabilities_equals_scaling_logits() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    expected = torch.softmax(z / 2.5, dim=1).numpy()
    got = temper_probabilities(torch.softmax(z, dim=1).numpy(), 2.5)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ece_by_hand() -> None:
    # Two bins used: 0.9 confident (4 images, 3 right) and 0.6 confident (2 images, 1 right).
    probs = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 0])
    ece = expected_calibration_error(labels, probs, bins=10)
    assert ece == pytest.approx((4 * abs(0.75 - 0.9) + 2 * abs(0.5 - 0.6)) / 6)
    conf, acc, counts = reliability_bins(labels, probs, bins=10)
    assert counts.sum() == 6 and counts[8] == 4 and counts[5] == 2
    assert np.isnan(acc[0]) and acc[8] == pytest.approx(0.75)
    assert expected_calibration_error(np.array([1]), np.array([[0.0, 1.0]])) == 0.0


# ------------------------------------------------------------------------------- a tiny trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed CNN trained for 2 epochs on generated shards: carries detector, temperature, settings."""
    root = tmp_path_factory.mktemp("conf")
    make_shards(root / "shards", size=SIZE)
    code = cli_main(["train", "--data", str(root / "shards"), "--output", str(root / "run"), "--epochs", "2",
                     "--threads", "1"])
    assert code == 0
    return root / "run"


def _pets(n: int, seed: int = 500) -> list[np.ndarray]:
    return [synthetic_image(i % 2, SIZE, seed=seed + i) for i in range(n)]


def test_training_records_detector_temperature_and_inference_settings(trained: Path) -> None:
    state = load_checkpoint(trained / "best.pt")
    assert state[ckpt.CKPT_OOD]["method"] == "knn"
    assert state[ckpt.CKPT_OOD]["accept_rate"] == TrainConfig.accept_rate
    assert math.isfinite(state[ckpt.CKPT_OOD]["threshold"])
    assert state[ckpt.CKPT_TEMPERATURE] > 0
    assert state[ckpt.CKPT_INFERENCE] == {"tta": False, "reject": True, "calibrate": True}
    assert state[ckpt.CKPT_METRICS]["val_accepted"] >= TrainConfig.accept_rate


def test_trained_run_rejects_generated_non_pets_more_than_pets(trained: Path) -> None:
    pred = Predictor.from_run(trained)
    # PNG: lossless like the shards; JPEG noise at 32 px moves this toy model's features off its training set.
    pets = pred.answer(np.stack([pred.decode(png_bytes(a)) for a in _pets(60)]))
    others = pred.answer(np.stack([pred.decode(png_bytes(a)) for _, a in generated_images(5, 64)]))
    pet_rejected, other_rejected = (~pets.known).mean(), (~others.known).mean()
    assert other_rejected > pet_rejected
    assert other_rejected >= 0.9 and pet_rejected <= 0.2
    assert np.all(others.scores[~others.known] > pred.detector.threshold)  # type: ignore[union-attr]


@pytest.mark.parametrize("image", [
    Image.new("RGB", (300, 200), (255, 255, 255)),   # blank
    Image.new("RGB", (64, 64), (30, 120, 200)),       # one colour
    Image.new("L", (40, 40), 0),                      # black greyscale
    Image.fromarray(synthetic_image(1, 4)),           # tiny (4 x 4, not flat)
    Image.new("RGB", (1, 1), (10, 200, 10)),          # one pixel
], ids=["blank", "single_colour", "black_grey", "tiny", "one_pixel"])
def test_blank_single_colour_and_tiny_images_are_unknown(trained: Path, image: Image.Image) -> None:
    pred = Predictor.from_run(trained)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    a = pred.answer(pred.decode(buf.getvalue())[None])[0]
    assert a.label(pred.classes) == UNKNOWN
    assert a.probs.shape == (2,) and a.probs.sum() == pytest.approx(1.0, abs=1e-5)


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    for i, a in enumerate(_pets(4)):
        (folder / f"pet{i}.png").write_bytes(png_bytes(a))
    (folder / "blank.png").write_bytes(png_bytes(np.full((50, 50, 3), 255, np.uint8)))
    (folder / "text.png").write_bytes(png_bytes(generated_images(1, 64, seed=3)[6][1]))


def test_predict_csv_has_unknown_and_a_score_column(trained: Path, tmp_path: Path) -> None:
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out.csv"
    assert cli_main(["predict", str(tmp_path / "in"), "--run", str(trained), "--output", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert list(next(csv.reader(out.open()))) == ["path", "label", "probability", "error", "ood_score",
                                                  "looks_like"]
    assert {r["looks_like"] for r in rows.values()} == {""}  # a scratch-trained run names no concepts
    assert rows["blank.png"]["label"] == UNKNOWN and rows["text.png"]["label"] == UNKNOWN
    assert float(rows["blank.png"]["probability"]) >= 0.5  # the top class's probability is kept
    assert sum(rows[f"pet{i}.png"]["label"] in ("Cat", "Dog") for i in range(4)) >= 3
    assert all(float(r["ood_score"]) >= 0 for r in rows.values())
    # --no-reject switches it off: every image gets a class (the score is still reported).
    assert cli_main(["predict", str(tmp_path / "in"), "--run", str(trained), "--output", str(out),
                     "--no-reject"]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert {r["label"] for r in rows.values()} <= {"Cat", "Dog"}
    assert rows["blank.png"]["ood_score"] != ""


def test_serve_answers_unknown_with_probabilities(trained: Path) -> None:
    blank = png_bytes(np.full((80, 80, 3), 128, np.uint8))
    pet = png_bytes(_pets(1)[0])
    with TestClient(create_app(ServeConfig(run=str(trained)))) as client:
        r = client.post("/predict", files={"file": ("blank.png", blank, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == UNKNOWN
        assert set(body["probabilities"]) == {"Cat", "Dog"}
        assert body["probability"] == pytest.approx(max(body["probabilities"].values()))
        assert isinstance(body["ood_score"], float)
        r = client.post("/predict", files={"file": ("pet.png", pet, "image/png")})
        assert r.json()["label"] in ("Cat", "Dog")
        batch = client.post("/predict/batch", files=[("files", ("a.png", blank, "image/png")),
                                                     ("files", ("b.png", pet, "image/png"))]).json()
        assert [b["label"] == UNKNOWN for b in batch] == [True, False]
        model = client.get("/model").json()
        assert model["inference"]["reject"] is True and model["inference"]["detector"] == "knn"
    with TestClient(create_app(ServeConfig(run=str(trained), reject=False))) as client:
        r = client.post("/predict", files={"file": ("blank.png", blank, "image/png")})
        assert r.json()["label"] in ("Cat", "Dog")


def test_a_checkpoint_without_detector_answers_every_image_with_a_class_and_a_note(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "old", size=SIZE)
    # torch: this run has no shards to calibrate the default int8 engine with (its own one-line note)
    pred = Predictor.from_run(run, backend="torch")
    blank = pred.decode(png_bytes(np.zeros((20, 20, 3), np.uint8)))
    a = pred.answer(blank[None])
    pred.answer(blank[None])
    err = capsys.readouterr().err
    assert "no out-of-distribution detector" in err and len(err.strip().splitlines()) == 1  # once
    assert a.known.all() and np.isnan(a.scores).all()  # answers as before: a class, no score
    np.testing.assert_allclose(a.probs, pred.predict_arrays(blank[None]))
    assert pred.settings.tta is False and pred.temperature == 1.0
    Predictor.from_run(run, reject=False, backend="torch").answer(blank[None])
    assert capsys.readouterr().err == ""  # rejection explicitly off: nothing to note


def test_flags_override_the_runs_recorded_settings(trained: Path) -> None:
    x = np.stack([synthetic_image(i % 2, SIZE, seed=i) for i in range(6)])
    recorded = Predictor.from_run(trained)
    settings = recorded.settings
    assert (settings.tta, settings.reject, settings.calibrate) == (False, True, True)
    flipped = Predictor.from_run(trained, tta=True, calibrate=False)
    raw = recorded.answer(x, temperature=1.0).probs
    mirrored = Predictor.from_run(trained, calibrate=False).answer(x[:, :, ::-1].copy()).probs
    np.testing.assert_allclose(flipped.answer(x).probs, (raw + mirrored) / 2, atol=1e-5)
    calibrated = recorded.answer(x).probs
    np.testing.assert_allclose(calibrated, temper_probabilities(raw, recorded.temperature), atol=1e-5)


def test_evaluate_reports_ece_reliability_and_rejection(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--run", str(trained), "--output", str(out), "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ece", "ece_uncalibrated", "temperature", "unknown_share", "accuracy_accepted"):
        assert key in metrics
    assert metrics["tta"] is False and metrics["reject"] is True
    assert 0.0 <= metrics["unknown_share"] <= 0.1
    png = out / "reliability.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "Reliability diagram" in html and "ECE, calibrated (before: " in html
    assert "Accuracy among accepted" in html
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith("ood_score,unknown")


def test_onnx_backend_applies_tta_temperature_and_the_detector(trained: Path, tmp_path: Path) -> None:
    import shutil

    from catsdogs.serve.backends import load_backend

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    backend = load_backend(ServeConfig(run=str(run), backend="onnx", tta=True))
    x = np.stack([np.full((SIZE, SIZE, 3), 128, np.uint8), synthetic_image(1, SIZE, seed=3)])
    a = backend.answer(x)
    want = Predictor.from_run(run, tta=True).answer(x)
    assert not a.known[0]  # the flat image is "unknown" on this engine too
    np.testing.assert_array_equal(a.known, want.known)
    np.testing.assert_allclose(a.probs, want.probs, atol=1e-4)
    np.testing.assert_allclose(a.scores, want.scores, atol=1e-3)
