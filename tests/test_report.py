"""Tests of the self-contained HTML report."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np

from catsdogs.evaluate import plots
from catsdogs.evaluate.metrics import compute_metrics
from catsdogs.evaluate.report import MAX_SKIPPED_ROWS, ReportData, render, sum_counts, write_report


def _data(tmp_path: Path, skipped: list[dict[str, str]] | None = None) -> ReportData:
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    metrics, text = compute_metrics(labels, probs, ["Cat", "Dog"])
    metrics.update({"split": "test", "data": "/d/shards", "checkpoint": "/r/best.pt",
                    "model": {"name": "seed"}})
    png = plots.save_figure(plots.confusion_matrix_figure(np.array(metrics["confusion_matrix"]),
                                                          ["Cat", "Dog"]), tmp_path / "cm.png")
    return ReportData(
        title="catsdogs evaluation: r", metrics=metrics, classification_report=text,
        images={"Confusion matrix": png}, train_config={"model": "seed", "lr": 0.001},
        preprocess_config={"input": "/data/PetImages", "size": 64}, eval_config={"split": "test"},
        counts={"test": {"Cat": 3, "Dog": 4}, "train": {"Cat": 10, "Dog": 12}}, classes=["Cat", "Dog"],
        skipped=skipped if skipped is not None else [
            {"path": "Dog/<script>alert(1)</script>.jpg", "reason": "truncated", "detail": "x"},
            {"path": "Cat/666.jpg", "reason": "empty", "detail": ""},
            {"path": "Cat/667.jpg", "reason": "empty", "detail": ""},
        ],
        ignored={"Thumbs.db": 2, "non_image": ["Cat/notes.txt", "README.txt"]},
    )


def test_page_is_self_contained(tmp_path: Path) -> None:
    page = write_report(tmp_path / "report.html", _data(tmp_path)).read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 1
    assert base64.b64decode(uris[0]) == (tmp_path / "cm.png").read_bytes()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # no file or remote references at all
    assert "<link" not in page and "<script" not in page  # CSS inline, the script tag in a path escaped
    assert "&lt;script&gt;" in page


def test_page_shows_metrics_counts_skipped_and_configs(tmp_path: Path) -> None:
    page = render(_data(tmp_path))
    assert "75.00%" in page  # accuracy card
    assert "precision" in page and "f1-score" in page  # classification report
    # Counts table: per-class totals over splits and the grand total.
    assert page.index("<th>train</th>") < page.index("<th>test</th>")  # split order, not dict order
    assert '<td class="num"><b>13</b></td>' in page and '<td class="num"><b>29</b></td>' in page
    assert "Cat/666.jpg" in page and "truncated" in page
    assert '<td>empty</td><td class="num">2</td>' in page  # per-reason count
    assert "Thumbs.db" in page and "README.txt" in page
    assert "/data/PetImages" in page and "0.001" in page


def test_page_without_skipped_and_long_skip_lists(tmp_path: Path) -> None:
    assert "No files were skipped." in render(_data(tmp_path, skipped=[]))
    many = [{"path": f"Cat/{i}.jpg", "reason": "empty"} for i in range(MAX_SKIPPED_ROWS + 5)]
    page = render(_data(tmp_path, skipped=many))
    assert f"Cat/{MAX_SKIPPED_ROWS - 1}.jpg" in page and f"Cat/{MAX_SKIPPED_ROWS}.jpg" not in page
    assert "5 more are listed in the manifest" in page


def test_sum_counts() -> None:
    assert sum_counts({"a": 2, "b": [1, 2, 3], "c": {"d": 4}}) == 9
    assert sum_counts("x") == 0


def test_manifest_ignored_section(tmp_path: Path) -> None:
    data = _data(tmp_path)
    data.ignored = {"count": 3, "by_reason": {"hidden": 1, "not_image": 2},
                    "paths": ["Cat/.DS_Store", "Cat/notes.txt", "README.txt"]}
    page = render(data)
    assert '<td>not_image</td><td class="num">2</td>' in page
    assert "<th>total</th><td class=\"num\"><b>3</b></td>" in page and "Cat/notes.txt" in page
    data.ignored = {"count": 0, "by_reason": {}, "paths": []}
    assert "Nothing was ignored." in render(data)
