"""Input and output by s3a:// URI against a real local S3 server: Spark tasks read the images and
upload the shards, the driver publishes the manifest last, train/evaluate read a verified cache."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from catsdogs.config import EvaluateConfig, PreprocessConfig, TrainConfig, build_config
from catsdogs.errors import ConfigError, OutputExistsError, SchemaError, TooManySkippedError
from catsdogs.io import storage
from catsdogs.preprocess.command import preprocess
from catsdogs.preprocess.listing import scan_input, scan_remote
from catsdogs.shards.cache import cache_folder, local_shards
from tests.fixtures import make_image_tree, make_shards
from tests.s3 import ENV as S3_ENV
from tests.s3 import download_tree, make_bucket, s3_server

pytestmark = pytest.mark.slow


def _put(uri: str, data: bytes) -> None:
    """Write ``data`` to a remote file through the product's own upload (a test's way to seed the store)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "object"
        local.write_bytes(data)
        storage.upload(local, uri)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with s3_server() as endpoint:
        make_bucket("pets")
        yield endpoint


@pytest.fixture(scope="module")
def spark(s3: str) -> Iterator[object]:
    from catsdogs.spark import get_spark

    # The Spark JVM (and so the Python workers' environment) may have been launched by an earlier
    # test module, before the S3 settings existed: hand the credentials to the executors the way
    # docs/cluster.md tells cluster users to (the endpoint is forwarded by catsdogs itself).
    creds = {f"spark.executorEnv.{k}": v for k, v in S3_ENV.items() if "KEY" in k}
    session = get_spark("local[2]", "catsdogs-tests-s3", {"spark.sql.shuffle.partitions": "2", **creds})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def tree(s3: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The odd-files fixture tree, locally and uploaded under s3a://pets/PetImages (no symlinks: S3
    has none, so the broken link is dropped from both)."""
    root = tmp_path_factory.mktemp("s3src") / "PetImages"
    make_image_tree(root, per_class=14)
    (root / "Dog" / "broken_link.jpg").unlink()
    (root / "Cat" / ".thumbnails").mkdir()
    (root / "Cat" / ".thumbnails" / "t.jpg").write_bytes(b"x")
    uri = "s3a://pets/PetImages"
    storage.upload_tree(root, uri)
    return root, uri


def cfg(input_: str, output: str, **kw: object) -> PreprocessConfig:
    return build_config(PreprocessConfig, {"input": input_, "output": output, "size": 16, "shard_rows": 7,
                                           "master": "local[2]", **kw})


def outputs(root: Path) -> dict[str, object]:
    from catsdogs.io.checksum import sha256_file

    m = json.loads((root / "manifest.json").read_text())
    return {"files_csv": (root / "files.csv").read_text(),
            "shards": {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*.npy"))},
            "manifest": {k: m[k] for k in ("shards", "counts", "normalization", "skipped", "ignored")}}


def test_remote_listing_matches_local(tree: tuple[Path, str]) -> None:
    local, uri = tree
    a, b = scan_input(local), scan_remote(uri)
    # Same classes and files; the order may differ (a walk lists a folder's files before its
    # subfolders, S3 lists keys in byte order), and nothing downstream depends on it.
    assert a.classes == b.classes
    assert sorted(a.candidates, key=lambda c: c.path) == sorted(b.candidates, key=lambda c: c.path)
    assert sorted(a.ignored, key=lambda i: i.path) == sorted(b.ignored, key=lambda i: i.path)
    assert b.root == uri


def test_s3_to_s3_gives_the_same_shards_as_local(spark: object, tree: tuple[Path, str],
                                                 tmp_path: Path) -> None:
    local_src, uri = tree
    ref = preprocess(cfg(str(local_src), str(tmp_path / "local")), spark=spark, progress=False)  # type: ignore[arg-type]
    m = preprocess(cfg(uri, "s3a://pets/shards"), spark=spark, progress=False)  # type: ignore[arg-type]
    assert m.stats["kept"] == ref.stats["kept"] and m.skipped == ref.skipped and len(m.skipped) == 5
    names = [rel for rel, _ in storage.list_files("s3a://pets")]
    assert not [n for n in names if ".tmp-" in n], "the temporary prefix was left behind"
    got = tmp_path / "fetched"
    download_tree("s3a://pets/shards", got)
    assert outputs(got) == outputs(tmp_path / "local")
    assert json.loads((got / "config.json").read_text())["output"] == "s3a://pets/shards"

    # Train and evaluate straight from the URI: a verified local copy, then the usual readers.
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    from catsdogs.cli import main as cli_main

    assert cli_main(["train", "--data", "s3a://pets/shards", "--cache-dir", str(cache), "--output", str(run),
                     "--epochs", "1", "--batch-size", "8", "--threads", "1"]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == "s3a://pets/shards"
    local = cache_folder("s3a://pets/shards", cache)
    assert outputs(local) == outputs(tmp_path / "local")
    assert cli_main(["evaluate", "--run", str(run), "--threads", "1"]) == 0  # the run's own --data
    assert json.loads((run / "eval" / "metrics.json").read_text())["n"] == m.counts["test"]["Cat"] + \
        m.counts["test"]["Dog"]


def test_cache_refetches_a_damaged_copy_and_refuses_damaged_remote(s3: str, tmp_path: Path) -> None:
    src = tmp_path / "shards"
    make_shards(src, counts={"train": 20, "val": 6, "test": 6}, shard_rows=10)
    storage.upload_tree(src, "s3a://pets/cached")
    first = Path(local_shards("s3a://pets/cached", tmp_path / "c", quiet=True))
    x0 = first / "train" / "X_part_00000.npy"
    good = x0.read_bytes()
    x0.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # a flipped bit in the cache
    assert Path(local_shards("s3a://pets/cached", tmp_path / "c", quiet=True)) == first
    assert x0.read_bytes() == good
    _put("s3a://pets/cached/train/X_part_00000.npy", good[:-1])  # damaged at the source
    x0.unlink()
    with pytest.raises(SchemaError, match="sha256"):
        local_shards("s3a://pets/cached", tmp_path / "c", quiet=True)
    assert not (first / "manifest.json").exists(), "an incomplete cache must not look complete"
    # A Spark task fetching that shard for itself refuses it the same way.
    from catsdogs.cluster.shardjob import opened
    from catsdogs.shards.cache import fetch_manifest

    manifest = fetch_manifest("s3a://pets/cached")
    with pytest.raises(SchemaError, match="sha256"), \
            opened("s3a://pets/cached", manifest.split_shards("train")[0], manifest.size):
        pass
    with pytest.raises(SchemaError, match="--data"):
        local_shards("s3a://pets/nothing-here", tmp_path / "c", quiet=True)


def test_existing_output_and_failed_runs(spark: object, tree: tuple[Path, str], tmp_path: Path) -> None:
    _, uri = tree
    out = "s3a://pets/out2"
    first = preprocess(cfg(uri, out), spark=spark, progress=False)  # type: ignore[arg-type]
    before = sorted(storage.list_files(out))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        preprocess(cfg(uri, out), spark=spark, progress=False)  # type: ignore[arg-type]
    # A run that fails after its tasks wrote shards leaves the old output as it was, and no temp prefix.
    with pytest.raises(TooManySkippedError):
        preprocess(cfg(uri, out, overwrite=True, max_skip_frac=0.01), spark=spark, progress=False)  # type: ignore[arg-type]
    assert sorted(storage.list_files(out)) == before
    assert not [n for n, _ in storage.list_files("s3a://pets") if ".tmp-" in n]
    # --overwrite replaces it (other size: every shard differs) and the manifest is the new one.
    m = preprocess(cfg(uri, out, overwrite=True, size=8), spark=spark, progress=False)  # type: ignore[arg-type]
    remote = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert remote["image"]["size"] == 8 and m.stats["kept"] == first.stats["kept"]
    # A prefix with files but no manifest is never replaced, and a whole bucket is never an output.
    _put("s3a://pets/precious/thesis.tex", b"...")
    with pytest.raises(OutputExistsError, match="manifest.json"):
        preprocess(cfg(uri, "s3a://pets/precious", overwrite=True), spark=spark, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="whole bucket"):
        preprocess(cfg(uri, "s3a://elsewhere", overwrite=True), spark=spark, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nested"):
        preprocess(cfg(uri, f"{uri}/shards"), spark=spark, progress=False)  # type: ignore[arg-type]


def test_remote_input_errors_name_the_flag(s3: str, tmp_path: Path) -> None:
    from catsdogs.cli import main as cli_main

    _put("s3a://pets/one/Cat/a.jpg", b"x")
    cases = {"s3a://pets/empty": "holds no files", "s3a://pets/one": "two class subfolders",
             "s3a://pets/one/Cat/a.jpg": "is a file", "s3a://no-such-bucket/x": "--input"}
    for uri, words in cases.items():
        with pytest.raises(Exception, match=words):
            preprocess(cfg(uri, str(tmp_path / "o")), progress=False)
        assert cli_main(["preprocess", "--input", uri, "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_remote_uris_only_where_supported() -> None:
    assert build_config(TrainConfig, {"data": "s3a://b/shards"}).data == "s3a://b/shards"
    assert build_config(EvaluateConfig, {"data": "hdfs://nn:8020/shards"}).data == "hdfs://nn:8020/shards"
    with pytest.raises(ConfigError, match="--output .*only --input/--output"):
        build_config(TrainConfig, {"data": "s3a://b/shards", "output": "s3a://b/run"})
    with pytest.raises(ConfigError, match="gs:// is not supported"):
        build_config(PreprocessConfig, {"input": "gs://b/pets", "output": "/tmp/x"})


def test_hdfs_without_libhdfs_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hadoop install here: the error must say what hdfs:// needs, in one line, naming the flag."""
    for var in ("HADOOP_HOME", "ARROW_LIBHDFS_DIR"):
        monkeypatch.delenv(var, raising=False)
    storage._hdfs.cache_clear()  # noqa: SLF001
    if shutil.which("hadoop") or os.environ.get("CLASSPATH"):
        pytest.skip("a Hadoop client is installed here; the message for a missing one cannot be shown")
    from catsdogs.cli import main as cli_main

    with pytest.raises(storage.StorageError, match="HADOOP_HOME.*hadoop classpath"):
        scan_remote("hdfs://127.0.0.1:1/pets")
    assert cli_main(["preprocess", "--input", "hdfs://127.0.0.1:1/pets", "--output", "/tmp/never"]) == 2


