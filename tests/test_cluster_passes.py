"""The forward passes on a real standalone cluster (master + 2 one-core workers on 127.0.0.1).

Frozen training of the default preset (effnet_lite12, --freeze backbone, openvino-int8) gives the
local head; predict, evaluate and audit give the local rows; a SIGKILLed driver leaves no output;
executors that cannot import the work's packages, an unreachable master and an existing output are
one line each. Real photos (a few hundred, at 64 px to keep CI short), run through the CLI in their
own processes as users run it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from catsdogs.cluster.standalone import Cluster, leftover_pids, pids_under, standalone_cluster
from catsdogs.models.transforms import load_image
from catsdogs.shards.manifest import Manifest, save_manifest
from catsdogs.shards.writer import ShardWriter
from tests.fixtures import REAL_DATA, bomb_png, jpeg_bytes, synthetic_image

pytestmark = pytest.mark.slow

SIZE = 64
"""Side of the shards and the model here: the default preset's 260 px would cost ~16x the forward passes."""
PER_CLASS = {"train": 60, "val": 20, "test": 20}
"""Real photos per class and split (200 in all) for training, evaluate and audit."""
PREDICT_PER_CLASS = 100
"""Real photos per class for predict (200, other files than the shards'), plus the broken files."""
SHARD_ROWS = 30
PRESET = [
    "--model",
    "effnet_lite12",
    "--freeze",
    "backbone",
    "--batch-size",
    "32",
    "--calibration-images",
    "32",
    "--int8-max-drop",
    "100",
]
"""the effnet_lite12_frozen preset's train section (default --backend openvino-int8), at 32 calibration
images instead of 256 (the int8 calibration costs ~1 s per image at 260 px on these cores). The guard is
opened wide: on 40 validation images one image is 2.5 points, and both sides must run int8 here (the
guard itself is tested in test_engines)."""
INT8 = ["--int8-max-drop", "100"]
"""The same bound for predict and evaluate, so they reuse the guard recorded in training."""
BROKEN = {"empty.jpg": b"", "page.jpg": b"<html>404</html>", "bomb.png": bomb_png()}


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "catsdogs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def on(c: Cluster) -> list[str]:
    flags = ["--master", c.master_url]
    for key, value in c.client_conf(quick_start=True).items():
        flags += ["--spark-conf", f"{key}={value}"]
    return flags


def photos(cls: str) -> list[Path]:
    return sorted((REAL_DATA / cls).glob("*.jpg"), key=lambda p: int(p.stem))


def write_real_shards(root: Path, fmt: str = "npy") -> Manifest:
    """Shards of real photos written directly (no Spark: preprocess is tested elsewhere)."""
    infos, counts, start = [], {}, 0
    pixels = np.zeros(3)
    for split, n in PER_CLASS.items():
        rows = [(p, k) for k, cls in enumerate(("Cat", "Dog")) for p in photos(cls)[start : start + n]]
        rows = [rows[i] for i in np.random.default_rng(len(split)).permutation(len(rows))]
        counts[split] = {"Cat": n, "Dog": n}
        for index, first in enumerate(range(0, len(rows), SHARD_ROWS)):
            with ShardWriter(root, split, index, SIZE, 2, fmt) as w:
                for path, label in rows[first : first + SHARD_ROWS]:
                    img = load_image(path.read_bytes(), SIZE, "stretch")
                    pixels += img.reshape(-1, 3).mean(0) if split == "train" else 0
                    w.add(img, label, f"{('Cat', 'Dog')[label]}/{path.name}")
            infos.append(w.info)
        start += n
    mean = pixels / (2 * PER_CLASS["train"])
    manifest = Manifest(
        classes=["Cat", "Dog"],
        size=SIZE,
        resize="stretch",
        mean=[float(m) for m in mean],
        std=[60.0] * 3,
        shards=infos,
        counts=counts,
        stats={"kept": 2 * sum(PER_CLASS.values())},
    )
    save_manifest(manifest, root)
    return manifest


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (the ../shared/data/PetImages development copy)")
    root = tmp_path_factory.mktemp("passes")
    write_real_shards(root / "shards")
    folder = root / "photos"
    skip = sum(PER_CLASS.values())
    for cls in ("Cat", "Dog"):
        (folder / cls).mkdir(parents=True)
        for p in photos(cls)[skip : skip + PREDICT_PER_CLASS]:
            os.symlink(p, folder / cls / p.name)
    for name, data in BROKEN.items():
        (folder / "Dog" / name).write_bytes(data)
    os.symlink(folder / "gone.jpg", folder / "Dog" / "broken_link.jpg")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    with standalone_cluster(
        workers=2, cores_per_worker=1, memory="1g", work_dir=tmp_path_factory.mktemp("cluster")
    ) as c:
        yield c
    assert leftover_pids(c) == [], "master/worker/executor processes outlived the cluster"


