"""A real Spark standalone cluster (master + two workers): preprocessing gives byte-identical shards
to local[*]; ``train --distributed 2`` runs one DDP rank per executor (opt-in, slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catsdogs.cluster import standalone as clustermod
from catsdogs.cluster.standalone import Cluster, leftover_pids, standalone_cluster
from catsdogs.io import storage
from tests.fixtures import make_image_tree, make_shards
from tests.s3 import ENV as S3_ENV
from tests.s3 import download_tree, make_bucket, s3_server

pytestmark = pytest.mark.slow
QUICK = {"spark.driver.extraJavaOptions": clustermod.QUICK_JVM_OPTS}  # short job: start the JVM fast


def preprocess_cmd(src: Path | str, out: Path | str, master: str,
                   extra: dict[str, str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "catsdogs.cli", "preprocess", "--input", str(src), "--output", str(out),
           "--master", master, "--size", "32", "--shard-rows", "6"]
    for key, value in (extra or {}).items():
        cmd += ["--spark-conf", f"{key}={value}"]
    return cmd


def train_cmd(data: Path, out: Path, c: Cluster) -> list[str]:
    cmd = [sys.executable, "-m", "catsdogs.cli", "train", "--data", str(data), "--output", str(out),
           "--epochs", "1", "--batch-size", "4", "--distributed", "2", "--master", c.master_url]
    for key, value in c.client_conf(quick_start=True).items():
        cmd += ["--spark-conf", f"{key}={value}"]
    return cmd


def outputs(root: Path) -> dict[str, object]:
    """Everything that must not depend on where the job ran: files.csv, shard bytes, manifest facts."""
    from catsdogs.io.checksum import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    shards = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*.npy"))}
    return {
        "files_csv": (root / "files.csv").read_text(),
        "shards": shards,
        "manifest_shards": manifest["shards"],
        "counts": manifest["counts"],
        "normalization": manifest["normalization"],
        "skipped": manifest["skipped"],
    }


def images(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every kept image of a shards folder by input path: its label and its pixels."""
    import csv

    import numpy as np

    out: dict[str, tuple[int, bytes]] = {}
    with open(root / "files.csv") as fh:
        for row in csv.DictReader(fh):
            x = np.load(root / row["split"] / f"X_part_{int(row['shard']):05d}.npy", mmap_mode="r")
            out[row["path"]] = (int(row["label"]), x[int(row["row"])].tobytes())
    return out


