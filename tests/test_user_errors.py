"""User mistakes get one clear line and exit 2, never a traceback; ``--debug`` shows the traceback.

Every case runs through ``catsdogs.cli.main`` in-process (as the console script does); one runs
through the real ``catsdogs`` executable. The HTTP side answers mistakes with 4xx JSON errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI

from catsdogs import rundir, schema
from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig
from catsdogs.errors import CatsdogsError
from tests.fixtures import make_image_tree, make_run, make_shards

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx in its TestClient
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
CATSDOGS = ROOT / ".venv" / "bin" / "catsdogs"


@dataclass
class World:
    """Valid and broken inputs shared by the cases (built once per module)."""

    base: Path
    tree: Path
    shards: Path
    run: Path

    def p(self, name: str) -> str:
        return str(self.base / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("mistakes")
    tree = base / "PetImages"
    make_image_tree(tree, per_class=3, odd=False)
    shards = base / "shards"
    make_shards(shards, counts={"train": 40, "val": 10, "test": 10}, size=16, shard_rows=20)
    run = make_run(base / "run", size=16, data=str(shards))
    (base / "empty").mkdir()
    one = base / "one_class" / "Cat"
    one.mkdir(parents=True)
    shutil.copy(tree / "Cat" / "0.jpg", one / "0.jpg")
    no_images = base / "no_images"
    for cls in ("Cat", "Dog"):
        (no_images / cls).mkdir(parents=True)
    (no_images / "Cat" / "notes.txt").write_text("not an image")
    shutil.copy(tree / "Cat" / "0.jpg", no_images / "Dog" / "0.jpg")
    old = base / "old_schema"
    shutil.copytree(shards, old)
    manifest = json.loads((old / schema.MANIFEST_NAME).read_text())
    (old / schema.MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 0}))
    interrupted = base / "interrupted"
    shutil.copytree(shards, interrupted)
    (interrupted / schema.MANIFEST_NAME).unlink()  # what a killed preprocess would leave, at worst
    no_ckpt = base / "run_without_ckpt"
    shutil.copytree(run, no_ckpt)
    for name in (rundir.BEST_CKPT, rundir.LAST_CKPT):
        (no_ckpt / name).unlink()
    bad_ckpt = base / "run_with_garbage_ckpt"
    shutil.copytree(run, bad_ckpt)
    for name in (rundir.BEST_CKPT, rundir.LAST_CKPT):
        data = (bad_ckpt / name).read_bytes()
        (bad_ckpt / name).write_bytes(data[: len(data) // 2])  # half-written: not loadable
    (base / "img.jpg").write_bytes((tree / "Cat" / "0.jpg").read_bytes())
    return World(base=base, tree=tree, shards=shards, run=run)


# (case id, argv builder, substrings the one stderr line must contain: the problem and what to fix)
Case = tuple[str, Callable[[World], list[str]], tuple[str, ...]]
CASES: list[Case] = [
    ("preprocess-missing-input",
     lambda w: ["preprocess", "--input", w.p("nope"), "--output", w.p("o1")], ("does not exist", "--input")),
    ("preprocess-no-input-flag",
     lambda w: ["preprocess", "--output", w.p("o1")], ("no input folder", "--input")),
    ("preprocess-empty-input",
     lambda w: ["preprocess", "--input", w.p("empty"), "--output", w.p("o1")],
     ("at least two class subfolders", "found none", "--input")),
    ("preprocess-one-class",
     lambda w: ["preprocess", "--input", w.p("one_class"), "--output", w.p("o1")],
     ("at least two class subfolders", "only 'Cat'", "--input")),
    ("preprocess-class-without-images",
     lambda w: ["preprocess", "--input", w.p("no_images"), "--output", w.p("o1")],
     ("no image files", "Cat", "--input")),
    ("preprocess-output-exists",
     lambda w: ["preprocess", "--input", str(w.tree), "--output", str(w.shards)],
     ("already exists", "--overwrite")),
    ("preprocess-output-inside-input",
     lambda w: ["preprocess", "--input", str(w.tree), "--output", str(w.tree / "Cat" / "out")],
     ("inside --input", "--output")),
    ("preprocess-negative-size",
     lambda w: ["preprocess", "--input", str(w.tree), "--output", w.p("o1"), "--size", "-5"],
     ("--size must be positive", "-5")),
    ("preprocess-val-plus-test-ge-1",
     lambda w: ["preprocess", "--input", str(w.tree), "--output", w.p("o1"), "--val-frac", "0.5",
                "--test-frac", "0.5"], ("--val-frac + --test-frac", "0.5 + 0.5")),
    ("preprocess-frac-out-of-range",
     lambda w: ["preprocess", "--input", str(w.tree), "--output", w.p("o1"), "--val-frac", "1.5"],
     ("--val-frac must be in [0, 1)", "1.5")),
    ("preprocess-unknown-resize",
     lambda w: ["preprocess", "--input", str(w.tree), "--output", w.p("o1"), "--resize", "squash"],
     ("--resize must be one of", "squash")),
    ("train-missing-shards",
     lambda w: ["train", "--data", w.p("nope"), "--output", w.p("r1")], ("does not exist", "--data")),
    ("train-shards-from-other-schema-version",
     lambda w: ["train", "--data", w.p("old_schema"), "--output", w.p("r1")],
     ("schema_version 0", "manifest.json", "catsdogs preprocess")),
    ("train-shards-without-manifest",
     lambda w: ["train", "--data", w.p("interrupted"), "--output", w.p("r1")],
     ("no manifest.json", "not a complete shards folder", "--data")),
    ("train-unknown-model",
     lambda w: ["train", "--data", str(w.shards), "--output", w.p("r1"), "--model", "resnet9000"],
     ("unknown --model 'resnet9000'", "seed")),
    ("train-negative-lr",
     lambda w: ["train", "--data", str(w.shards), "--output", w.p("r1"), "--lr", "-0.1"], ("--lr", "-0.1")),
    ("train-zero-batch-size",
     lambda w: ["train", "--data", str(w.shards), "--output", w.p("r1"), "--batch-size", "0"],
     ("--batch-size must be positive",)),
    ("train-existing-run-without-resume",
     lambda w: ["train", "--data", str(w.shards), "--output", str(w.run)],
     ("already has last.pt", "--resume", "--output")),
    ("evaluate-run-without-checkpoint",
     lambda w: ["evaluate", "--run", w.p("run_without_ckpt")], ("has no best.pt or last.pt", "--run")),
    ("evaluate-unknown-split",
     lambda w: ["evaluate", "--run", str(w.run), "--split", "holdout"],
     ("--split must be one of", "holdout")),
    ("evaluate-shards-from-other-schema-version",
     lambda w: ["evaluate", "--run", str(w.run), "--data", w.p("old_schema")],
     ("schema_version 0", "catsdogs preprocess")),
    ("evaluate-shards-without-manifest",
     lambda w: ["evaluate", "--run", str(w.run), "--data", w.p("interrupted")], ("no manifest.json",)),
    ("predict-empty-folder",
     lambda w: ["predict", w.p("empty"), "--run", str(w.run)], ("no image files found",)),
    ("predict-run-without-checkpoint",
     lambda w: ["predict", w.p("img.jpg"), "--run", w.p("run_without_ckpt")], ("has no best.pt", "--run")),
    ("predict-missing-run",
     lambda w: ["predict", w.p("img.jpg"), "--run", w.p("nope")], ("does not exist", "--run")),
    ("predict-garbage-checkpoint",
     lambda w: ["predict", w.p("img.jpg"), "--run", w.p("run_with_garbage_ckpt")],
     ("cannot read checkpoint", "best.pt")),
    ("predict-missing-path",
     lambda w: ["predict", w.p("nope.jpg"), "--run", str(w.run)], ("does not exist", "PATHS")),
    ("predict-no-paths",
     lambda w: ["predict", "--run", str(w.run)], ("no input given", "PATHS")),
    ("predict-parts-without-master",
     lambda w: ["predict", w.p("img.jpg"), "--run", str(w.run), "--output", w.p("o.csv"), "--parts"],
     ("--parts splits the output by Spark task: add --master",)),
    ("predict-parts-to-stdout",
     lambda w: ["predict", w.p("img.jpg"), "--run", str(w.run), "--parts", "--master", "local[1]"],
     ("--parts writes a folder of part files: give it a name with --output",)),
    ("predict-bad-output-extension",
     lambda w: ["predict", w.p("img.jpg"), "--run", str(w.run), "--output", w.p("out.xlsx")],
     ("--output", ".csv, .json, .parquet")),
    ("serve-run-without-checkpoint",
     lambda w: ["serve", "--run", w.p("run_without_ckpt"), "--port", str(free_port())],
     ("has no best.pt", "--run")),
    ("serve-bad-port",
     lambda w: ["serve", "--run", str(w.run), "--port", "70000"], ("--port must be in 1..65535", "70000")),
    ("config-file-missing",
     lambda w: ["train", "--config", w.p("nope.toml")], ("does not exist", "--config")),
    ("config-file-unknown-key",
     lambda w: ["train", "--config", write(w.base / "bad.json", '{"lr": 0.1, "epochz": 3}')],
     ("unknown setting 'epochz'",)),
]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_one_clear_line(err: str, must: tuple[str, ...]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert "Traceback" not in err
    line = lines[0]
    assert line.startswith("catsdogs "), line
    for text in must:
        assert text in line, f"{text!r} not in {line!r}"
    return line


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mistake_exits_2_with_one_line(case: Case, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    _, argv, must = case
    capsys.readouterr()
    assert cli_main(argv(world)) == 2
    assert_one_clear_line(capsys.readouterr().err, must)


def test_port_in_use_exits_2(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli_main(["serve", "--run", str(world.run), "--port", str(port)]) == 2
    assert_one_clear_line(capsys.readouterr().err, (f"port {port}", "already in use", "--port"))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("preprocess-one-class",
                                                               "train-shards-from-other-schema-version")],
                         ids=lambda c: c[0])
def test_debug_shows_the_traceback(case: Case, world: World) -> None:
    _, argv, must = case
    with pytest.raises(CatsdogsError) as info:
        cli_main([*argv(world), "--debug"])
    assert must[0] in str(info.value)


def test_real_executable_one_line_and_debug_traceback(world: World) -> None:
    """The installed console script: exit 2, one line, no traceback; --debug prints the traceback."""
    if not CATSDOGS.exists():
        pytest.skip(f"{CATSDOGS} is not installed (run make install)")
    argv = [str(CATSDOGS), "train", "--data", world.p("old_schema"), "--output", world.p("r2")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_clear_line(proc.stderr, ("schema_version 0", "manifest.json"))
    proc = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "SchemaError" in proc.stderr


def test_argparse_mistakes_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong types and unknown flags are caught by argparse: exit 2, usage plus one error line."""
    for argv, must in ((["preprocess", "--size", "big"], "--size: invalid int value: 'big'"),
                       (["train", "--epocs", "3"], "unrecognized arguments: --epocs"),
                       (["fly"], "invalid choice: 'fly'")):
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("catsdogs") and must in err, err