def test_parquet_shards_on_s3_train_and_distributed_preflight_fills_the_cache(
        spark: object, tree: tuple[Path, str], tmp_path: Path) -> None:
    """--format parquet goes through the same upload; --distributed on a local master fetches once."""
    from catsdogs.train.launch import preflight

    _, uri = tree
    m = preprocess(cfg(uri, "s3a://pets/pq", format="parquet"), spark=spark, progress=False)  # type: ignore[arg-type]
    keys = {rel for rel, _ in storage.list_files("s3a://pets/pq")}
    assert {s.x for s in m.shards} <= keys and all(k.endswith(".parquet") for k in keys
                                                   if k.startswith(("train/", "val/", "test/")))
    train = build_config(TrainConfig, {"data": "s3a://pets/pq", "output": str(tmp_path / "run"),
                                       "cache_dir": str(tmp_path / "cache"), "distributed": 2,
                                       "master": "local[2]"})
    preflight(train)
    local = cache_folder("s3a://pets/pq", tmp_path / "cache")
    assert (local / "manifest.json").is_file() and all((local / s.x).is_file() for s in m.shards)
    from catsdogs.cli import main as cli_main

    assert cli_main(["train", "--data", "s3a://pets/pq", "--cache-dir", str(tmp_path / "cache"), "--output",
                     str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--threads", "1"]) == 0
    assert (tmp_path / "run" / "best.pt").is_file()


def test_upload_that_the_store_mangles_is_an_error(s3: str, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """Without credentials the AWS SDK sends an unsigned chunked upload, which this S3 server stores
    with the chunk framing: the size check after the upload turns that into an error, not a bad shard."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup off EC2
    storage._s3.cache_clear()  # noqa: SLF001
    try:
        blob = tmp_path / "x.npy"
        blob.write_bytes(os.urandom(5000))
        with pytest.raises(storage.StorageError, match=r"kept \d+ bytes of the 5000 sent"):
            storage.upload(blob, "s3a://pets/mangled/x.npy")
    finally:
        storage._s3.cache_clear()  # noqa: SLF001 - later tests sign their requests again


def test_hdfs_uris_end_to_end_with_a_local_stand_in_for_libhdfs(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """hdfs:// through the real driver code (listing, temporary folder, publish, manifest last, cache),
    with only the libhdfs client replaced by pyarrow's local file system rooted at a folder. No HDFS can
    run here (docs/cluster.md), and Spark's separate workers would not see the stand-in, so the shard
    tasks run in this process."""
    import types

    import pyarrow.fs as pafs

    import catsdogs.preprocess.command as pp
    from catsdogs.preprocess import job, task

    namenode = tmp_path / "namenode"
    namenode.mkdir()
    monkeypatch.setattr(storage, "_hdfs", lambda host, port, user: pafs.SubTreeFileSystem(
        str(namenode), pafs.LocalFileSystem()))

    def run_inline(spark: object, plans: list, settings: task.TaskSettings, **kw: object) -> list:
        return [row for p in plans for row in job._columns_to_rows(  # noqa: SLF001
            task.process_shard(settings, p.split, p.index, list(p.paths), list(p.labels)))]

    monkeypatch.setattr(pp, "run_shard_tasks", run_inline)
    inline = types.SimpleNamespace(version="inline", sparkContext=types.SimpleNamespace(master="inline"))
    src = tmp_path / "PetImages"
    make_image_tree(src, per_class=8)
    (src / "Dog" / "broken_link.jpg").unlink()
    hdfs = "hdfs://namenode:8020/user/me"
    storage.upload_tree(src, f"{hdfs}/PetImages")
    ref = preprocess(cfg(str(src), str(tmp_path / "local")), spark=inline, progress=False)  # type: ignore[arg-type]
    m = preprocess(cfg(f"{hdfs}/PetImages", f"{hdfs}/shards"), spark=inline, progress=False)  # type: ignore[arg-type]
    assert m.stats["kept"] == ref.stats["kept"] and m.skipped == ref.skipped
    assert sorted(p.name for p in (namenode / "user" / "me").iterdir()) == ["PetImages", "shards"]
    local = Path(local_shards(f"{hdfs}/shards", tmp_path / "cache", quiet=True))
    assert outputs(local) == outputs(tmp_path / "local")
    with pytest.raises(OutputExistsError):
        preprocess(cfg(f"{hdfs}/PetImages", f"{hdfs}/shards"), spark=inline, progress=False)  # type: ignore[arg-type]
    preprocess(cfg(f"{hdfs}/PetImages", f"{hdfs}/shards", overwrite=True, size=8), spark=inline,
               progress=False)  # type: ignore[arg-type]
    assert json.loads((namenode / "user/me/shards/manifest.json").read_text())["image"]["size"] == 8
    assert sorted(p.name for p in (namenode / "user" / "me").iterdir()) == ["PetImages", "shards"]


def test_stale_remote_temp_prefixes_of_dead_runs_only_are_removed(spark: object, tree: tuple[Path, str]
                                                                  ) -> None:
    """Like local temp folders: a killed run's prefix (this host, pid gone) goes; live or foreign stay."""
    import socket
    import subprocess
    import sys

    _, uri = tree
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"dead": f"st.tmp-{host}-{dead.pid}-aaaa", "live": f"st.tmp-{host}-{live.pid}-bbbb",
             "other_host": f"st.tmp-elsewhere-{dead.pid}-cccc", "unrelated": "st.tmp-x"}
    try:
        for name in names.values():
            _put(f"s3a://pets/{name}/train/X_part_00000.npy", b"half")
        preprocess(cfg(uri, "s3a://pets/st"), spark=spark, progress=False)  # type: ignore[arg-type]
        left = {k for k, name in names.items() if storage.list_files(f"s3a://pets/{name}")}
        assert left == {"live", "other_host", "unrelated"}
        assert storage.file_type("s3a://pets/st/manifest.json") == "file"
    finally:
        live.kill()
        live.wait()
