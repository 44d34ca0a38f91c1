"""``catsdogs preprocess`` end to end on local Spark (one session shared by the module)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from catsdogs import schema
from catsdogs.audit.issues import COLUMNS as AUDIT_COLUMNS
from catsdogs.cli import main as cli_main
from catsdogs.errors import OutputExistsError
from catsdogs.io.outputs import check_local_output
from catsdogs.preprocess.listing import scan_input
from catsdogs.preprocess.task import TaskSettings, process_shard
from catsdogs.shards.manifest import load_manifest
from tests.fixtures import make_flat_tree, make_image_tree
from tests.test_transforms import EXPECTED_REASONS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from catsdogs.spark import get_spark

    session = get_spark("local[2]", "catsdogs-tests", {"spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("tree") / "PetImages"
    return root, make_image_tree(root, per_class=20)


@pytest.fixture(scope="module")
def first_run(spark: object, tree: tuple[Path, dict[str, list[str]]],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preprocess the odd-files tree once through the real CLI; return the output folder."""
    root, _ = tree
    out = tmp_path_factory.mktemp("out") / "shards"
    rc = cli_main(["preprocess", "--input", str(root), "--output", str(out), "--size", "24",
                   "--shard-rows", "16", "--val-frac", "0.2", "--test-frac", "0.2"])
    assert rc == 0
    return out