@pytest.fixture(scope="module")
def trained(work: Path, cluster: Cluster) -> dict[str, object]:
    """The preset trained locally and with --master spark://... (the local run beside the cluster's)."""
    data = str(work / "shards")
    local = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "catsdogs.cli",
            "train",
            "--data",
            data,
            "--output",
            str(work / "local"),
            *PRESET,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log = ok(cli("train", "--data", data, "--output", str(work / "remote"), *PRESET, *on(cluster)))
    finally:
        local_log, _ = local.communicate(timeout=600)
    assert local.returncode == 0, local_log[-4000:]
    return {"local": work / "local", "remote": work / "remote", "log": log, "local_log": local_log}


def test_frozen_training_on_the_cluster_gives_the_local_head(
    trained: dict[str, object], cluster: Cluster
) -> None:
    from catsdogs.checkpoint import load_checkpoint

    log = str(trained["log"])
    # One task per shard (4 train + 2 val), spread over both workers' executors, each of which built
    # the calibrated int8 engine once (processes and builds: 2 each, for 6 tasks).
    assert (
        f"features train+val (openvino-int8): 160 images in 6 Spark tasks on {cluster.master_url} "
        f"(2 executor processes, 2 engine builds)"
    ) in log, log[-3000:]
    assert "calibrating the int8 graph on 32 training images" in log  # on the driver, once
    assert "Spark tasks" not in str(trained["local_log"])  # a local master keeps the in-process pass
    local, remote = (load_checkpoint(Path(str(trained[k])) / "best.pt") for k in ("local", "remote"))
    assert remote["engine"] == local["engine"]
    assert remote["metrics"]["val_acc"] == local["metrics"]["val_acc"] > 0.6  # chance: 0.5 (64 px, int8)
    w_local, w_remote = (
        local["model_state"]["_fc.weight"].numpy(),
        remote["model_state"]["_fc.weight"].numpy(),
    )
    np.testing.assert_allclose(w_remote, w_local, rtol=1e-4, atol=1e-5 * np.abs(w_local).max())
    np.testing.assert_allclose(
        remote["model_state"]["_fc.bias"].numpy(),
        local["model_state"]["_fc.bias"].numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    assert remote["ood"]["threshold"] == pytest.approx(local["ood"]["threshold"], rel=1e-4)
    assert remote["temperature"] == pytest.approx(local["temperature"], rel=1e-4)


def test_a_head_streamed_from_the_executors_feature_shards_is_the_in_memory_head(
    trained: dict[str, object], work: Path, cluster: Cluster
) -> None:
    """--head-memory-mb 0: the executors' float16 feature shards stay on disk and the head and detector
    are fitted by passes over them; the same validation accuracy and weights as the local in-memory fit."""
    from catsdogs.checkpoint import load_checkpoint

    out = work / "streamed"
    data = str(work / "shards")
    log = ok(cli("train", "--data", data, "--output", str(out), *PRESET, "--head-memory-mb", "0",
                 *on(cluster)))
    assert "features via Parquet feature shards" in log, log[-3000:]
    local, streamed = (load_checkpoint(p / "best.pt") for p in (Path(str(trained["local"])), out))
    assert streamed["metrics"]["val_acc"] == local["metrics"]["val_acc"]
    assert streamed["metrics"]["C"] == local["metrics"]["C"]
    w_local, w_streamed = (c["model_state"]["_fc.weight"].numpy() for c in (local, streamed))
    print("max relative weight difference", np.abs(w_streamed - w_local).max() / np.abs(w_local).max())
    np.testing.assert_allclose(w_streamed, w_local, atol=1e-2 * np.abs(w_local).max())
    assert streamed["ood"]["owned_nodes"] == local["ood"]["owned_nodes"]
    from catsdogs.rundir import RunDir

    assert not RunDir(out).feature_shards.exists()  # deleted once the head is fitted


def read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [
            {k: "" if v is None else (f"{v:.6f}" if k == "probability" else str(v)) for k, v in r.items()}
            for r in pq.read_table(path).to_pylist()
        ]
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_rows(mine: list[dict[str, str]], theirs: list[dict[str, str]], tol: float) -> None:
    assert [r["path"] for r in mine] == [r["path"] for r in theirs]
    assert [(r["label"], r["error"]) for r in mine] == [(r["label"], r["error"]) for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        if a["probability"] or b["probability"]:
            assert abs(float(a["probability"]) - float(b["probability"])) <= tol, (a, b)


def test_predict_on_the_cluster_gives_the_local_rows(
    trained: dict[str, object], work: Path, cluster: Cluster
) -> None:
    run, folder = str(trained["remote"]), work / "photos"
    table = work / "photos.parquet"  # the same photos as a Parquet table of image bytes
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".txt"))
    pq.write_table(
        pa.table({"path": [str(p) for p in files], "content": [p.read_bytes() for p in files]}), table
    )
    for backend, tol in (("openvino", 1e-4), ("openvino-int8", 1e-3)):
        local, remote = work / f"local-{backend}.csv", work / f"remote-{backend}.parquet"
        ok(cli("predict", str(folder), "--run", run, "--backend", backend, "--output", str(local), *INT8))
        inputs = [str(folder)] + ([str(table)] if backend == "openvino" else [])
        log = ok(
            cli(
                "predict",
                *inputs,
                "--run",
                run,
                "--backend",
                backend,
                "--output",
                str(remote),
                *INT8,
                *on(cluster),
            )
        )
        assert "refused" not in log and "using fp32" not in log
        assert "(2 executor processes)" in log, log[-2000:]
        mine, theirs = read_rows(local), read_rows(remote)
        assert len(mine) == 2 * PREDICT_PER_CLASS + len(BROKEN) + 1
        assert {r["error"] for r in mine} == {
            "",
            "empty_file",
            "not_an_image",
            "decompression_bomb",
            "broken_link",
        }
        assert {r["label"] for r in mine} >= {"Cat", "Dog"}
        assert_same_rows(mine, theirs[: len(mine)], tol)
        if backend == "openvino":  # the table's rows: the same answers (a link's bytes are its target's)
            by_path = {r["path"]: r for r in theirs[len(mine) :]}
            assert len(by_path) == len(files) and all(
                by_path[r["path"]]["label"] == r["label"]
                for r in mine
                if r["path"] in by_path and not r["error"]
            )


