"""Open-world answers: the ImageNet-concepts detector, "looks like", and one answer on every path.

The detector math runs on made-up heads; the end-to-end tests train a frozen EfficientNet-Lite0 on real
photos that ship with scikit-image (crops of a tabby cat and of an espresso), so they run without the
PetImages data, and a rocket is the photo that is neither.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import load_checkpoint, save_checkpoint
from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig, TrainConfig, build_config
from catsdogs.errors import CheckpointError, ConfigError
from catsdogs.infer.predictor import UNKNOWN, Predictor, format_looks_like
from catsdogs.models.imagenet import NUM_CLASSES, imagenet_names
from catsdogs.models.ood import (
    AUTO,
    CONCEPTS,
    Detector,
    fit_detector,
    owned_concepts,
    resolve_method,
    surprise,
)
from catsdogs.models.registry import PRETRAINED_MEAN, PRETRAINED_STD
from catsdogs.models.taxonomy import kin_mask, node_kind, node_name, owned_node
from catsdogs.models.transforms import normalize
from catsdogs.serve.app import create_app
from catsdogs.shards.manifest import load_manifest
from tests.conftest import PHOTO_SIZE
from tests.fixtures import REAL_DATA, photo_variant
from tests.ood_set import png_bytes, sample_photos

CHECK_SETS = (REAL_DATA.parent / "pets-other", REAL_DATA.parent / "not-pets")
"""The check-only folders beside the training data: nothing may read them while a run is fitted."""


# ------------------------------------------------------------------------------ detector math
def _heads(members: int = 2, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(members, NUM_CLASSES, d, generator=g), torch.zeros(members, NUM_CLASSES)


def test_each_class_owns_the_smallest_wordnet_node_that_most_of_its_photos_fall_under() -> None:
    names = imagenet_names()
    tabby, siamese, pug, beagle, laptop = (names.index(n) for n in ("tabby", "Siamese cat", "pug", "beagle",
                                                                      "laptop"))
    probs = torch.zeros(20, NUM_CLASSES)
    # class 0: 7 tabbies, 2 Siamese, 1 laptop (a cat on a keyboard); class 1: 5 pugs, 5 beagles.
    for row, concept in enumerate([tabby] * 7 + [siamese, siamese, laptop] + [pug] * 5 + [beagle] * 5):
        probs[row, concept] = 1.0
    labels = torch.tensor([0] * 10 + [1] * 10)
    nodes, owned = owned_concepts(probs.argmax(dim=1), labels, 2, share=0.8)
    assert [node_name(n) for n in nodes] == ["domestic cat", "dog"]
    assert owned[0, tabby] and owned[0, siamese] and not owned[0, laptop]  # the background is not owned
    assert owned[1, pug] and owned[1, beagle] and int(owned[1].sum()) == 118  # every breed, not just these
    assert node_name(owned_node(torch.tensor([tabby] * 9 + [laptop]), 0.95)) != "domestic cat"  # 90 % < 95 %


def _concept_detector(n: int = 400, seed: int = 0) -> tuple[Detector, torch.Tensor, np.ndarray]:
    """Concepts detector on random 8-d features with random 2-member heads, calibrated on val rows."""
    w, b = _heads(seed=seed)
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 8)).astype(np.float32)
    labels = np.arange(n) % 2
    det = fit_detector(CONCEPTS, feats, labels, 2, imagenet=(w, b))
    val = torch.from_numpy(rng.normal(size=(200, 8)).astype(np.float32))
    det.calibrate(val, torch.zeros(200, 1), 0.95)
    return det, val, labels


def test_concepts_score_adds_the_surprise_of_what_it_shows_and_of_how_it_looks() -> None:
    det, val, _ = _concept_detector()
    p = det.imagenet_probabilities(val)
    owned = det.params["owned"].any(dim=0)
    what = -(p.double()[:, owned].sum(dim=1) + 1e-12).log().float()  # mass under the owned nodes
    torch.testing.assert_close(det.what_score(p), what)
    # The ensemble's members vote equally: the mean of each block's own softmax.
    w = det.params["imagenet_weight"].float()
    mine = (torch.softmax(val[:, :4] @ w[0].T, 1) + torch.softmax(val[:, 4:] @ w[1].T, 1)) / 2
    torch.testing.assert_close(p, mine, atol=1e-5, rtol=1e-4)
    scores = det.score(val, torch.zeros(200, 1))

    def surprise(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # -log conformal p-value
        at_least = (ref[None, :] >= x[:, None]).sum(dim=1)
        return -((1.0 + at_least) / (len(ref) + 1.0)).log()
    by_hand = surprise(det.params["val_what"], what) + surprise(det.params["val_look"], det._knn(val, None))
    torch.testing.assert_close(scores, by_hand.float())
    assert 0.0 <= float(scores.min()) and float(scores.max()) <= 2 * np.log(201) + 1e-4
    assert det.known(scores.numpy()).mean() >= 0.95  # the threshold accepts the asked share of val
    assert det.known(scores.numpy()).mean() < 1.0


def test_a_confident_concept_no_class_owns_is_unknown_even_when_it_looks_like_training() -> None:
    """A synthetic head where the concept is known: feature 0 is 'tabby', feature 1 'printer'."""
    names = imagenet_names()
    tabby, printer = names.index("tabby"), names.index("printer")
    w = torch.zeros(1, NUM_CLASSES, 3)
    w[0, tabby, 0], w[0, printer, 1] = 12.0, 12.0
    rng = np.random.default_rng(0)
    cats = np.c_[np.ones(300), rng.normal(0, 0.05, 300), rng.normal(1, 0.05, 300)].astype(np.float32)
    det = fit_detector(CONCEPTS, cats, np.zeros(300, int), 1, imagenet=(w, torch.zeros(1, NUM_CLASSES)))
    assert [node_name(n) for n in det.owned_nodes] == ["tabby"]  # every training photo is a tabby
    val = torch.from_numpy(np.c_[np.ones(200), rng.normal(0, 0.05, 200), rng.normal(1, 0.05, 200)]
                           .astype(np.float32))
    det.calibrate(val, torch.zeros(200, 1), 0.99)
    # A printer that looks like the training photos: its features are a cat's (feature 2) bar the concept.
    printer_photo = torch.tensor([[0.0, 1.0, 1.0]])
    assert float(det._knn(printer_photo, None)) < 0.5  # the look alone would let it through
    assert not det.known(det.score(printer_photo, torch.zeros(1, 1)).numpy())[0]
    assert det.known(det.score(val[:1], torch.zeros(1, 1)).numpy())[0]
    (said,) = det.looks_like(printer_photo, np.array([False]))
    assert said[0][0] == "printer"
    # Answered anyway (--no-reject): the answer still names the strong concept its class does not own.
    both = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # tabby and printer alike; a plain cat
    mixed, cat = det.looks_like(both, np.array([True, True]))
    assert [c for c, _ in mixed] == ["printer"] and mixed[0][1] == pytest.approx(0.5, abs=0.01)
    assert cat == []  # an owned concept is the answer itself, not something it looks like


def test_kin_are_the_concepts_of_the_classes_kind_that_none_of_them_owns() -> None:
    names = imagenet_names()
    dog, cat = "n02084071", "n02121808"  # "dog", "domestic cat"
    kin = kin_mask((dog, cat))
    assert node_kind(dog) == node_kind(cat) == "noun.animal" and node_kind("n04004767") == "noun.artifact"
    assert kin[names.index("hamster")] and kin[names.index("badger")] and kin[names.index("lion")]
    assert not kin[names.index("printer")] and not kin[names.index("tabby")] and not kin[names.index("pug")]
    assert int(kin.sum()) == 398 - 118 - 5  # ImageNet's animals bar the dog breeds and the domestic cats


def test_a_photo_leaning_to_another_animal_is_unknown_though_its_own_mass_is_ordinary() -> None:
    """Feature 0 is 'tabby', feature 1 'badger', feature 2 'birdhouse' (the stray mass of a cat in a box);
    30 more features carry the look, which the heads ignore, so both photos below look like any cat."""
    names = imagenet_names()
    tabby, badger, box = names.index("tabby"), names.index("badger"), names.index("birdhouse")
    look_dims = 30
    w = torch.zeros(1, NUM_CLASSES, 3 + look_dims)
    w[0, tabby, 0], w[0, badger, 1], w[0, box, 2] = 12.0, 12.0, 12.0
    b = torch.full((1, NUM_CLASSES), -1e4)  # the other 997 concepts get no mass at all
    b[0, [tabby, badger, box]] = 0.0
    rng = np.random.default_rng(0)

    def photos(stray: np.ndarray) -> np.ndarray:
        """Tabbies whose stray mass goes where ``stray`` (n, 2) says, each with a look of its own."""
        n = len(stray)
        return np.c_[np.ones(n), stray, rng.normal(size=(n, look_dims))].astype(np.float32)

    def cats(n: int) -> np.ndarray:  # some in boxes: their stray mass is not an animal's
        return photos(np.c_[np.zeros(n), rng.uniform(0, 1.1, n)])

    det = fit_detector(CONCEPTS, cats(400), np.zeros(400, int), 1, imagenet=(w, b))
    assert [node_name(n) for n in det.owned_nodes] == ["tabby"] and bool(det.params["kin"][badger])
    det.calibrate(torch.from_numpy(cats(300)), torch.zeros(300, 1), 0.95)
    # As much owned mass as a boxed cat; but the rest of it is a badger's.
    racoonish, boxed = torch.from_numpy(photos(np.array([[1.0, 0.0], [0.0, 1.0]]))).split(1)
    both = torch.cat([racoonish, boxed])
    what = det.what_score(det.imagenet_probabilities(both))
    assert float(what[0]) == pytest.approx(float(what[1]), abs=0.05)
    assert det.known(det.score(both, torch.zeros(2, 1)).numpy()).tolist() == [False, True]
    # A detector fitted before the kin question (its checkpoint has no kin, no k) answers as it did, and
    # it lets the badger-like photo through: the kin question is what refuses it.
    state = det.to_state()
    state.pop("knn_k")
    for key in ("kin", "val_kin"):
        state["params"].pop(key)
    old = Detector.from_state(state)
    assert old.knn_k == 10 and "kin" not in old.params
    p = old.imagenet_probabilities(both)
    by_hand = surprise(old.params["val_what"], old.what_score(p)) + surprise(old.params["val_look"],
                                                                            old._knn(both, None))
    torch.testing.assert_close(old.score(both, torch.zeros(2, 1)), by_hand)
    old.calibrate(torch.from_numpy(cats(300)), torch.zeros(300, 1), 0.95)
    assert old.known(old.score(both, torch.zeros(2, 1)).numpy()).tolist() == [True, True]


def test_looks_like_names_the_top_concepts_and_drops_faint_ones() -> None:
    w = torch.zeros(1, NUM_CLASSES, 3)
    w[0, 10, 0], w[0, 20, 0] = 10.0, 9.0  # feature 0 -> classes 10 and 20 (e^10 : e^9)
    det = fit_detector("knn", np.eye(3, dtype=np.float32), np.array([0, 1, 0]), 2,
                       imagenet=(w, torch.zeros(1, NUM_CLASSES)))
    (first,) = det.looks_like(torch.tensor([[1.0, 0.0, 0.0]]))
    names = imagenet_names()
    assert [n for n, _ in first] == [names[10], names[20]]  # the 998 others are far below 5 %
    assert first[0][1] == pytest.approx(np.e / (np.e + 1 + 998 * np.exp(-9)), rel=1e-2)
    assert format_looks_like(first) == f"{names[10]} 71 %, {names[20]} 26 %"
    scratch = fit_detector("knn", np.eye(3, dtype=np.float32), np.array([0, 1, 0]), 2)
    assert scratch.looks_like(torch.ones(2, 3)) == [[], []]  # no ImageNet weights: nothing is named


def test_detector_state_round_trip(tmp_path: Path) -> None:
    w, b = _heads()
    det = fit_detector(CONCEPTS, np.ones((4, 8), np.float32), np.array([0, 1, 0, 1]), 2, imagenet=(w, b))
    det.calibrate(torch.ones(3, 8), torch.zeros(3, 1), 0.5)
    torch.save(det.to_state(), tmp_path / "d.pt")
    back = Detector.from_state(torch.load(tmp_path / "d.pt", weights_only=True))
    assert (back.method, back.threshold, back.owned_nodes) == (CONCEPTS, det.threshold, det.owned_nodes)
    torch.testing.assert_close(back.score(torch.ones(3, 8), torch.zeros(3, 1)),
                               det.score(torch.ones(3, 8), torch.zeros(3, 1)))


def test_auto_method_and_refusals() -> None:
    assert resolve_method(AUTO, True) == CONCEPTS and resolve_method(AUTO, False) == "knn"
    assert resolve_method("mahalanobis", True) == "mahalanobis"
    with pytest.raises(ValueError):
        resolve_method(CONCEPTS, False)
    with pytest.raises(ConfigError, match="--ood-method concepts needs a model with ImageNet weights"):
        build_config(TrainConfig, {"model": "seed", "ood_method": CONCEPTS})
    assert build_config(TrainConfig, {"model": "effnet_lite0", "ood_method": CONCEPTS}).ood_method == CONCEPTS


# ------------------------------------------------------------------------------ a trained photo run
def _photo(name: str) -> bytes:
    return png_bytes(dict(sample_photos())[name])


CAT_SEED = 123457
"""A typical crop of the fixture's cat, for the answer's plumbing. The fixture's 40 validation photos set a
coarse threshold (its own test split is answered at about 88 %), so an arbitrary crop may be "neither"."""


def test_operating_point_is_fitted_on_validation_only(photo_run: tuple[Path, Path, list[str]]) -> None:
    run, shards, opened = photo_run
    state = load_checkpoint(run / "best.pt")
    det = Detector.from_state(state[ckpt.CKPT_OOD])
    assert det.method == CONCEPTS and det.accept_rate == TrainConfig.accept_rate
    # Nothing held out was read while fitting: not the test split, not a check set.
    test_files = {str(p.resolve()) for p in (shards / "test").iterdir()}
    assert not [p for p in opened if str(Path(p).resolve()) in test_files]
    assert not [p for p in opened if any(p.startswith(str(c)) for c in CHECK_SETS)]
    assert any("/val/" in p for p in opened)  # ...and validation was (the hook does see the reads)
    # The threshold is the accept-rate quantile of the validation scores, recomputed here.
    pred = Predictor.from_run(run)
    manifest = load_manifest(shards)
    from catsdogs.shards.reader import iter_batches

    feats = [pred.feature_engine.features(normalize(torch.from_numpy(rows), pred.mean, pred.std))
             for _pos, _start, rows, _y in iter_batches(shards, manifest, "val", 64)]
    val = torch.cat(feats)
    # (the leave-one-out validation scores, Detector.calibrate: no validation photo counts itself)
    again = Detector.from_state(det.to_state()).calibrate(val, torch.zeros(len(val), 1), det.accept_rate)
    assert det.threshold == pytest.approx(again.threshold, abs=1e-4)


def test_rocket_is_unknown_and_says_what_it_looks_like_in_csv_json_and_serve(
        photo_run: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    run = photo_run[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "rocket.png").write_bytes(_photo("rocket"))
    (folder / "cat.png").write_bytes(png_bytes(photo_variant(0, 300, seed=CAT_SEED)))
    (folder / "blank.png").write_bytes(png_bytes(np.full((64, 64, 3), 200, np.uint8)))
    out = tmp_path / "p.csv"
    assert cli_main(["predict", str(folder), "--run", str(run), "--output", str(out),
                     "--backend", "torch"]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["rocket.png"]["label"] == UNKNOWN
    assert rows["rocket.png"]["looks_like"].startswith("drilling platform ")
    assert rows["cat.png"]["label"] == "Cat" and rows["cat.png"]["looks_like"] == ""
    assert rows["blank.png"]["label"] == UNKNOWN and rows["blank.png"]["looks_like"] == ""  # flat: no guess
    out_json = tmp_path / "p.json"
    assert cli_main(["predict", str(folder), "--run", str(run), "--output", str(out_json),
                     "--backend", "torch"]) == 0
    rocket = next(r for r in json.loads(out_json.read_text()) if r["path"].endswith("rocket.png"))
    assert rocket["looks_like"][0]["concept"] == "drilling platform"
    assert 0.5 < rocket["looks_like"][0]["probability"] <= 1.0
    with TestClient(create_app(ServeConfig(run=str(run), backend="torch"))) as client:
        body = client.post("/predict", files={"file": ("rocket.png", _photo("rocket"), "image/png")}).json()
        assert body["label"] == UNKNOWN and body["looks_like"] == rocket["looks_like"]
        cat = client.post("/predict", files={"file": ("cat.png", (folder / "cat.png").read_bytes(),
                                                       "image/png")}).json()
        assert cat["label"] == "Cat" and cat["looks_like"] == []
        assert client.get("/model").json()["inference"]["looks_like"] is True


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data not found at {REAL_DATA}")
def test_real_photo_of_a_cat_is_answered_and_real_cats_pass_the_concepts() -> None:
    """The concepts of real PetImages photos are cat and dog breeds (checked on 40 photos, no fitting)."""
    from catsdogs.models.effnet import efficientnet_lite
    from catsdogs.models.imagenet import imagenet_heads, imagenet_probabilities
    from catsdogs.models.transforms import load_image

    model = efficientnet_lite("lite0", 1000, 224).eval()
    w, b = imagenet_heads(("lite0",))
    files = sorted((REAL_DATA / "Cat").glob("*.jpg"))[:20] + sorted((REAL_DATA / "Dog").glob("*.jpg"))[:20]
    x = np.stack([load_image(f.read_bytes(), 224, "stretch") for f in files])
    with torch.inference_mode():
        p = imagenet_probabilities(model.features(normalize(torch.from_numpy(x), PRETRAINED_MEAN,
                                                            PRETRAINED_STD)), w, b)
    cat, dog = p[:, 281:286].sum(1), p[:, 151:269].sum(1)
    assert (cat[:20] > dog[:20]).float().mean() >= 0.8 and (dog[20:] > cat[20:]).float().mean() >= 0.8


def test_a_fine_tuned_run_gets_the_concepts_detector_too(photo_run: tuple[Path, Path, list[str]],
                                                         tmp_path: Path) -> None:
    """The loop (fine-tuning the backbone) ends in the same fit: ImageNet heads on its own features."""
    shards = photo_run[1]
    run = tmp_path / "tuned"
    assert cli_main(["train", "--data", str(shards), "--output", str(run), "--model", "effnet_lite0",
                     "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--lr", "1e-4",
                     "--threads", "1"]) == 0
    det = Detector.from_state(load_checkpoint(run / "best.pt")[ckpt.CKPT_OOD])
    assert det.method == CONCEPTS and det.has_concepts
    pred = Predictor.from_run(run)
    a = pred.answer(np.stack([pred.decode(_photo("rocket"))]))[0]
    assert a.label(pred.classes) == UNKNOWN and a.looks_like[0][0] == "drilling platform"


def test_pyfunc_and_cli_agree_on_a_rocket_and_a_cat(photo_run: tuple[Path, Path, list[str]],
                                                    tmp_path: Path) -> None:
    """The MLflow pyfunc answers like ``catsdogs predict``: "unknown" and what it looks like included."""
    import mlflow.pyfunc
    import pandas as pd

    from catsdogs.track.pyfunc import save_pyfunc

    run = photo_run[0]
    folder = tmp_path / "in"
    folder.mkdir()
    photos = {"rocket.png": _photo("rocket"), "cat.png": png_bytes(photo_variant(0, 300, seed=CAT_SEED))}
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "cli.csv"
    assert cli_main(["predict", str(folder), "--run", str(run), "--output", str(out),
                     "--backend", "torch"]) == 0
    cli = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    model = mlflow.pyfunc.load_model(str(save_pyfunc(run, run / "best.pt", tmp_path / "pyfunc")))
    got = model.predict(pd.DataFrame({"image": list(photos.values())}))
    for i, name in enumerate(photos):
        assert got["label"][i] == cli[name]["label"], name
        assert got["looks_like"][i] == cli[name]["looks_like"]
        assert float(got["probability"][i]) == pytest.approx(float(cli[name]["probability"]), abs=1e-5)
    assert list(got["label"]) == [UNKNOWN, "Cat"]
    assert got["looks_like"][0].startswith("drilling platform")


def test_a_run_from_before_this_checkpoint_format_is_refused_in_one_line_that_says_how_to_recreate_it(
        photo_run: tuple[Path, Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run trained before the WordNet detector (format 1, or none) never silently answers differently."""
    state = load_checkpoint(photo_run[0] / "best.pt")
    photo = tmp_path / "cat.png"
    photo.write_bytes(png_bytes(photo_variant(0, PHOTO_SIZE, seed=5)))
    for found, said in ((None, "by catsdogs before 0.2"), (1, "in format 1")):
        old = tmp_path / f"old-{found}"
        old.mkdir()
        if found is None:
            state.pop(ckpt.CKPT_FORMAT)
        else:
            state[ckpt.CKPT_FORMAT] = found
        save_checkpoint(old / "best.pt", state)
        with pytest.raises(CheckpointError, match="re-create the run with 'catsdogs train'"):
            Predictor.from_run(old)
        assert cli_main(["predict", str(photo), "--run", str(old)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "--overwrite" in err[0]