def _files_csv(out: Path) -> list[dict[str, str]]:
    with open(out / schema.FILES_CSV_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.npy"))}


def test_every_file_is_accounted_for(first_run: Path, tree: tuple[Path, dict[str, list[str]]]) -> None:
    _, info = tree
    rows = _files_csv(first_run)
    assert list(rows[0]) == list(schema.FILES_CSV_COLUMNS)
    assert sorted(r["path"] for r in rows) == sorted(info["good"])
    m = load_manifest(first_run)
    assert {s["path"]: s["reason"] for s in m.skipped} == {
        **EXPECTED_REASONS, "Dog/broken_link.jpg": "broken_link"}
    assert m.ignored["count"] == len(info["ignored"])
    assert m.ignored["paths"] == sorted(info["ignored"])
    n_candidates = len(info["good"]) + len(info["bad"])
    assert m.stats["candidates"] == n_candidates
    assert (m.stats["kept"], m.stats["skipped"]) == (len(info["good"]), len(info["bad"]))
    assert m.classes == ["Cat", "Dog"] and m.size == 24
    assert (first_run / schema.CONFIG_NAME).is_file()
    assert json.loads((first_run / schema.CONFIG_NAME).read_text())["size"] == 24
    # The temporary folder was renamed away, nothing else left beside the output.
    assert sorted(p.name for p in first_run.parent.iterdir()) == ["shards"]


def test_shards_match_files_csv(first_run: Path) -> None:
    m = load_manifest(first_run)
    rows = _files_csv(first_run)
    by_shard = Counter((r["split"], int(r["shard"])) for r in rows)
    assert {(s.split, s.index): s.rows for s in m.shards} == dict(by_shard)
    total = 0
    for s in m.shards:
        x = np.load(first_run / s.x, mmap_mode="r")
        y = np.load(first_run / s.y)
        assert x.shape == (s.rows, 24, 24, 3) and x.dtype == np.uint8
        assert hashlib.sha256((first_run / s.x).read_bytes()).hexdigest() == s.x_sha256
        labels = {int(r["row"]): int(r["label"]) for r in rows
                  if (r["split"], int(r["shard"])) == (s.split, s.index)}
        assert sorted(labels) == list(range(s.rows))  # rows 0..n-1, each exactly once
        assert [labels[i] for i in range(s.rows)] == y.tolist()
        total += s.rows
    assert total == len(rows) == m.stats["kept"]
    for split in schema.SPLITS:
        per_class = Counter(m.classes[int(r["label"])] for r in rows if r["split"] == split)
        assert m.counts[split] == {c: per_class.get(c, 0) for c in m.classes}
    # Normalisation statistics are over the train shards, in pixel units.
    train = np.concatenate([np.load(first_run / s.x) for s in m.split_shards("train")])
    np.testing.assert_allclose(m.mean, train.reshape(-1, 3).mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(m.std, train.reshape(-1, 3).std(axis=0), atol=1e-3)


def test_a_file_is_decoded_in_the_right_place(first_run: Path,
                                              tree: tuple[Path, dict[str, list[str]]]) -> None:
    from catsdogs.models.transforms import load_image

    root, _ = tree
    m = load_manifest(first_run)
    row = next(r for r in _files_csv(first_run) if r["path"] == "Dog/sub/deeper/nested.jpg")
    shard = next(s for s in m.shards if s.split == row["split"] and s.index == int(row["shard"]))
    stored = np.load(first_run / shard.x)[int(row["row"])]
    expected = load_image((root / row["path"]).read_bytes(), 24, "stretch")
    assert np.array_equal(stored, expected)


def test_overwrite_is_refused_then_replaces_with_identical_shards(
        first_run: Path, tree: tuple[Path, dict[str, list[str]]], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = tree
    before = _digests(first_run)
    args = ["preprocess", "--input", str(root), "--output", str(first_run), "--size", "24",
            "--shard-rows", "16", "--val-frac", "0.2", "--test-frac", "0.2"]
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err and "Traceback" not in err
    assert _digests(first_run) == before
    assert cli_main([*args, "--overwrite"]) == 0
    # Same input and seed: byte-identical shards, whatever Spark's scheduling did.
    assert _digests(first_run) == before
    assert sorted(p.name for p in first_run.parent.iterdir()) == ["shards"]


def test_parquet_format_holds_the_same_rows_and_spark_reads_it(
        spark: object, first_run: Path, tree: tuple[Path, dict[str, list[str]]], tmp_path: Path) -> None:
    from catsdogs.shards.reader import open_shard

    root, _ = tree
    out = tmp_path / "pq"
    assert cli_main(["preprocess", "--input", str(root), "--output", str(out), "--size", "24",
                     "--shard-rows", "16", "--val-frac", "0.2", "--test-frac", "0.2",
                     "--format", "parquet"]) == 0
    m, ref = load_manifest(out), load_manifest(first_run)
    assert m.format == "parquet" and ref.format == "npy"
    assert not list(out.rglob("*.npy")) and len(list(out.rglob("*.parquet"))) == len(m.shards)
    assert _files_csv(out) == _files_csv(first_run)  # same files, splits, shards and rows
    assert (m.counts, m.skipped, m.mean, m.std) == (ref.counts, ref.skipped, ref.mean, ref.std)
    for s, r in zip(m.shards, ref.shards, strict=True):
        x, y = open_shard(out, s, 24)
        xr, yr = open_shard(first_run, r, 24)
        assert np.array_equal(x[0:len(x)], np.asarray(xr)) and np.array_equal(y, yr)
    # Spark (and so any Spark SQL user) reads the folder as a table with label and split columns.
    df = spark.read.parquet(*[str(out / s.x) for s in m.shards])  # type: ignore[attr-defined]
    got = Counter((r["split"], r["label"]) for r in df.select("split", "label").collect())
    want = Counter((r["split"], int(r["label"])) for r in _files_csv(first_run))
    assert got == want
    row = df.filter(df.path == "Dog/sub/deeper/nested.jpg").select("pixels").collect()
    assert len(row) == 1 and len(row[0]["pixels"]) == 24 * 24 * 3


def test_too_many_skipped_fails_and_leaves_nothing(
        spark: object, tree: tuple[Path, dict[str, list[str]]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = tree
    out = tmp_path / "out"
    rc = cli_main(["preprocess", "--input", str(root), "--output", str(out), "--size", "16",
                   "--max-skip-frac", "0.01"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-skip-frac" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


@pytest.mark.parametrize("case", ["missing", "file", "one_class", "no_output", "nested"])
def test_user_errors_exit_2_with_one_line(tmp_path: Path, case: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in"
    if case == "file":
        inp.write_text("not a folder")
    elif case in ("one_class", "nested", "no_output"):
        make_image_tree(inp, per_class=2, classes=("Cat", "Dog"), odd=False)
        if case == "one_class":
            for p in (inp / "Dog").iterdir():
                p.unlink()
            (inp / "Dog").rmdir()
    out = {"nested": str(inp / "Cat" / "shards"), "no_output": ""}.get(case, str(tmp_path / "out"))
    rc = cli_main(["preprocess", "--input", str(inp), "--output", out])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    flag = {"no_output": "--output", "nested": "--output"}.get(case, "--input")
    assert flag in lines[0]
    assert not (tmp_path / "out").exists()


def test_overwrite_never_replaces_a_folder_that_is_not_shards(tmp_path: Path) -> None:
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(OutputExistsError, match="--output"):
        check_local_output(precious, overwrite=True)
    check_local_output(tmp_path / "fresh", overwrite=False)


def test_task_reports_unreadable_and_broken_links_without_spark(tmp_path: Path) -> None:
    (tmp_path / "Cat").mkdir()
    (tmp_path / "Cat" / "dir.jpg").mkdir()  # reading a folder fails like an unreadable file
    os.symlink(tmp_path / "gone.jpg", tmp_path / "Cat" / "link.jpg")
    settings = TaskSettings(str(tmp_path), str(tmp_path / "out"), 8, "stretch", 10_000, 2)
    cols = process_shard(settings, "val", 0, ["Cat/dir.jpg", "Cat/link.jpg"], [0, 0])
    assert cols["kind"] == ["image", "image", "shard"]
    assert cols["reason"][:2] == ["unreadable", "broken_link"]
    assert cols["row"] == [-1, -1, -1]
    detail = json.loads(cols["detail"][2])
    assert detail["info"]["rows"] == 0


@pytest.mark.realdata
def test_real_data_sample(spark: object, real_data: Path, tmp_path: Path) -> None:
    sample = tmp_path / "PetImages"
    for cls in ("Cat", "Dog"):
        (sample / cls).mkdir(parents=True)
        names = sorted(os.listdir(real_data / cls), key=lambda n: int(n.split(".")[0]))[:150]
        for name in names:
            os.symlink(real_data / cls / name, sample / cls / name)
    out = tmp_path / "shards"
    assert cli_main(["preprocess", "--input", str(sample), "--output", str(out), "--size", "32"]) == 0
    m = load_manifest(out)
    assert m.stats["skipped"] == 0 and m.stats["kept"] == 300
    assert m.counts == {"train": {"Cat": 120, "Dog": 120}, "val": {"Cat": 15, "Dog": 15},
                        "test": {"Cat": 15, "Dog": 15}}
    assert len(scan_input(sample).candidates) == 300


def test_spark_conf_is_quiet_local_and_user_overridable() -> None:
    from catsdogs.spark import build_conf

    conf = build_conf("local[2]", "x", {"spark.ui.enabled": "true", "spark.executor.memory": "2g",
                                        "spark.driver.extraJavaOptions": "-Dfoo=1"})
    assert conf["spark.driver.bindAddress"] == "127.0.0.1"
    assert conf["spark.ui.showConsoleProgress"] == "false"
    assert conf["spark.ui.enabled"] == "true" and conf["spark.executor.memory"] == "2g"
    assert "log4j2.configurationFile" in conf["spark.driver.extraJavaOptions"]
    assert conf["spark.driver.extraJavaOptions"].endswith("-Dfoo=1")
    assert "UseSerialGC" not in conf["spark.driver.extraJavaOptions"]  # the user's options replace ours
    assert "UseSerialGC" in build_conf("local[2]", "x")["spark.driver.extraJavaOptions"]
    cluster = build_conf("spark://head:7077", "x")
    assert cluster["spark.master"] == "spark://head:7077"
    assert "spark.driver.bindAddress" not in cluster and "spark.ui.enabled" not in cluster


def test_console_shows_progress_and_summary_but_no_spark_logs(tmp_path: Path) -> None:
    """A fresh process, as a user runs it: stdout has the summary, stderr no JVM/log4j chatter."""
    import subprocess
    import sys

    make_image_tree(tmp_path / "in", per_class=3, odd=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK"))}
    cmd = [sys.executable, "-m", "catsdogs.cli", "preprocess", "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "out"), "--master", "local[1]", "--size", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Preprocessed 6 of 6 images")
    assert "6/6" in proc.stderr  # the progress bar: plain lines, since stderr is a pipe here
    assert "\r" not in proc.stderr and max(map(len, (proc.stdout + proc.stderr).splitlines())) <= 300
    for noise in ("WARN", "INFO", "log4j", "WARNING", "Setting default log level", "Stage 0"):
        assert noise not in proc.stderr, proc.stderr


def test_pixel_sums_are_exact() -> None:
    from catsdogs.preprocess.task import pixel_sums

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(150)]  # > one chunk
    total, squares = pixel_sums(images)
    flat = np.stack(images).reshape(-1, 3).astype(np.int64)
    assert total.tolist() == flat.sum(axis=0).tolist()
    assert squares.tolist() == (flat * flat).sum(axis=0).tolist()
    assert [v.tolist() for v in pixel_sums([])] == [[0, 0, 0], [0, 0, 0]]


def test_exclude_drops_files_and_records_them_apart_from_skips(spark: object, tmp_path: Path) -> None:
    """--exclude takes an audit issues.csv; a stale path is counted, not silently ignored."""
    inp = tmp_path / "PetImages"
    make_image_tree(inp, per_class=8, odd=False)
    issues_csv = tmp_path / "issues.csv"
    issues_csv.write_text(",".join(AUDIT_COLUMNS) + "\nCat/3.jpg,train,Cat,label_error,0.9,Dog,\n"
                          "Dog/5.jpg,test,Dog,leakage,0.99,,Dog/1.jpg\nDog/gone.jpg,val,Dog,outlier,7,,\n")
    out = tmp_path / "shards"
    assert cli_main(["preprocess", "--input", str(inp), "--output", str(out), "--size", "16",
                     "--exclude", str(issues_csv)]) == 0
    m = load_manifest(out)
    with open(out / schema.FILES_CSV_NAME, newline="") as fh:
        kept = {r["path"] for r in csv.DictReader(fh)}
    assert "Cat/3.jpg" not in kept and "Dog/5.jpg" not in kept and len(kept) == 14
    assert m.excluded["paths"] == ["Cat/3.jpg", "Dog/5.jpg"] and m.excluded["unmatched"] == 1
    assert m.skipped == [] and m.stats["excluded"] == 2
    raw = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert raw["excluded"]["count"] == 2


def test_kaggle_flat_layout_keeps_every_decodable_image_with_its_label(spark: object, tmp_path: Path) -> None:
    root = tmp_path / "train"
    info = make_flat_tree(root, per_class=10)
    out = tmp_path / "shards"
    assert cli_main(["preprocess", "--input", str(root), "--output", str(out), "--size", "24",
                     "--val-frac", "0.2", "--test-frac", "0.2"]) == 0
    m = load_manifest(out)
    rows = _files_csv(out)
    assert m.classes == ["cat", "dog"] and m.stats["labels_from"] == "name"
    assert sorted(r["path"] for r in rows) == info["good"]
    assert all(int(r["label"]) == m.classes.index(r["path"].split(".")[0]) for r in rows)
    assert sorted(s["path"] for s in m.skipped) == info["bad"]
    assert m.ignored["paths"] == info["ignored"]
    for s in m.shards:  # the shards hold the same labels as files.csv
        y = np.load(out / s.y)
        labels = {int(r["row"]): int(r["label"]) for r in rows
                  if (r["split"], int(r["shard"])) == (s.split, s.index)}
        assert [labels[i] for i in range(s.rows)] == y.tolist()
    per_class = Counter(r["path"].split(".")[0] for r in rows)
    assert {c: sum(m.counts[sp][c] for sp in schema.SPLITS) for c in m.classes} == dict(per_class)