def test_predict_collects_no_rows_on_the_driver(
    trained: dict[str, object], work: Path, cluster: Cluster
) -> None:
    """600 photos under spark.driver.maxResultSize=16k (their rows are ~84 KiB): each task writes its part,
    and the driver's file, or the --parts folder, holds local predict's rows in the same order."""
    folder = work / "many"
    skip = sum(PER_CLASS.values()) + PREDICT_PER_CLASS
    for cls in ("Cat", "Dog"):
        (folder / cls).mkdir(parents=True)
        for p in photos(cls)[skip : skip + 300]:
            os.symlink(p, folder / cls / p.name)
    run = str(trained["remote"])
    local, merged, split = work / "many-local.csv", work / "many-spark.csv", work / "many-parts.csv"
    ok(cli("predict", str(folder), "--run", run, "--output", str(local), *INT8))
    tight = [*on(cluster), "--spark-conf", "spark.driver.maxResultSize=16k"]
    log = ok(cli("predict", str(folder), "--run", run, "--output", str(merged), *INT8, *tight))
    assert "600 images, 0 errors" in log, log[-2000:]
    mine = read_rows(local)
    assert len(mine) == 600
    assert_same_rows(mine, read_rows(merged), 1e-3)
    ok(cli("predict", str(folder), "--run", run, "--output", str(split), "--parts", *INT8, *tight))
    names = sorted(p.name for p in split.iterdir())
    assert names[0] == "_SUCCESS" and len(names) > 2, names
    assert all(n.startswith("part-") and n.endswith(".csv") for n in names[1:]), names
    assert_same_rows(mine, [r for n in names[1:] for r in read_rows(split / n)], 1e-3)
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_killed_driver_leaves_no_output(trained: dict[str, object], work: Path, cluster: Cluster) -> None:
    """SIGKILL mid-job: no file under the output's name, and the cluster ends the application."""
    folder = work / "slow"
    folder.mkdir()
    for p in sorted((work / "photos" / "Cat").iterdir())[:20]:
        os.symlink(p.resolve(), folder / p.name)
    fifo = folder / "zz_slow.jpg"  # a read that blocks until this test writes: a task is surely mid-job
    os.mkfifo(fifo)
    out = work / "killed" / "rows.csv"
    out.parent.mkdir()
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "catsdogs.cli",
            "predict",
            str(folder),
            "--run",
            str(trained["remote"]),
            "--output",
            str(out),
            *INT8,
            *on(cluster),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    writer = None
    while writer is None and time.monotonic() < deadline and driver.poll() is None:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds once an executor reads it
        except OSError:
            time.sleep(0.2)
    assert writer is not None, f"no executor opened the input (driver exit code {driver.poll()})"
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    os.close(writer)  # the task reads an empty file and goes on; its application is gone anyway
    # Nothing that looks complete: at most the tasks' hidden staging folder of parts, never rows.csv
    left = sorted(p.name for p in out.parent.iterdir())
    assert all(name.startswith(".rows.csv.parts-") for name in left), left
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (
        cluster.status().get("activeapps") or pids_under(cluster.work_dir / "work")
    ):
        time.sleep(0.5)
    assert not cluster.status().get("activeapps"), "the killed driver's application is still running"
    assert pids_under(cluster.work_dir / "work") == [], "executors outlived the killed driver"
    os.unlink(fifo)


