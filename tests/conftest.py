"""Shared pytest fixtures: generated image trees and shard folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import REAL_DATA, make_image_tree, make_shards


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


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A frozen EfficientNet-Lite0 run trained on a few hundred real photos (tests/real_run.py)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (the ../shared/data/PetImages development copy)")
    from tests.real_run import train_real_run

    return train_real_run(REAL_DATA, tmp_path_factory.mktemp("real-run"))
