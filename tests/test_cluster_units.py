"""The cluster layer's parts without a cluster: task grouping, master checks, failure lines, the rows
schema, Parquet feature shards and whole-file outputs (local and S3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catsdogs.cluster import parts, session
from catsdogs.cluster import predict as cpredict
from catsdogs.cluster.shardjob import Item, group_items
from catsdogs.cluster.standalone import ClusterError, free_port, worker_cpus
from catsdogs.errors import ConfigError, OutputExistsError
from catsdogs.infer.predict import NamedImage, read_item, write_rows
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Answer
from catsdogs.shards.feature_shards import (
    StreamedFeatures,
    chunks_of,
    read_feature_shard,
    take_rows,
    write_feature_shard,
)
from catsdogs.shards.manifest import ShardInfo
from tests.s3 import make_bucket, s3_server


def item(pos: int, rows: int) -> Item:
    return Item("train", pos, ShardInfo(index=pos, split="train", rows=rows, x=f"x{pos}", y=f"y{pos}"))


def test_one_task_per_shard_or_n_groups_balanced_by_rows() -> None:
    items = [item(i, r) for i, r in enumerate([100, 100, 100, 100, 40, 40, 20])]
    assert [[it.pos for it in g] for g in group_items(items, 0)] == [[i] for i in range(7)]
    groups = group_items(items, 3)
    assert len(groups) == 3 and sorted(it.pos for g in groups for it in g) == list(range(7))
    # 4 shards of 100 rows in 3 tasks: one task takes 200 rows at best, and the rest fill the others
    assert sorted(sum(it.info.rows for it in g) for g in groups) == [140, 160, 200]
    assert len(group_items(items, 20)) == 7  # never more tasks than shards


def test_master_endpoints_and_an_unreachable_master() -> None:
    assert session._endpoints("spark://10.0.0.5:7077,10.0.0.6:7078") == [
        ("10.0.0.5", 7077),
        ("10.0.0.6", 7078),
    ]
    assert session._endpoints("k8s://https://api.example:6443") == [("api.example", 6443)]
    assert session._endpoints("yarn") == []
    session.check_master("local[2]")
    with pytest.raises(ConfigError, match="expected spark://HOST:PORT"):
        session.check_master("spark://nohost")
    port = free_port()
    with pytest.raises(ConfigError, match=f"nothing answers at 127.0.0.1:{port} .* or fix --master"):
        session.check_master(f"spark://127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "...ModuleNotFoundError: No module named 'openvino'\n\tat org.apache...",
            "cannot import 'openvino'",
        ),
        (
            "PySparkRuntimeError: [PYTHON_VERSION_MISMATCH] Python in worker has different version: "
            "3.10 than that in driver: 3.11",
            "run Python 3.10, the driver 3.11",
        ),
        (
            'java.io.IOException: Cannot run program "/opt/py/bin/python": error=2',
            "no Python at '/opt/py/bin/python'",
        ),
    ],
)
def test_executor_failures_a_user_can_fix_become_one_line(text: str, expected: str) -> None:
    line = session.explain(RuntimeError(text), "spark://h:7077")
    assert line is not None and expected in line and "\n" not in line and "make install" in line
    assert session.explain(RuntimeError("ZeroDivisionError: division by zero"), "local[2]") is None  # a bug


def _rows() -> list[Prediction]:
    classes = ("Cat", "Dog")
    return [
        Prediction("a.jpg", answer=Answer(np.array([0.9, 0.1], np.float32), 0.25, True), classes=classes),
        Prediction("b.jpg", error="not_an_image", classes=classes),
        Prediction("c.jpg", answer=Answer(np.array([0.4, 0.6], np.float32), 3.5, False,
                                          [("badger", 0.66), ("mongoose", 0.11)]), classes=classes),
        Prediction("d,\"e\".jpg", answer=Answer(np.array([0.3, 0.7]), float("nan"), True), classes=classes),
        Prediction("e.jpg", answer=Answer(np.array([0.2, 0.8], np.float32), 0.5, True), classes=classes),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_task_parts_merge_into_local_predicts_file(tmp_path: Path, suffix: str) -> None:
    """Parts written per task (some partitions empty, written out of order) merge into the very bytes
    that local predict writes for the same rows (looks_like, quoting and NaN scores included)."""
    rows = _rows()
    whole = tmp_path / f"local{suffix}"
    write_rows(rows, str(whole))
    out = tmp_path / f"merged{suffix}"
    staging = parts.make_staging(str(out))
    assert Path(staging).name.startswith(f".{out.name}.parts-")  # hidden: never taken for a result
    for index, chunk in ((3, rows[3:]), (0, rows[:1]), (1, rows[1:3])):  # partition 2 was empty
        parts.write_part(chunk, staging, index, suffix)
    names = [parts.part_name(i, suffix) for i in (0, 1, 3)]
    parts.merge(staging, names, str(out))
    parts.remove(staging)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).equals(pq.read_table(whole))
    else:
        assert out.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([whole.name, out.name])


def test_parts_folder_is_committed_whole_with_success_last(tmp_path: Path) -> None:
    rows = _rows()
    out = tmp_path / "answers.csv"
    staging = parts.make_staging(str(out))
    parts.write_part(rows[:2], staging, 0, ".csv")
    parts.write_part(rows[2:], staging, 1, ".csv")
    assert not out.exists()
    parts.commit_folder(staging, [parts.part_name(i, ".csv") for i in (0, 1)], str(out))
    parts.remove(staging)
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "part-00000.csv", "part-00001.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.csv"]
    import csv

    read = [r["path"] for name in ("part-00000.csv", "part-00001.csv")
            for r in csv.DictReader((out / name).open(newline=""))]
    assert read == [r.path for r in rows]  # name order is input order


def test_an_executor_that_cannot_see_the_output_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:
        parts.write_part(_rows(), str(tmp_path / "elsewhere" / ".o.csv.parts-1"), 0, ".csv")
    line = session.explain(caught.value, "spark://h:7077")
    assert line is not None and "\n" not in line
    where = str(tmp_path / 'elsewhere')
    assert line.startswith(f"the output folder {where!r} is not visible on this executor")
    assert not (tmp_path / "elsewhere").exists()  # nothing written where the driver never looks


def test_parts_merge_on_s3(tmp_path: Path) -> None:
    """An s3a:// --output: parts uploaded under a hidden staging prefix, merged and published whole."""
    rows = _rows()
    with s3_server():
        make_bucket("preds")
        out = "s3a://preds/run1/rows.csv"
        staging = parts.make_staging(out)
        assert staging.startswith("s3a://preds/run1/.rows.csv.parts-")
        parts.write_part(rows[:2], staging, 0, ".csv")
        parts.write_part(rows[2:], staging, 1, ".csv")
        parts.merge(staging, [parts.part_name(i, ".csv") for i in (0, 1)], out)
        parts.remove(staging)
        from catsdogs.io import storage

        local = tmp_path / "local.csv"
        write_rows(rows, str(local))
        assert storage.read_bytes(out) == local.read_bytes()
        assert storage.list_names("s3a://preds/run1") == ["rows.csv"]
        folder = "s3a://preds/run2/rows.csv"  # --parts: the parts under the name, _SUCCESS last
        staging = parts.make_staging(folder)
        parts.write_part(rows[:2], staging, 0, ".csv")
        parts.write_part(rows[2:], staging, 1, ".csv")
        parts.commit_folder(staging, [parts.part_name(i, ".csv") for i in (0, 1)], folder)
        parts.remove(staging)
        assert storage.list_names("s3a://preds/run2") == ["rows.csv"]
        assert storage.list_names(folder) == ["_SUCCESS", "part-00000.csv", "part-00001.csv"]
        assert storage.read_bytes(storage.join(folder, "part-00001.csv")).decode().count("\n") == 4