def test_evaluate_and_audit_on_the_cluster_give_the_local_results(
    trained: dict[str, object], work: Path, cluster: Cluster
) -> None:
    run = str(trained["remote"])
    results = {}
    for name, flags in (("local", []), ("remote", on(cluster))):
        out = work / f"eval-{name}"
        log = ok(cli("evaluate", "--run", run, "--output", str(out), *INT8, *flags))
        if flags:
            assert "evaluate test: 40 images in 2 Spark tasks" in log, log[-2000:]
        audit = work / f"audit-{name}"
        ok(
            cli(
                "audit",
                "--data",
                str(work / "shards"),
                "--output",
                str(audit),
                "--size",
                str(SIZE),
                "--run",
                run,
                *flags,
            )
        )
        results[name] = (
            json.loads((out / "metrics.json").read_text()),
            (out / "predictions.csv").read_text(),
            (audit / "issues.csv").read_text(),
        )
    (m_local, p_local, a_local), (m_remote, p_remote, a_remote) = results["local"], results["remote"]
    for key in ("accuracy", "errors", "unknown_share", "engine"):
        assert m_remote[key] == m_local[key], key
    assert m_remote["log_loss"] == pytest.approx(m_local["log_loss"], rel=1e-3)
    local_rows = list(csv.DictReader(io.StringIO(p_local)))
    remote_rows = list(csv.DictReader(io.StringIO(p_remote)))
    assert [(r["shard"], r["row"], r["pred"], r["unknown"]) for r in remote_rows] == [
        (r["shard"], r["row"], r["pred"], r["unknown"]) for r in local_rows
    ]
    assert a_remote == a_local


def test_compact_shards_give_the_uint8_shards_labels(
    trained: dict[str, object], work: Path, cluster: Cluster
) -> None:
    """The same photos as PNG- and JPEG-in-Parquet shards, decoded in the executors' pass: fewer bytes;
    PNG (lossless) gives evaluate's very labels, JPEG moves probabilities a little and flips only photos
    the uint8 answer had at the boundary (at this test's 64 px; docs/benchmarks/compact_shards.md
    measures the default 260 px)."""
    sizes, answers = {}, {}
    for fmt in ("npy", "png", "jpeg"):
        data = work / "shards" if fmt == "npy" else work / f"shards-{fmt}"
        if fmt != "npy":
            write_real_shards(data, fmt=fmt)
        sizes[fmt] = sum(p.stat().st_size for p in data.rglob("*.*") if p.suffix in (".npy", ".parquet"))
        out = work / f"eval-{fmt}-shards"
        flags = [] if fmt == "npy" else on(cluster)
        run = str(trained["remote"])
        ok(cli("evaluate", "--run", run, "--data", str(data), "--output", str(out), *INT8, *flags))
        with (out / "predictions.csv").open() as fh:
            answers[fmt] = [(r["shard"], r["row"], r["pred"], float(r["p_Cat"])) for r in csv.DictReader(fh)]
    assert 2 * sizes["jpeg"] < sizes["png"] < sizes["npy"], sizes  # at 64 px; 260 px saves more
    assert len(answers["npy"]) == 2 * PER_CLASS["test"]
    assert [a[:3] for a in answers["png"]] == [a[:3] for a in answers["npy"]]
    moved = [abs(a[3] - b[3]) for a, b in zip(answers["npy"], answers["jpeg"], strict=True)]
    assert np.mean(moved) < 0.05, np.mean(moved)
    flipped = [a for a, b in zip(answers["npy"], answers["jpeg"], strict=True) if a[2] != b[2]]
    assert all(abs(a[3] - 0.5) < 0.1 for a in flipped), flipped


