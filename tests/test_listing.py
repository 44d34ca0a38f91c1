"""File discovery and split planning (pure Python, no Spark)."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from catsdogs.errors import InputError
from catsdogs.preprocess.listing import Candidate, scan_input, scan_remote
from catsdogs.preprocess.plan import assign_splits, chunk_sizes, plan_shards


def _candidates(per_class: dict[int, int]) -> list[Candidate]:
    return [Candidate(f"C{label}/img_{i}.jpg", label) for label, n in per_class.items() for i in range(n)]


def _split_of(splits: dict[str, list[Candidate]]) -> dict[str, str]:
    return {c.path: s for s, members in splits.items() for c in members}


def test_scan_finds_candidates_and_counts_ignored(image_tree: tuple[Path, dict[str, list[str]]]) -> None:
    root, info = image_tree
    listing = scan_input(root)
    assert listing.classes == ["Cat", "Dog"]
    paths = {c.path for c in listing.candidates}
    # Every good and bad file is a candidate (bad ones are skipped later, when decoding).
    assert paths == set(info["good"]) | set(info["bad"])
    assert {c.label for c in listing.candidates if c.path.startswith("Dog/")} == {1}
    assert "Dog/sub/deeper/nested.jpg" in paths and "Cat/UPPER.JPEG" in paths
    summary = listing.ignored_summary()
    assert summary["paths"] == sorted(info["ignored"])
    assert summary["count"] == len(info["ignored"])
    assert summary["by_reason"] == {"hidden": 1, "not_image_extension": 1, "os_file": 2,
                                    "outside_class_folder": 1}


def test_scan_sorts_classes_and_skips_hidden_folders(tmp_path: Path) -> None:
    for name in ("zebra", "Ant", "mouse"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.PNG").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / "mouse" / ".cache").mkdir()
    (tmp_path / "mouse" / ".cache" / "b.jpg").write_bytes(b"x")
    listing = scan_input(tmp_path)
    assert listing.classes == ["Ant", "mouse", "zebra"]  # plain sorted() order: upper case first
    assert [c.label for c in sorted(listing.candidates, key=lambda c: c.path)] == [0, 1, 2]
    assert {i.path for i in listing.ignored} == {".git", "mouse/.cache"}


@pytest.mark.parametrize("layout", ["missing", "file", "empty", "one_class", "empty_class", "no_input"])
def test_scan_input_errors_name_the_flag(tmp_path: Path, layout: str) -> None:
    target = tmp_path / "in"
    if layout == "file":
        target.write_text("x")
    elif layout == "empty":
        target.mkdir()
    elif layout == "one_class":
        (target / "Cat").mkdir(parents=True)
        (target / "Cat" / "a.jpg").write_bytes(b"x")
    elif layout == "empty_class":
        for c in ("Cat", "Dog"):
            (target / c).mkdir(parents=True)
        (target / "Cat" / "a.jpg").write_bytes(b"x")
        (target / "Dog" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="--input"):
        scan_input("" if layout == "no_input" else target)


def test_split_is_deterministic_and_independent_of_order() -> None:
    cands = _candidates({0: 500, 1: 300})
    a = assign_splits(cands, 2, 0.1, 0.2, seed=7)
    shuffled = cands[:]
    random.Random(1).shuffle(shuffled)
    b = assign_splits(shuffled, 2, 0.1, 0.2, seed=7)
    assert a == b
    assert plan_shards(a, 64, seed=7) == plan_shards(b, 64, seed=7)


def test_split_is_exactly_stratified() -> None:
    per_class = {0: 517, 1: 283, 2: 1000}
    splits = assign_splits(_candidates(per_class), 3, val_frac=0.15, test_frac=0.1, seed=3)
    for label, n in per_class.items():
        counts = Counter(s for s, members in splits.items() for c in members if c.label == label)
        assert abs(counts["test"] - n * 0.1) <= 1
        assert abs(counts["val"] - n * 0.15) <= 1
        assert counts["train"] + counts["val"] + counts["test"] == n


def test_split_depends_on_seed() -> None:
    cands = _candidates({0: 400, 1: 400})
    a = _split_of(assign_splits(cands, 2, 0.1, 0.1, seed=1))
    b = _split_of(assign_splits(cands, 2, 0.1, 0.1, seed=2))
    assert a != b
    assert sum(a[p] != b[p] for p in a) > 50


def test_plan_shards_near_equal_and_shuffled() -> None:
    splits = assign_splits(_candidates({0: 9000, 1: 9000}), 2, 0.1, 0.1, seed=1337)
    plans = plan_shards(splits, 1500, seed=1337)
    by_split = Counter(p.split for p in plans)
    assert by_split == {"train": 10, "val": 2, "test": 2}  # 14 shards for PetImages' 18,000
    assert {len(p.paths) for p in plans if p.split == "train"} == {1440}
    assert [p.index for p in plans if p.split == "train"] == list(range(10))
    planned = [path for p in plans for path in p.paths]
    assert len(planned) == len(set(planned)) == 18000
    # Rows are shuffled: both classes are mixed inside the first shard.
    assert set(plans[0].labels) == {0, 1}
    assert plan_shards(splits, 1500, seed=1338) != plans


@pytest.mark.parametrize(("n", "rows", "expected"), [(0, 5, []), (10, 5, [5, 5]), (11, 5, [4, 4, 3]),
                                                     (3, 10, [3])])
def test_chunk_sizes(n: int, rows: int, expected: list[int]) -> None:
    assert chunk_sizes(n, rows) == expected


def test_non_utf8_names_are_ignored_not_fatal(tmp_path: Path) -> None:
    for c in ("Cat", "Dog"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "ok.jpg").write_bytes(b"x")
    bad = os.fsencode(tmp_path / "Cat") + b"/caf\xe9.jpg"  # latin-1 byte, not UTF-8
    with open(bad, "wb") as fh:
        fh.write(b"x")
    listing = scan_input(tmp_path)
    assert [c.path for c in listing.candidates] == ["Cat/ok.jpg", "Dog/ok.jpg"]
    assert [(i.path, i.reason) for i in listing.ignored] == [("Cat/caf\\xe9.jpg", "name_not_utf8")]
    json.dumps(listing.ignored_summary()).encode("utf-8")  # serialisable as UTF-8


def _kaggle_tree(root: Path, per_class: int = 3) -> None:
    root.mkdir(parents=True)
    for cls in ("cat", "dog"):
        for i in range(per_class):
            (root / f"{cls}.{i}.jpg").write_bytes(b"x")


def test_flat_kaggle_layout_is_read_by_name(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _kaggle_tree(root)
    (root / "Thumbs.db").write_bytes(b"x")
    (root / ".hidden.jpg").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    listing = scan_input(root)
    assert (listing.classes, listing.labels_from) == (["cat", "dog"], "name")
    assert sorted((c.path, c.label) for c in listing.candidates) == [
        (f"{cls}.{i}.jpg", label) for label, cls in enumerate(("cat", "dog")) for i in range(3)]
    assert listing.ignored_summary()["by_reason"] == {"hidden": 1, "not_image_extension": 1, "os_file": 1}
    assert scan_input(root, "name").candidates == listing.candidates


def test_auto_needs_every_top_image_named_and_no_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _kaggle_tree(root)
    (root / "123.jpg").write_bytes(b"x")  # Kaggle's unlabelled test1/ naming
    with pytest.raises(InputError, match="--labels-from name"):
        scan_input(root)
    listing = scan_input(root, "name")  # explicit: the unlabelled image is ignored and counted
    assert len(listing.candidates) == 6
    assert [(i.path, i.reason) for i in listing.ignored] == [("123.jpg", "no_class_in_name")]
    with_dirs = tmp_path / "with_dirs"
    _kaggle_tree(with_dirs)
    for c in ("A", "B"):
        (with_dirs / c).mkdir()
        (with_dirs / c / "x.jpg").write_bytes(b"x")
    assert scan_input(with_dirs).classes == ["A", "B"]  # class folders win in auto
    named = scan_input(with_dirs, "name")  # by name, subfolders are searched too
    assert named.classes == ["cat", "dog"] and {i.path for i in named.ignored} == {"A/x.jpg", "B/x.jpg"}
    with pytest.raises(InputError, match="two class subfolders"):
        scan_input(root, "folder")


def test_name_layout_needs_two_classes(tmp_path: Path) -> None:
    root = tmp_path / "cats"
    root.mkdir()
    (root / "cat.1.jpg").write_bytes(b"x")
    (root / "cat.jpg").write_bytes(b"x")  # no <class>. prefix: a plain name
    with pytest.raises(InputError, match="only 'cat'.*--labels-from"):
        scan_input(root, "name")


def test_name_layout_split_is_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _kaggle_tree(root, per_class=50)
    a = assign_splits(scan_input(root).candidates, 2, 0.1, 0.1, seed=3)
    b = assign_splits(list(reversed(scan_input(root).candidates)), 2, 0.1, 0.1, seed=3)
    assert a == b and {len(a["test"]), len(a["val"])} == {10}


def test_remote_listing_reads_names_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from catsdogs.io import storage

    files = [("cat.0.jpg", 1), ("dog.0.jpg", 1), ("dog.1.png", 1), ("Thumbs.db", 1), ("x.jpg", 1),
             (".git/config", 1)]
    monkeypatch.setattr(storage, "file_type", lambda uri, flag: "dir")
    monkeypatch.setattr(storage, "list_files", lambda uri, flag: files)
    listing = scan_remote("s3a://b/train", "name")
    assert listing.classes == ["cat", "dog"] and listing.labels_from == "name"
    assert sorted((c.path, c.label) for c in listing.candidates) == [("cat.0.jpg", 0), ("dog.0.jpg", 1),
                                                                     ("dog.1.png", 1)]
    assert listing.ignored_summary()["by_reason"] == {"hidden": 1, "no_class_in_name": 1, "os_file": 1}
    monkeypatch.setattr(storage, "list_files", lambda uri, flag: files[:3])
    assert scan_remote("s3a://b/train").labels_from == "name"  # auto