def test_inputs_are_files_uris_or_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"abc")
    assert read_item(tmp_path / "a.jpg") == b"abc"
    assert read_item(NamedImage("x", content=b"xyz")) == b"xyz"
    assert read_item(NamedImage("x", uri=str(tmp_path / "missing.jpg"))) == "unreadable"
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    assert read_item(tmp_path / "link.jpg") == "broken_link"


def test_feature_shards_round_trip(tmp_path: Path) -> None:
    arrays = {
        "features": np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32),
        "labels": np.arange(5),
        "hash": np.array(list("abcde"), dtype=object),
    }
    write_feature_shard(str(tmp_path / "train" / "part_00000.parquet"), arrays)
    back = read_feature_shard(str(tmp_path / "train" / "part_00000.parquet"))
    assert back["features"].dtype == np.float32  # stored as float16: within its rounding
    np.testing.assert_allclose(back["features"], arrays["features"], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(back["features"], arrays["features"].astype(np.float16))
    assert back["labels"].tolist() == list(range(5)) and back["hash"].tolist() == list("abcde")
    assert list(read_feature_shard(str(tmp_path / "train" / "part_00000.parquet"), ["labels"])) == ["labels"]


def test_streamed_features_are_the_arrays_in_order(tmp_path: Path) -> None:
    """Shards' features, then their mirrored rows, chunk by chunk; take_rows gathers in any order."""
    rng = np.random.default_rng(1)
    shards = [{"features": rng.standard_normal((n, 4)).astype(np.float16).astype(np.float32),
               "flipped": rng.standard_normal((n, 4)).astype(np.float16).astype(np.float32),
               "labels": np.arange(n)} for n in (3, 5, 2)]
    files = []
    for k, arrays in enumerate(shards):
        files.append(str(tmp_path / f"part_{k}.parquet"))
        write_feature_shard(files[-1], arrays)
    whole = np.concatenate([a["features"] for a in shards] + [a["flipped"] for a in shards])
    streamed = StreamedFeatures(tuple((f, c) for c in ("features", "flipped") for f in files), 20, 4)
    assert len(streamed) == 20 and streamed.shape == (20, 4)
    np.testing.assert_array_equal(np.concatenate(list(chunks_of(streamed))), whole)
    index = np.array([19, 0, 7, 3, 3, 12])
    np.testing.assert_array_equal(take_rows(streamed, index), whole[index])
    np.testing.assert_array_equal(take_rows(whole, index), whole[index])
    assert [len(c) for c in chunks_of(whole, 8)] == [8, 8, 4]


def test_outputs_are_written_whole_and_never_replaced(tmp_path: Path) -> None:
    rows = [Prediction("a.jpg", answer=Answer(np.array([0.75, 0.25]), 0.5, True), classes=("Cat", "Dog")),
            Prediction("b.jpg", error="corrupt")]
    write_rows(rows, str(tmp_path / "out.parquet"))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["path", "label", "probability", "error", "ood_score", "looks_like"]
    assert table.to_pylist() == [
        {"path": "a.jpg", "label": "Cat", "probability": 0.75, "error": "", "ood_score": 0.5,
         "looks_like": ""},
        {"path": "b.jpg", "label": "", "probability": None, "error": "corrupt", "ood_score": None,
         "looks_like": ""},
    ]
    with pytest.raises(OutputExistsError, match="already exists; remove it or choose another --output"):
        cpredict.check_target(str(tmp_path / "out.parquet"))
    with s3_server():
        make_bucket("preds")
        cpredict.check_target("s3a://preds/run1/rows.csv")
        write_rows(rows, "s3a://preds/run1/rows.csv")
        from catsdogs.io import storage

        assert [rel for rel, _ in storage.list_files("s3a://preds/run1")] == ["rows.csv"]  # no temporary left
        assert storage.read_bytes("s3a://preds/run1/rows.csv").decode().startswith("path,label,probability")
        with pytest.raises(OutputExistsError):
            cpredict.check_target("s3a://preds/run1/rows.csv")


def test_pinned_workers_get_disjoint_cpus_and_too_many_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert worker_cpus(2, 1) == [{0}, {1}]
    assert worker_cpus(2, 2) == [{0, 1}, {2, 3}]
    with pytest.raises(ClusterError, match="needs 6 CPUs, this machine offers 4"):
        worker_cpus(3, 2)