# ------------------------------------------------------------------------------------------ HTTP


@pytest.fixture(scope="module")
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app_for(world)) as c:
        yield c


def create_app_for(world: World) -> FastAPI:
    from catsdogs.serve.app import create_app

    return create_app(ServeConfig(run=str(world.run), max_bytes=4096))


API_CASES = [
    # (case id, request kwargs, status, error code)
    ("unknown-route", {"method": "GET", "url": "/nope"}, 404, "not_found"),
    ("wrong-method", {"method": "GET", "url": "/predict"}, 405, "method_not_allowed"),
    ("json-instead-of-form", {"method": "POST", "url": "/predict", "json": {"image": "x"}}, 415,
     "unsupported_media_type"),
    ("form-without-file", {"method": "POST", "url": "/predict", "files": {"note": (None, "hi")}}, 400,
     "missing_file"),
    ("wrong-field-name", {"method": "POST", "url": "/predict", "files": {"image": ("a.jpg", b"x")}}, 400,
     "missing_file"),
    ("urlencoded-form", {"method": "POST", "url": "/predict", "data": {"file": "x"}}, 415,
     "unsupported_media_type"),
    ("text-part", {"method": "POST", "url": "/predict", "files": {"file": ("a.txt", b"hello", "text/plain")}},
     415, "unsupported_media_type"),
    ("empty-file", {"method": "POST", "url": "/predict", "files": {"file": ("a.jpg", b"", "image/jpeg")}},
     400, "empty_file"),
    ("too-large", {"method": "POST", "url": "/predict",
                   "files": {"file": ("a.jpg", b"\xff" * 10_000, "image/jpeg")}}, 413, "payload_too_large"),
    ("multipart-without-boundary", {"method": "POST", "url": "/predict", "content": b"x",
                                    "headers": {"content-type": "multipart/form-data"}}, 400, "bad_request"),
    ("batch-without-files", {"method": "POST", "url": "/predict/batch", "files": {"a": (None, "b")}}, 400,
     "missing_file"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_mistakes_get_4xx_json(case: tuple[str, dict, int, str], client: TestClient) -> None:
    _, kwargs, status, error = case
    r = client.request(**kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == error and body["detail"], body
