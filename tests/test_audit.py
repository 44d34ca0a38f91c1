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
import torch

from catsdogs import checkpoint as ckpt
from catsdogs import schema
from catsdogs.audit import issues as iss
from catsdogs.audit.command import AuditResult, audit
from catsdogs.audit.duplicates import find_duplicates
from catsdogs.audit.similarity import topk, unit_rows
from catsdogs.checkpoint import load_checkpoint
from catsdogs.cli import main as cli_main
from catsdogs.config import AuditConfig
from catsdogs.models.ood import Detector, fit_detector
from catsdogs.preprocess.listing import Candidate, Listing, apply_exclusions, read_exclusions
from catsdogs.shards.manifest import Manifest, save_manifest
from tests.audit_data import Faults, make_faulty_shards
from tests.fixtures import make_run
from tests.ood_set import generated_images


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
    assert "effnet_lite0 (ImageNet) at 180 px" in text  # the default side, not the shards' 64 px


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


def test_a_training_image_is_scored_as_if_it_were_not_in_the_bank() -> None:
    """Leave-one-out: a bank row's score equals its score against the bank without it."""
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(60, 16)).astype(np.float32)
    det = fit_detector("knn", feats, np.zeros(60, np.int64), 2)
    assert det.params["bank"].shape[0] == 60  # every row is in the bank
    x = torch.from_numpy(feats)
    left_out = det.score(x, torch.zeros(0, 0), leave_out=torch.ones(60, dtype=torch.bool)).numpy()
    for i in (0, 17, 59):
        without = fit_detector("knn", np.delete(feats, i, axis=0), np.zeros(59, np.int64), 2)
        assert left_out[i] == pytest.approx(without.score(x[i:i + 1], torch.zeros(0, 0)).item(), abs=1e-6)
    in_sample = det.score(x, torch.zeros(0, 0)).numpy()
    assert (left_out > in_sample).all()  # its own entry made every image look more typical
    # A row that may be in the bank but is not (no entry that close) is scored as it is.
    new = torch.from_numpy(rng.normal(size=(5, 16)).astype(np.float32))
    marked = det.score(new, torch.zeros(0, 0), leave_out=torch.ones(5, dtype=torch.bool))
    np.testing.assert_array_equal(marked, det.score(new, torch.zeros(0, 0)))


NON_PET_KINDS = ("solid", "noise", "text", "checkerboard")
"""Generated non-pets (tests/ood_set.py) unlike the striped "pets" of tests/audit_data.py."""


@pytest.fixture(scope="module")
def with_non_pets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Clean generated pets plus 12 non-pets (flat colour, noise, text, checkerboard) in train and test."""
    root = tmp_path_factory.mktemp("nonpets") / "shards"
    made = [(n, a) for n, a in generated_images(3, 64, seed=1) if n.rsplit("_", 1)[0] in NON_PET_KINDS]
    extra = tuple((("train", "test", "train")[i % 3], a, i % 2, f"{('Cat', 'Dog')[i % 2]}/nonpet_{n}.png")
                  for i, (n, a) in enumerate(made))
    make_faulty_shards(root, counts={"train": 120, "val": 40, "test": 40}, flips=0, copies=(), extra=extra)
    return root, [p for *_, p in extra]


def _outliers(result: AuditResult) -> list[str]:
    return [i.path for i in result.issues if i.issue == iss.OUTLIER]


def test_injected_non_pets_are_outliers_and_pets_mostly_not(with_non_pets: tuple[Path, list[str]],
                                                           tmp_path: Path) -> None:
    root, non_pets = with_non_pets
    # --size 64 (the shards' size) keeps the test to seconds; the default 180 px flags the same 12.
    cfg = AuditConfig(data=str(root), output=str(tmp_path / "o"), folds=3, size=64)
    result = audit(cfg, progress=False)
    flagged = _outliers(result)
    assert set(non_pets) <= set(flagged), sorted(set(non_pets) - set(flagged))
    assert len(set(flagged) - set(non_pets)) <= 0.05 * (len(result.data) - len(non_pets))
    assert set(flagged[:len(non_pets)]) == set(non_pets)  # ranked by score: every non-pet above every pet
    ood = result.outliers
    val = result.data.split == "val"
    assert (ood.score[val] <= ood.threshold).mean() >= cfg.accept_rate  # calibrated on val acceptance
    assert any("fitted on 128 train images" in n for n in result.notes), result.notes


def test_a_runs_own_detector_is_used_with_its_threshold(with_non_pets: tuple[Path, list[str]],
                                                        tmp_path: Path) -> None:
    root, non_pets = with_non_pets
    run = tmp_path / "run"
    # knn: the detector whose own bank holds the train images (the leave-one-out below).
    assert cli_main(["train", "--data", str(root), "--output", str(run), "--model", "effnet_lite0",
                     "--freeze", "backbone", "--threads", "2", "--ood-method", "knn"]) == 0
    det = Detector.from_state(load_checkpoint(run / "best.pt")[ckpt.CKPT_OOD])
    result = audit(AuditConfig(data=str(root), output=str(tmp_path / "o"), run=str(run), folds=3),
                   progress=False)
    assert result.outliers.threshold == det.threshold
    assert any("the run's knn detector" in n for n in result.notes), result.notes
    assert set(non_pets) <= set(_outliers(result))
    # The run's bank holds these very train images (fewer than KNN_BANK_ROWS): recomputed here, each
    # one finds its own entry and skips it, so every train score is out of sample (higher).
    train = result.data.split == "train"
    in_sample = det.score(torch.from_numpy(result.data.features[train]), torch.zeros(0, 0)).numpy()
    assert (result.outliers.score[train] > in_sample).all()
    # At another size the run's features move: its threshold would not hold, so one is fitted here.
    other = audit(AuditConfig(data=str(root), output=str(tmp_path / "o2"), run=str(run), folds=3, size=48),
                  progress=False)
    assert any("fitted here" in n for n in other.notes) and other.outliers.threshold != det.threshold


def test_near_blank_image_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    make_faulty_shards(root, counts={"train": 40, "val": 8, "test": 8}, flips=0, copies=())
    x = np.load(root / "test" / "X_part_00000.npy")
    x[3] = (200, 30, 30)  # one flat red frame, like a "photo unavailable" card (channels differ: std 80)
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


def test_the_local_audit_reads_each_shard_once(faulty: tuple[Path, Faults],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from catsdogs.audit.features import compute
    from catsdogs.shards import reader
    from catsdogs.shards.manifest import load_manifest

    root, _faults = faulty
    opened: list[str] = []
    real = reader.open_shard

    def counting(where: str | Path, info: object, *args: object, **kwargs: object) -> object:
        opened.append(info.x)  # type: ignore[attr-defined]
        return real(where, info, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "open_shard", counting)
    manifest = load_manifest(root)
    data = compute(root, manifest, progress=False)
    assert sorted(opened) == sorted(i.x for s in schema.SPLITS for i in manifest.split_shards(s))
    assert len(data.label) == len(data.pixel_hash) == len(data.features) == sum(
        manifest.split_rows(s) for s in schema.SPLITS)
