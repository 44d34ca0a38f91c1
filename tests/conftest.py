"""Shared pytest fixtures: generated image trees and shard folders."""

from __future__ import annotations

import subprocess  # nosec B404 - a fixture runs the CLI in a child process
import sys
from pathlib import Path

import pytest

from tests.fixtures import (
    PHOTO_CLASSES,
    REAL_DATA,
    make_image_tree,
    make_shards,
    photo_variant,
)

PROJECT = Path(__file__).resolve().parents[1]
PHOTO_SIZE = 128
"""Side of the photo fixture: small enough for a quick Lite0 pass, large enough for ImageNet to see a cat."""


@pytest.fixture
def image_tree(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "PetImages"
    return root, make_image_tree(root)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    make_shards(root)
    return root


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (the ../shared/data/PetImages development copy)")
    return REAL_DATA


@pytest.fixture
def run_dir(tmp_path: Path, shards: Path) -> Path:
    from tests.fixtures import make_run

    return make_run(tmp_path / "run", data=str(shards))


TRAIN_SCRIPT = """
import sys
from pathlib import Path
opened = []
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, Path)):
        opened.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))
sys.addaudithook(hook)
from catsdogs.cli import main
code = main(sys.argv[2:])
Path(sys.argv[1]).write_text("\\n".join(opened))
sys.exit(code)
"""
"""Runs ``catsdogs ARGS`` recording every path the process opens or lists (Python's audit hooks)."""


@pytest.fixture(scope="session")
def photo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A frozen EfficientNet-Lite0 trained on real photos (crops of scikit-image's tabby cat and espresso,
    classes Cat and Coffee), in a child process that records every file it opens: (run, shards, opened)."""
    root = tmp_path_factory.mktemp("photo_run")
    make_shards(root / "shards", {"train": 80, "val": 40, "test": 40}, size=PHOTO_SIZE, classes=PHOTO_CLASSES,
                image_fn=photo_variant, shard_rows=40)
    opened = root / "opened.txt"
    cmd = [sys.executable, "-c", TRAIN_SCRIPT, str(opened), "train", "--data", str(root / "shards"),
           "--output", str(root / "run"), "--model", "effnet_lite0", "--freeze", "backbone",
           "--backend", "torch", "--threads", "1"]
    done = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=600)  # nosec B603
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run", root / "shards", opened.read_text().splitlines()


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A frozen EfficientNet-Lite0 run trained on a few hundred real photos (tests/real_run.py)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (the ../shared/data/PetImages development copy)")
    from tests.real_run import train_real_run

    return train_real_run(REAL_DATA, tmp_path_factory.mktemp("real-run"))
