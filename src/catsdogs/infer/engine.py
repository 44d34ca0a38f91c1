"""The predictor's feature engine for ``--backend``, for evaluate, predict and serve.

It decides where the graphs, the calibration images and the validation split come from.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs import checkpoint as ckpt
from catsdogs.engines.base import Engine
from catsdogs.engines.batches import SplitImages, calibration_images
from catsdogs.engines.eager import TorchEngine
from catsdogs.engines.guard import Accepts
from catsdogs.engines.names import CALIBRATION_IMAGES, TORCH
from catsdogs.engines.select import guarded_engine
from catsdogs.errors import CatsdogsError
from catsdogs.io.checksum import sha256_file
from catsdogs.rundir import RunDir
from catsdogs.schema import MANIFEST_NAME
from catsdogs.shards.manifest import Manifest, load_manifest

CALIBRATION_BATCH = 64
"""Images per forward pass of calibration and the guard (the feature pass's batch)."""


def recorded_engine(state: dict[str, Any]) -> str | None:
    """The engine a run records, which its inference runs unless ``--backend`` says; None: none recorded.

    A frozen-backbone run records the engine its head, detector and temperature were fitted on. A run that
    records none gets ``engines.names.DEFAULT_ENGINE`` (``engine_for``): an int8 engine only behind its
    guard, which also bounds the rise of "unknown" on validation, since the loop fits its detector on
    torch features.
    """
    engine = state.get(ckpt.CKPT_ENGINE)
    return str(engine) if engine else None


def calibration_shards(shards: str | None, meta: dict[str, Any], run: RunDir, size: int
               ) -> tuple[Path, Manifest] | None:
    """The local shards folder whose splits calibrate and guard an int8 engine, or None if not here.

    ``shards`` (evaluate's --data) first, then the run's training --data, then RUN/shards (where
    ``catsdogs run`` puts them); only a local folder at the model's size counts.
    """
    recorded = str(meta.get(ckpt.CKPT_TRAIN_CONFIG, {}).get("data", ""))
    for candidate in (shards, recorded, str(run.root / "shards")):
        if not candidate or "://" in candidate or not (Path(candidate) / MANIFEST_NAME).is_file():
            continue
        try:
            manifest = load_manifest(candidate)
        except CatsdogsError:
            continue
        if manifest.size == size and manifest.split_rows("val") > 0:
            return Path(candidate), manifest
    return None


def load_engine(name: str, model: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                checkpoint: Path, meta: dict[str, Any], device: torch.device, *, threads: int | None = None,
                max_drop_pt: float, shards: str | None = None, accepts: Accepts | None = None) -> Engine:
    """Build engine ``name`` for a loaded checkpoint; graphs are cached in its run folder's engine/.

    Non-torch engines run on the CPU: on a CUDA device the model stays in torch (with a note).
    ``accepts`` (the run's detector) makes the int8 guard also bound the rise of "unknown" answers.
    """
    if name == TORCH:
        return TorchEngine(model, device)
    if device.type != "cpu":
        print(f"catsdogs: --backend {name} runs on the CPU only; using torch on {device.type}",
              file=sys.stderr)
        return TorchEngine(model, device)
    run = RunDir(checkpoint.parent)
    found = calibration_shards(shards, meta, run, size)
    calibration = validation = None
    if found is not None:
        root, manifest = found
        calibration = lambda: calibration_images(  # noqa: E731
            root, manifest, mean, std, CALIBRATION_IMAGES, CALIBRATION_BATCH)
        validation = SplitImages(root, manifest, "val", mean, std, CALIBRATION_BATCH)
    try:
        return guarded_engine(name, model, size, run, sha256_file(checkpoint), threads=threads,
                              calibration=calibration, validation=validation, max_drop_pt=max_drop_pt,
                              accepts=accepts)
    except OSError as exc:  # a read-only run folder cannot hold the graphs
        print(f"catsdogs: --backend {name} needs to write {run.engine_dir} ({exc.strerror}); using torch",
              file=sys.stderr)
        return TorchEngine(model, device)
