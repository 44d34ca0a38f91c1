"""The Python API (``catsdogs.load``): the CLI's answers for paths, bytes, PIL images and arrays."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import catsdogs
from catsdogs.cli import main as cli
from catsdogs.errors import ConfigError
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Answer
from tests.fixtures import make_shards, synthetic_image
from tests.ood_set import png_bytes

SIZE = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed CNN trained one epoch on generated shards: it carries a detector, so it can say unknown."""
    root = tmp_path_factory.mktemp("api")
    make_shards(root / "shards", size=SIZE)
    assert cli(["train", "--data", str(root / "shards"), "--output", str(root / "run"), "--epochs", "1",
                "--threads", "1", "--batch-size", "32"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(4):  # PNG: lossless, so a PIL image or an array of it holds the very same pixels
        (folder / f"{i}.png").write_bytes(png_bytes(synthetic_image(i % 2, 40 + 8 * i, seed=900 + i)))
    (folder / "blank.png").write_bytes(png_bytes(np.full((40, 40, 3), 128, np.uint8)))
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_every_input_kind_gets_the_clis_answer_on_the_runs_default_engine(
        run: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    assert cli(["predict", str(photos), "--run", str(run), "--threads", "1", "--output", str(out)]) == 0
    want = {Path(r.pop("path")).name: r for r in json.loads(out.read_text())}

    model = catsdogs.load(run, threads=1)
    assert model.classes == ["Cat", "Dog"] and model.size == SIZE
    rows = model.predict(photos)  # a folder: a list, in predict's order
    assert isinstance(rows, list) and [Path(r.path).name for r in rows] == list(want)
    for r in rows:
        assert isinstance(r, Prediction)
        got = r.to_dict()
        assert Path(got.pop("path")).name in want and got == want[Path(r.path).name]
    assert want["blank.png"]["label"] == "unknown" and want["broken.jpg"]["error"] == "not_an_image"

    path = photos / "2.png"
    image = Image.open(path)
    same = [model.predict(path), model.predict(str(path)), model.predict(path.read_bytes()),
            model.predict(image), model.predict(np.asarray(image.convert("RGB")))]
    for p in same:  # batch 1 here, 6 in the CLI's batch: the engine's sums may differ in the last bits
        assert (p.label, p.error) == (want["2.png"]["label"], "")
        assert p.probabilities == pytest.approx(want["2.png"]["probabilities"], rel=1e-4, abs=1e-6)
        assert p.ood_score == pytest.approx(want["2.png"]["ood_score"], rel=1e-3, abs=1e-6)
    many = model.predict([path, path.read_bytes(), b"", np.asarray(image)[None].repeat(2, 0)[0]])
    assert [p.path for p in many] == [str(path), "<bytes 1>", "<bytes 2>", "<array 3>"]
    assert many[2].error == "empty_file" and many[2].label == "" and many[1].label == many[0].label


def test_explain_maps_the_heatmap_onto_the_photo(run: Path, photos: Path) -> None:
    model = catsdogs.load(run, backend="torch", threads=1)
    why = model.explain(photos / "3.png")
    height, width = Image.open(photos / "3.png").size[::-1]
    assert why.heatmap.shape == (height, width) and why.overlay.shape == (height, width, 3)
    assert 0.0 <= why.heatmap.min() and why.heatmap.max() <= 1.0 and why.label in model.classes
    assert model.explain(photos / "3.png", label="Cat").label == "Cat"
    assert model.explain([b"nope"])[0].error == "not_an_image"


def test_settings_are_the_clis_flags_and_errors_name_them(run: Path) -> None:
    with pytest.raises(ConfigError, match="--backend"):
        catsdogs.load(run, backend="tpu")
    with pytest.raises(ConfigError, match="unknown setting 'tta_flip'"):
        catsdogs.load(run, tta_flip=True)
    model = catsdogs.load(run, backend="torch", reject=False)
    blank = model.predict(np.full((40, 40, 3), 128, np.uint8))
    assert blank.label in model.classes  # --no-reject: every image gets a class
    assert model.engine == "torch" and "catsdogs.Model" in repr(model)


def test_a_field_the_predictor_adds_to_its_answer_reaches_every_entry_point() -> None:
    """Prediction wraps the predictor's Answer: looks_like in predict's JSON form, a new field as it is in
    the records (read it on ``answer``: Prediction forwards no attribute it does not define)."""
    @dataclasses.dataclass
    class Richer(Answer):
        nearest_photo: str = ""

    answer = Richer(np.array([0.2, 0.8], np.float32), 1.5, False, [("rocket", 0.7)], "train/12.png")
    p = Prediction(path="x.jpg", answer=answer, classes=("Cat", "Dog"))
    assert p.label == "unknown" and p.looks_like == [("rocket", 0.7)]
    assert p.answer is not None and p.answer.nearest_photo == "train/12.png"
    probs = {"Cat": pytest.approx(0.2), "Dog": pytest.approx(0.8)}
    assert p.to_dict() == {"path": "x.jpg", "label": "unknown", "probability": pytest.approx(0.8),
                           "error": "", "probabilities": probs, "ood_score": 1.5,
                           "looks_like": [{"concept": "rocket", "probability": 0.7}],
                           "nearest_photo": "train/12.png"}


def test_import_catsdogs_stays_cheap() -> None:
    code = ("import sys, catsdogs; catsdogs.__version__; "
            "print(sorted(m for m in ('torch', 'pyspark', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