def test_cluster_preprocess_matches_local(tmp_path: Path) -> None:
    src = tmp_path / "PetImages"
    make_image_tree(src, per_class=14)
    # The local[*] run overlaps with the cluster start-up (both mostly wait on JVM start). It is
    # also the end-to-end check that preprocess takes file:// URIs.
    local = subprocess.Popen(preprocess_cmd(src.as_uri(), (tmp_path / "local").as_uri(), "local[*]", QUICK),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with standalone_cluster(workers=2, cores_per_worker=1, work_dir=tmp_path / "cluster") as c:
            assert len(c.status()["workers"]) == 2
            proc = subprocess.run(preprocess_cmd(src, tmp_path / "remote", c.master_url,
                                                 c.client_conf(quick_start=True)),
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            # Each worker launched one executor for the app: the job really ran on the cluster.
            executor_dirs = list((c.work_dir / "work").glob("app-*/*"))
            assert len(executor_dirs) >= 2, executor_dirs
            # The same job with input and output on S3: executors read images and upload shards.
            # The workers started before the S3 settings existed, as on a real cluster: the driver
            # forwards the endpoint, credentials go through --spark-conf spark.executorEnv.*.
            with s3_server():
                make_bucket("pets")
                storage.upload_tree(src, "s3a://pets/PetImages")
                creds = {f"spark.executorEnv.{k}": v for k, v in S3_ENV.items() if "KEY" in k}
                s3_proc = subprocess.run(preprocess_cmd("s3a://pets/PetImages", "s3a://pets/shards",
                                                        c.master_url, {**c.client_conf(quick_start=True),
                                                                       **creds}),
                                         capture_output=True, text=True, timeout=300)
                assert s3_proc.returncode == 0, s3_proc.stdout + s3_proc.stderr
                download_tree("s3a://pets/shards", tmp_path / "s3")
    finally:
        out, _ = local.communicate(timeout=300)
    assert leftover_pids(c) == [], "master/worker/executor processes outlived the cluster"
    assert local.returncode == 0, out
    remote_manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    assert remote_manifest["stats"]["master"] == c.master_url
    assert outputs(tmp_path / "remote") == outputs(tmp_path / "local")
    assert len(remote_manifest["shards"]) >= 4  # several tasks, so both executors got work
    # S3 has no symlinks, so the fixture's broken link is the one file the S3 run never saw. One
    # candidate fewer shifts the split plan, so compare per image: same kept files, labels, pixels.
    s3_out, local_out = outputs(tmp_path / "s3"), outputs(tmp_path / "local")
    assert [s["path"] for s in local_out["skipped"]] == \
        sorted([s["path"] for s in s3_out["skipped"]] + ["Dog/broken_link.jpg"])  # type: ignore[attr-defined]
    assert images(tmp_path / "s3") == images(tmp_path / "local") and len(images(tmp_path / "s3")) >= 28
    assert json.loads((tmp_path / "s3" / "manifest.json").read_text())["stats"]["master"] == c.master_url


@pytest.mark.skipif(os.environ.get("CATSDOGS_CLUSTER_TRAIN") != "1",
                    reason="~60 s on 2 cores; set CATSDOGS_CLUSTER_TRAIN=1 to run DDP on a real cluster")
def test_cluster_distributed_training(tmp_path: Path) -> None:
    """``train --distributed 2 --master spark://...``: TorchDistributor runs one DDP rank per executor."""
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 80, "val": 20, "test": 20}, shard_rows=20)
    with standalone_cluster(workers=2, cores_per_worker=1, work_dir=tmp_path / "cluster") as c:
        train = subprocess.run(train_cmd(data, tmp_path / "run", c), capture_output=True, text=True,
                               timeout=300)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert leftover_pids(c) == []
    log = train.stdout + train.stderr  # ranks' output is streamed back to the driver
    assert "replicas in sync: 2 ranks" in log and "2 executor processes" in log
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "config.json", "last.pt",
                                                                   "metrics.csv"]
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 1  # header + 1 epoch


def test_cluster_stopped_when_body_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = Cluster(master_url="spark://127.0.0.1:1", ui_url="http://127.0.0.1:1", work_dir=tmp_path,
                   workers=1, cores_per_worker=1, memory="1g", tag="t")
    stopped: list[Cluster] = []
    monkeypatch.setattr(clustermod, "start_cluster", lambda *a, **k: fake)
    monkeypatch.setattr(clustermod, "stop_cluster", stopped.append)
    with pytest.raises(RuntimeError, match="boom"), standalone_cluster(work_dir=tmp_path):
        raise RuntimeError("boom")
    assert stopped == [fake]


def test_start_failure_names_the_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(clustermod.shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(clustermod.ClusterError, match="Java"):
        clustermod.start_cluster(tmp_path, workers=1)
    with pytest.raises(clustermod.ClusterError, match="at least 1 worker"):
        clustermod.start_cluster(tmp_path, workers=0)


def test_spark_submit_with_zipped_package(tmp_path: Path) -> None:
    """The documented spark-submit recipe: the wheel, renamed .zip, shipped with --py-files."""
    repo = Path(__file__).resolve().parents[1]
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(repo), "-w", str(dist)], check=True, timeout=120)
    (wheel,) = dist.glob("catsdogs-*.whl")
    package = dist / "catsdogs.zip"  # Spark puts only .zip/.egg/.jar --py-files on executors' sys.path
    package.write_bytes(wheel.read_bytes())
    src = tmp_path / "PetImages"
    make_image_tree(src, per_class=6, odd=False)
    import catsdogs.cli

    submit = clustermod.spark_home() / "bin" / "spark-submit"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1")
    proc = subprocess.run([str(submit), "--master", "local[2]", "--py-files", str(package),
                           "--driver-java-options", clustermod.QUICK_JVM_OPTS, catsdogs.cli.__file__,
                           "preprocess", "--input", str(src), "--output", str(tmp_path / "out"),
                           "--size", "32", "--shard-rows", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stats"]["master"] == "local[2]"  # spark-submit's --master wins over the default
    assert manifest["stats"]["kept"] == 12
