"""``catsdogs audit`` on generated shards with injected faults, and ``preprocess --exclude``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from catsdogs import schema
from catsdogs.audit import issues as iss
from catsdogs.audit.command import AuditResult, audit
from catsdogs.audit.duplicates import find_duplicates
from catsdogs.audit.outliers import outlier_scores
from catsdogs.audit.similarity import topk, unit_rows
from catsdogs.cli import main as cli_main
from catsdogs.config import AuditConfig
from catsdogs.preprocess.listing import Candidate, Listing, apply_exclusions, read_exclusions
from catsdogs.shards.manifest import Manifest, save_manifest
from tests.audit_data import Faults, make_faulty_shards
from tests.fixtures import make_run


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Faults]:
    root = tmp_path_factory.mktemp("audit") / "shards"
    return root, make_faulty_shards(root)


@pytest.fixture(scope="module")
def audited(faulty: tuple[Path, Faults], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Faults]:
    """Run the real CLI once on the faulty shards; return its output folder (stdout in stdout.txt)."""
    root, faults = faulty
    out = tmp_path_factory.mktemp("audit_out") / "audit"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # 0.9, not the default 0.94: a 10 % crop of a 64 px generated image scores 0.90-0.99.
        assert cli_main(["audit", "--data", str(root), "--output", str(out), "--threads", "2",
                         "--dup-threshold", "0.9"]) == 0
    (out.parent / "stdout.txt").write_text(buf.getvalue())
    return out, faults


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / iss.ISSUES_CSV_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


def test_issues_csv_has_the_documented_columns(audited: tuple[Path, Faults]) -> None:
    out, _ = audited
    with open(out / iss.ISSUES_CSV_NAME, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == iss.COLUMNS == ("path", "split", "label", "issue", "score", "suggested_label",
                                            "other_path")
    assert {r["issue"] for r in _rows(out)} <= set(iss.KINDS)
    assert json.loads((out / schema.CONFIG_NAME).read_text())["dup_threshold"] == 0.9


def test_injected_label_flips_are_found_with_the_true_label_suggested(audited: tuple[Path, Faults]) -> None:
    out, faults = audited
    found = {r["path"]: r for r in _rows(out) if r["issue"] == iss.LABEL_ERROR}
    assert set(faults.flipped) <= set(found), sorted(set(faults.flipped) - set(found))
    for path in faults.flipped:  # the folder name is the true class; the stored label was flipped
        assert found[path]["suggested_label"] == path.split("/")[0] != found[path]["label"]
    assert len(found) <= 2 * len(faults.flipped), sorted(set(found) - set(faults.flipped))


def test_injected_copies_are_found_and_cross_split_ones_called_leakage(audited: tuple[Path, Faults]) -> None:
    out, faults = audited
    pairs = {frozenset((r["path"], r["other_path"])): r for r in _rows(out)
             if r["issue"] in (iss.LEAKAGE, iss.NEAR_DUPLICATE, iss.EXACT_DUPLICATE)}
    split = {p: s for s, paths in faults.paths.items() for p in paths}
    for copy, original, how in faults.copies:
        row = pairs.get(frozenset((copy, original)))
        assert row is not None, f"{how} copy {copy} of {original} not found"
        if split[copy] != split[original]:
            assert row["issue"] == iss.LEAKAGE and row["path"] == copy  # the evaluation copy is named
        else:
            assert row["issue"] == (iss.EXACT_DUPLICATE if how == "exact" else iss.NEAR_DUPLICATE)
    injected = {frozenset((c, o)) for c, o, _ in faults.copies}
    assert not set(pairs) - injected, sorted(map(sorted, set(pairs) - injected))


def test_gallery_is_self_contained_and_shows_each_reason(audited: tuple[Path, Faults]) -> None:
    out, faults = audited
    page = (out / iss.AUDIT_HTML_NAME).read_text()
    # Nothing fetched from elsewhere: every src/href is a data: URI or an in-page anchor.
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert "<script" not in page and "url(" not in page
    for path in faults.flipped:
        assert path in page
    assert "Leakage" in page and "Suspected label errors" in page


def test_summary_paragraph_on_stdout(audited: tuple[Path, Faults]) -> None:
    out, _ = audited
    text = (out.parent / "stdout.txt").read_text()
    assert re.search(r"Audited 246 images \(train 162, val 42, test 42\)", text), text
    assert "suspected label errors" in text and "leakage pairs" in text


@pytest.mark.parametrize("case", ["missing", "empty", "no_manifest", "other_schema"])
def test_bad_shards_exit_2_with_one_line(tmp_path: Path, case: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "shards"
    if case != "missing":
        data.mkdir()
    if case == "other_schema":
        (data / schema.MANIFEST_NAME).write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION + 1}))
    if case == "empty":
        save_manifest(Manifest(classes=["Cat", "Dog"], size=32, resize="stretch", mean=[0.0] * 3,
                               std=[1.0] * 3, shards=[], counts={}), data)
    rc = cli_main(["audit", "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert ("schema_version" if case == "other_schema" else "--data") in err[0], err
    assert not (tmp_path / "out" / iss.ISSUES_CSV_NAME).exists()


def test_chunked_search_matches_the_full_matrix() -> None:
    rng = np.random.default_rng(0)
    x = unit_rows(rng.normal(size=(53, 7)))
    idx, sim = topk(x, x, 4, chunk_rows=5, same=np.arange(53), progress=False)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :4])
    np.testing.assert_allclose(sim, np.sort(full, axis=1)[:, ::-1][:, :4], rtol=1e-5)


def test_exact_copies_pair_up_even_when_many() -> None:
    """Five identical images give four pairs to one original, not ten, and no near pairs of noise."""
    rng = np.random.default_rng(1)
    tiny = rng.normal(size=(20, 1, 192)).astype(np.float32)
    tiny[5:10] = tiny[4]
    hashes = np.array([f"h{i}" for i in range(20)], dtype=object)
    hashes[5:10] = "h4"
    pairs = find_duplicates(tiny, hashes, 0.9, 5, 8, progress=False)
    exact = {(int(a), int(b)) for a, b, e in zip(pairs.a, pairs.b, pairs.exact, strict=True) if e}
    assert exact == {(4, k) for k in range(5, 10)}
    assert set(map(int, pairs.a)) | set(map(int, pairs.b)) <= set(range(4, 10))


def test_far_point_is_the_top_outlier() -> None:
    """Two tight classes (like cat and dog features) and one image pointing elsewhere (a logo)."""
    rng = np.random.default_rng(2)
    means = rng.normal(size=(3, 32)) * 3
    feats = means[np.arange(300) % 2] + rng.normal(size=(300, 32))
    feats[17] = means[2] + rng.normal(size=32)
    split = np.array(["train"] * 200 + ["test"] * 100, dtype=object)
    z = outlier_scores(feats, split, k=5, chunk_rows=64, progress=False)
    assert int(np.argmax(z)) == 17 and z[17] > AuditConfig().outlier_z


def test_near_blank_image_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    make_faulty_shards(root, counts={"train": 40, "val": 8, "test": 8}, flips=0, copies=())
    x = np.load(root / "test" / "X_part_00000.npy")
    x[3] = 200  # one flat grey frame, like a "photo unavailable" card
    np.save(root / "test" / "X_part_00000.npy", x)
    cfg = AuditConfig(data=str(root), output=str(tmp_path / "o"), folds=3)
    result: AuditResult = audit(cfg, progress=False)
    blank = [i for i in result.issues if i.issue == iss.NEAR_BLANK]
    assert [(i.split, i.path) for i in blank] == [("test", "Dog/test_3.jpg")]
    assert any("not checked" in n for n in result.notes)  # no input folder: sizes skipped with a note


def test_exclusion_file_reads_plain_lists_and_audit_csvs(tmp_path: Path) -> None:
    plain = tmp_path / "list.txt"
    plain.write_text("# reviewed\nCat/1.jpg\n\n./Dog/2.jpg\nCat/1.jpg\n")
    assert read_exclusions(str(plain)) == ["Cat/1.jpg", "./Dog/2.jpg"]
    audit_csv = tmp_path / "issues.csv"
    audit_csv.write_text(",".join(iss.COLUMNS) + "\nDog/3.jpg,train,Dog,outlier,9,,\n")
    assert read_exclusions(str(audit_csv)) == ["Dog/3.jpg"]
    listing = Listing(root=Path("/in"), classes=["Cat", "Dog"],
                      candidates=[Candidate("Cat/1.jpg", 0), Candidate("Dog/2.jpg", 1),
                                  Candidate("Dog/3.jpg", 1)])
    kept, section = apply_exclusions(listing, ["Cat/1.jpg", "/in/Dog/2.jpg", "Dog/404.jpg"])
    assert [c.path for c in kept.candidates] == ["Dog/3.jpg"]
    assert section["paths"] == ["Cat/1.jpg", "Dog/2.jpg"] and section["unmatched"] == 1


def test_manifest_without_exclusions_has_no_excluded_key(tmp_path: Path) -> None:
    """Old manifests (no field) load; new ones without exclusions stay readable by older readers."""
    m = Manifest(classes=["Cat", "Dog"], size=8, resize="stretch", mean=[0.0] * 3, std=[1.0] * 3,
                 shards=[], counts={})
    d = m.to_json()
    assert "excluded" not in d
    assert Manifest.from_json(d).excluded == {}


def test_run_backbone_is_used_and_a_featureless_model_is_refused(faulty: tuple[Path, Faults], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = faulty
    lite = make_run(tmp_path / "lite", size=48, model="effnet_lite0")
    cfg = AuditConfig(data=str(root), output=str(tmp_path / "o"), run=str(lite), folds=3)
    result = audit(cfg, progress=False)
    assert "at 48 px" in result.data.backbone and result.data.features.shape == (246, 1280)
    seed = make_run(tmp_path / "seed", size=64, model="seed")
    rc = cli_main(["audit", "--data", str(root), "--output", str(tmp_path / "o2"), "--run", str(seed)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--run" in err[0] and "features" in err[0], err