def test_executors_without_the_packages_are_one_line(cluster: Cluster, tmp_path: Path) -> None:
    """An executor Python without site-packages: the probe names the missing package, nothing runs."""
    from tests.fixtures import make_run

    run = make_run(tmp_path / "run")
    img = tmp_path / "a.jpg"
    img.write_bytes(jpeg_bytes(synthetic_image(0, 32)))
    bare = tmp_path / "bare-python"  # an interpreter without site-packages: no numpy, torch or catsdogs
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    never = tmp_path / "never.csv"
    proc = cli("predict", str(img), "--run", str(run), "--backend", "torch", "--output", str(never),
               *on(cluster), "--spark-conf", f"spark.pyspark.python={bare}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"catsdogs predict: error: the executors of {cluster.master_url} cannot import 'numpy' "
        "(ModuleNotFoundError: No module named 'numpy'): install catsdogs and its dependencies on every node "
        "(the same venv: make install), or point --spark-conf spark.pyspark.python=PATH at a Python that has "
        "them"], proc.stderr[-3000:]
    assert not never.exists()


def test_freeze_backbone_distributed_2_is_the_feature_pass_in_two_spark_tasks(
    trained: dict[str, object], work: Path
) -> None:
    """Without a cluster: --distributed 2 runs the pass as 2 Spark tasks on the local master.

    What docs/cluster.md says the flag means; above the shard count it is refused in one line.
    """
    from catsdogs.checkpoint import load_checkpoint

    out = work / "two"
    log = ok(cli("train", "--data", str(work / "shards"), "--output", str(out), *PRESET,
                 "--distributed", "2"))
    assert "features train+val (openvino-int8): 160 images in 2 Spark tasks on local[*]" in log, log[-3000:]
    local, two = load_checkpoint(Path(str(trained["local"])) / "best.pt"), load_checkpoint(out / "best.pt")
    assert two["metrics"]["val_acc"] == local["metrics"]["val_acc"]
    np.testing.assert_allclose(
        two["model_state"]["_fc.weight"].numpy(),
        local["model_state"]["_fc.weight"].numpy(),
        rtol=1e-4,
        atol=1e-4,
    )
    proc = cli(
        "train", "--data", str(work / "shards"), "--output", str(work / "seven"), *PRESET,
        "--distributed", "7",
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "catsdogs train: error: --distributed 7 exceeds the 6 train and val shards of "
        f"{str(work / 'shards')!r} (each Spark task reads whole shards); lower --distributed or re-run "
        "catsdogs preprocess with a smaller --shard-rows"
    ], proc.stderr


def test_bad_cluster_input_is_one_line_before_any_work(tmp_path: Path) -> None:
    """An unreachable master and an existing output: one line naming the fix, no JVM started."""
    from catsdogs.cluster.standalone import free_port
    from tests.fixtures import make_run, make_shards

    run = make_run(tmp_path / "run")
    img = tmp_path / "a.jpg"
    img.write_bytes(jpeg_bytes(synthetic_image(0, 32)))
    port = free_port()
    t0 = time.monotonic()
    proc = cli(
        "predict",
        str(img),
        "--run",
        str(run),
        "--output",
        str(tmp_path / "o.csv"),
        "--master",
        f"spark://127.0.0.1:{port}",
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"catsdogs predict: error: --master spark://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} "
        "(Connection refused); start the Spark master there (python -m catsdogs.cluster.standalone "
        "starts one on this machine) or fix --master"
    ], proc.stderr
    make_shards(tmp_path / "shards", counts={"train": 8, "val": 4})
    proc = cli(
        "train",
        "--data",
        str(tmp_path / "shards"),
        "--output",
        str(tmp_path / "t"),
        "--model",
        "effnet_lite0",
        "--freeze",
        "backbone",
        "--master",
        f"spark://127.0.0.1:{port}",
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"catsdogs train: error: --master spark://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} "
        "(Connection refused); start the Spark master there (python -m catsdogs.cluster.standalone "
        "starts one on this machine) or fix --master"
    ], proc.stderr
    (tmp_path / "o.csv").write_text("path,label\n")
    proc = cli(
        "predict", str(img), "--run", str(run), "--output", str(tmp_path / "o.csv"), "--master", "local[2]"
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"catsdogs predict: error: --output {str(tmp_path / 'o.csv')!r} already exists; remove it or choose "
        "another --output (predict --master never replaces a finished result)"
    ], proc.stderr
    assert time.monotonic() - t0 < 60  # no Spark session was started for any of them
