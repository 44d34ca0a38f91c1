"""Tests of ``catsdogs evaluate``: metric correctness, streamed reading, PNG outputs, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catsdogs import cli
from catsdogs.evaluate import plots
from catsdogs.evaluate.command import OUTPUT_FILES, Predictions
from catsdogs.evaluate.metrics import compute_metrics, most_confident_mistakes, roc_curves
from catsdogs.rundir import read_history
from catsdogs.shards.manifest import load_manifest
from catsdogs.shards.reader import iter_batches
from tests.fixtures import make_run, make_shards

# Hand-made binary set: p(Dog) for 4 cats and 4 dogs; threshold 0.5 gives one error per class.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P_DOG = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
PROBS = np.stack([1 - P_DOG, P_DOG], axis=1)


def assert_png(path: Path, min_side: int = 200, max_side: int = 2500) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert min_side <= w <= max_side and min_side <= h <= max_side, (path, w, h)


def test_binary_metrics_match_hand_computation() -> None:
    m, text = compute_metrics(LABELS, PROBS, ["Cat", "Dog"])
    assert m["n"] == 8 and m["errors"] == 2
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    # Of the 16 (dog, cat) pairs only (0.4 vs 0.6) is ranked wrongly: AUC = 15/16.
    assert m["roc_auc"] == pytest.approx(15 / 16)
    for name in ("Cat", "Dog"):
        assert m["per_class"][name]["precision"] == pytest.approx(0.75)
        assert m["per_class"][name]["recall"] == pytest.approx(0.75)
        assert m["per_class"][name]["support"] == 4
    expected_ll = -np.mean(np.log(np.where(LABELS == 1, P_DOG, 1 - P_DOG)))
    assert m["log_loss"] == pytest.approx(expected_ll, rel=1e-6)
    assert "Cat" in text and "0.7500" in text
    json.dumps(m)  # JSON-ready


def test_multiclass_auc_is_macro_one_vs_rest() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.8 + 0.2 / 3  # perfect ranking for every class
    m, _ = compute_metrics(labels, probs, ["a", "b", "c"])
    assert m["roc_auc"] == pytest.approx(1.0)
    assert m["accuracy"] == 1.0 and m["errors"] == 0
    assert len(roc_curves(labels, probs, ["a", "b", "c"])) == 3
    # Swap the scores of classes 0 and 1: those two become perfectly wrong (AUC 0), class 2 stays 1.
    m2, _ = compute_metrics(labels, probs[:, [1, 0, 2]], ["a", "b", "c"])
    assert m2["roc_auc"] == pytest.approx((0.25 + 0.25 + 1.0) / 3)


def test_single_class_split_has_no_auc() -> None:
    labels = np.zeros(4, dtype=int)
    m, _ = compute_metrics(labels, PROBS[:4], ["Cat", "Dog"])
    assert m["roc_auc"] is None
    assert roc_curves(labels, PROBS[:4], ["Cat", "Dog"]) == {}


def test_most_confident_mistakes_orders_by_wrong_confidence() -> None:
    idx = most_confident_mistakes(LABELS, PROBS, 5)
    # Errors: row 3 (cat, p(dog)=0.6) and row 4 (dog, p(cat)=0.6): ties keep row order.
    assert idx.tolist() == [3, 4]
    assert most_confident_mistakes(LABELS, PROBS, 1).tolist() == [3]
    assert most_confident_mistakes(np.array([1]), np.array([[0.1, 0.9]]), 4).size == 0


def test_iter_batches_streams_bounded_writable_batches(tmp_path: Path) -> None:
    root = tmp_path / "s"
    make_shards(root, counts={"train": 4, "test": 60}, shard_rows=50)
    manifest = load_manifest(root)
    batches = list(iter_batches(root, manifest, "test", 16))
    assert [len(b[3]) for b in batches] == [16, 16, 16, 2, 10]  # never crosses a shard
    assert [(b[0], b[1]) for b in batches] == [(0, 0), (0, 16), (0, 32), (0, 48), (1, 0)]
    x = batches[0][2]
    assert x.dtype == np.uint8 and x.shape == (16, 32, 32, 3) and x.flags.writeable


def test_answers_keep_their_shard_and_row_when_a_shard_is_empty() -> None:
    """Per-shard parts in shard order (a local pass or Spark tasks): a shard without rows keeps its place."""
    def part(n: int, first: int) -> dict[str, np.ndarray]:
        probs = np.full((n, 2), 0.5, np.float32)
        return {"probs": probs, "raw": probs, "scores": np.zeros(n, np.float32), "known": np.ones(n, bool),
                "labels": np.arange(first, first + n, dtype=np.int64)}
    preds = Predictions.from_parts([part(2, 0), None, {}, part(3, 2)], classes=2)
    assert preds.labels.tolist() == [0, 1, 2, 3, 4]
    assert preds.shard.tolist() == [0, 0, 3, 3, 3] and preds.row.tolist() == [0, 1, 0, 1, 2]
    empty = Predictions.from_parts([None], classes=2)
    assert empty.probs.shape == (0, 2) and empty.known is not None and len(empty.known) == 0


def test_read_history_takes_last_row_per_epoch(tmp_path: Path) -> None:
    p = tmp_path / "metrics.csv"
    p.write_text("epoch,step,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
                 "1,5,0.9,0.5,,,0.001,1\n1,10,0.8,0.6,0.7,0.65,0.001,2\n2,20,0.5,0.8,0.6,0.7,0.001,3\n"
                 "2,2")  # a torn last line from a killed run
    h = read_history(p)
    assert h["epoch"] == [1.0, 2.0]
    assert h["train_loss"] == [0.8, 0.5] and h["val_acc"] == [0.65, 0.7]
    assert read_history(tmp_path / "missing.csv") == {"epoch": []}


def test_figures_are_valid_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    figs = {
        "cm.png": plots.confusion_matrix_figure(np.array([[3, 1], [1, 3]]), ["Cat", "Dog"]),
        "cm3.png": plots.confusion_matrix_figure(np.arange(9).reshape(3, 3), ["a", "b", "c"]),
        "roc.png": plots.roc_figure(roc_curves(LABELS, PROBS, ["Cat", "Dog"])),
        "roc_empty.png": plots.roc_figure({}),
        "hist.png": plots.history_figure([1, 2, 3], [0.9, 0.7, 0.5], [np.nan, 0.8, 0.6], "Loss", "Loss"),
        "hist_empty.png": plots.history_figure([], [], [], "Loss", "Loss"),
        "grid.png": plots.mistakes_figure(images, ["Cat"] * 5, ["Dog"] * 5, [0.9] * 5, 7, 100),
        "grid_none.png": plots.mistakes_figure(images[:0], [], [], [], 0, 100),
    }
    for name, fig in figs.items():
        assert_png(plots.save_figure(fig, tmp_path / name))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_evaluate_cli_writes_every_output(run_dir: Path, shards: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    assert cli.main(["evaluate", "--run", str(run_dir), "--batch-size", "16", "--threads", "1"]) == 0
    out = run_dir / "eval"
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert_png(png)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 60 and m["split"] == "test" and m["data"] == str(shards.resolve())
    assert m["model"]["name"] == "seed" and m["checkpoint"].endswith("best.pt")
    assert np.array(m["confusion_matrix"]).sum() == 60
    assert 0.0 <= m["accuracy"] <= 1.0 and m["roc_auc"] is not None
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"] == str(shards) and saved["output"] == str(out) and saved["batch_size"] == 16
    assert len((out / "predictions.csv").read_text().splitlines()) == 61
    stdout = capsys.readouterr().out
    assert "accuracy" in stdout and str((out / "report.html").resolve()) in stdout


def test_evaluate_other_split_and_out(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    assert cli.main(["evaluate", "--run", str(run_dir), "--split", "val", "--output", str(out), "--tta",
                     "--grid", "4"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "val" and m["tta"] is True and m["n"] == 60


def test_evaluate_three_classes(tmp_path: Path) -> None:
    classes = ("a", "b", "c")
    make_shards(tmp_path / "s3", counts={"train": 6, "test": 30}, classes=classes)
    run = make_run(tmp_path / "r3", classes=classes, data=str(tmp_path / "s3"))
    assert cli.main(["evaluate", "--run", str(run)]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["roc_auc_kind"] == "macro one-vs-rest" and len(m["confusion_matrix"]) == 3


def test_run_without_checkpoint_exits_2(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("best.pt", "last.pt"):
        (run_dir / name).unlink()
    assert cli.main(["evaluate", "--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "best.pt" in err and "Traceback" not in err
    assert not (run_dir / "eval").exists()


def test_missing_shards_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "--run", str(run_dir), "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_wrong_image_size_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_shards(tmp_path / "s48", counts={"test": 8}, size=48)
    assert cli.main(["evaluate", "--run", str(run_dir), "--data", str(tmp_path / "s48")]) == 2
    assert "--size 32" in capsys.readouterr().err
