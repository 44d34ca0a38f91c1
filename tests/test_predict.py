"""``catsdogs predict``: inputs expansion, CSV/JSON rows with error rows, exit codes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from catsdogs.cli import main as cli_main
from catsdogs.errors import InputError
from catsdogs.infer.predict import CSV_COLUMNS, expand_paths, predict_files
from catsdogs.infer.predictor import Predictor

BAD_REASONS = {
    "Dog/empty.jpg": "empty_file",
    "Dog/truncated.jpg": "corrupt",
    "Dog/page.jpg": "not_an_image",
    "Dog/random.jpg": "not_an_image",
    "Dog/bomb.png": "decompression_bomb",
    "Dog/broken_link.jpg": "broken_link",
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def rel(rows: list[dict[str, str]], root: Path) -> dict[str, dict[str, str]]:
    return {str(Path(r["path"]).relative_to(root)): r for r in rows}


def test_folder_to_csv_has_one_row_per_image_and_error_rows(
        image_tree: tuple[Path, dict[str, list[str]]], run_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, files = image_tree
    out = tmp_path / "preds.csv"
    args = ["predict", str(root), "--run", str(run_dir), "--output", str(out), "--batch-size", "7"]
    assert cli_main(args) == 0
    with open(out, newline="") as fh:
        assert next(csv.reader(fh)) == list(CSV_COLUMNS)
    rows = rel(read_csv(out), root)
    assert set(rows) == set(files["good"]) | set(files["bad"])  # ignored files have no rows
    assert set(BAD_REASONS) == set(files["bad"])
    for path, reason in BAD_REASONS.items():
        assert rows[path]["error"] == reason
        assert rows[path]["label"] == "" and rows[path]["probability"] == ""
    for path in files["good"]:
        assert rows[path]["error"] == ""
        assert rows[path]["label"] in ("Cat", "Dog")
        assert 0.5 <= float(rows[path]["probability"]) <= 1.0
    err = capsys.readouterr().err
    assert f"{len(rows)} images, {len(BAD_REASONS)} errors" in err


def test_rows_match_the_predictor_and_json_output(image_tree: tuple[Path, dict[str, list[str]]],
                                                  run_dir: Path, tmp_path: Path) -> None:
    root, files = image_tree
    out = tmp_path / "preds.json"
    target = root / "Cat"
    # The same engine on both sides (engines agree with each other in tests/test_engines.py).
    assert cli_main(["predict", str(target), "--run", str(run_dir), "--output", str(out), "--backend",
                     "torch"]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len([f for f in files["good"] if f.startswith("Cat/")])
    predictor = Predictor.from_run(run_dir, backend="torch")
    for row in rows[:5]:
        probs = predictor.predict_arrays(np.stack([predictor.decode(Path(row["path"]).read_bytes())]))[0]
        assert row["label"] == predictor.classes[int(np.argmax(probs))]
        assert row["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["error"] == ""


def test_stdout_csv_and_quoted_globs(image_tree: tuple[Path, dict[str, list[str]]], run_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = image_tree
    pattern = str(root / "**" / "*.jpg")  # quoted: the shell did not expand it
    assert cli_main(["predict", pattern, str(root / "Cat" / "0.jpg"), "--run", str(run_dir)]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    got = {str(Path(r["path"]).relative_to(root)) for r in rows}
    expected = {str(p.relative_to(root)) for p in root.rglob("*.jpg")
                if not p.name.startswith(".")}
    assert got == expected  # recursive, hidden skipped, the repeated file listed once
    assert len(rows) == len(got)
    assert "errors" in captured.err


def test_expand_paths_rules(image_tree: tuple[Path, dict[str, list[str]]]) -> None:
    root, files = image_tree
    found = {str(p.relative_to(root)) for p in expand_paths([str(root)])}
    assert found == set(files["good"]) | set(files["bad"])
    assert not any("Thumbs" in f or ".hidden" in f or f.endswith(".txt") for f in found)
    with pytest.raises(InputError, match="matches no files"):
        expand_paths([str(root / "*.nothing")])
    with pytest.raises(InputError, match="does not exist"):
        expand_paths([str(root / "missing.jpg")])


def test_missing_path_exits_2_naming_it(run_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    assert cli_main(["predict", str(missing), "--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


def test_bad_output_extension_exits_2(image_tree: tuple[Path, dict[str, list[str]]], run_dir: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = image_tree
    assert cli_main(["predict", str(root), "--run", str(run_dir), "--output", str(tmp_path / "x.txt")]) == 2
    assert "--output" in capsys.readouterr().err


def test_predict_files_with_tta_and_one_worker(image_tree: tuple[Path, dict[str, list[str]]],
                                               run_dir: Path) -> None:
    root, files = image_tree
    paths = [root / f for f in files["good"][:9]] + [root / files["bad"][0]]
    predictor = Predictor.from_run(run_dir, backend="torch")
    plain = predict_files(predictor, paths, batch_size=4, workers=1, progress=False)
    tta = predict_files(predictor, paths, batch_size=4, tta=True, workers=3, progress=False)
    assert [r.path for r in plain] == [str(p) for p in paths]
    assert plain[-1].error and tta[-1].error
    arrays = np.stack([predictor.decode(p.read_bytes()) for p in paths[:9]])
    expected = predictor.predict_arrays(arrays, tta=True).max(axis=1)
    assert [r.probability for r in tta[:9]] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.realdata
def test_real_photos(real_data: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "real.csv"
    pattern = str(real_data / "Cat" / "1?.jpg")  # ten real JPEGs, through the glob path
    assert cli_main(["predict", pattern, "--run", str(run_dir), "--output", str(out)]) == 0
    rows = read_csv(out)
    assert len(rows) == len(list((real_data / "Cat").glob("1?.jpg"))) > 0
    assert all(r["error"] == "" and r["label"] in ("Cat", "Dog") for r in rows)
