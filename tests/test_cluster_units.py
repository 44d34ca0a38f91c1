"""The cluster layer's parts without a cluster: task grouping, master checks, failure lines, the rows
schema, Parquet feature shards and whole-file outputs (local and S3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catsdogs.cluster import predict as cpredict
from catsdogs.cluster import session
from catsdogs.cluster.shardjob import Item, group_items, read_feature_shard, write_feature_shard
from catsdogs.cluster.standalone import ClusterError, free_port, worker_cpus
from catsdogs.errors import ConfigError, OutputExistsError
from catsdogs.infer.predict import Input, read_item, write_rows
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Answer
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


def test_every_prediction_field_reaches_the_spark_rows() -> None:
    """A task's Predictions come back to the driver equal, field for field (looks_like included)."""
    import pandas as pd
    import pyarrow as pa

    classes = ("Cat", "Dog")
    rows = [
        Prediction("a.jpg", answer=Answer(np.array([0.9, 0.1], np.float32), 0.25, True), classes=classes),
        Prediction("b.jpg", error="not_an_image", classes=classes),
        Prediction("c.jpg", answer=Answer(np.array([0.4, 0.6], np.float32), 3.5, False,
                                          [("badger", 0.66), ("mongoose", 0.11)]), classes=classes),
        Prediction("d.jpg", answer=Answer(np.array([0.3, 0.7]), float("nan"), True), classes=classes),
    ]
    frame = cpredict._frame(pd.DataFrame({"_input": [0, 0, 1, 1], "_order": [1, 0, 5, 4]}), rows)
    assert list(frame.columns) == [c.split()[0] for c in cpredict.result_ddl().split(", ")]
    back, procs = cpredict.to_rows(pa.Table.from_pandas(frame), list(classes))
    assert [r.to_dict() for r in back] == [rows[k].to_dict() for k in (1, 0, 3, 2)]  # input order
    assert [r.label for r in back] == ["", "Cat", "Dog", "unknown"]
    assert back[3].looks_like[0] == ("badger", 0.66)
    assert len(procs) == 1


def test_inputs_are_files_uris_or_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"abc")
    assert read_item(tmp_path / "a.jpg") == b"abc"
    assert read_item(Input("x", content=b"xyz")) == b"xyz"
    assert read_item(Input("x", uri=str(tmp_path / "missing.jpg"))) == "unreadable"
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
    np.testing.assert_array_equal(back["features"], arrays["features"])
    assert back["labels"].tolist() == list(range(5)) and back["hash"].tolist() == list("abcde")


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
