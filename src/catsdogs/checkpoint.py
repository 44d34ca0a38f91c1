"""Checkpoints that rebuild their model alone: the one builder, atomic saves, ``weights_only`` loads.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled classes), so it loads
with ``torch.load(weights_only=True)``: opening an untrusted file cannot run code. Every trainer
(the loop, the frozen-backbone head) builds it with :func:`build_checkpoint`, so all runs carry the
same self-describing keys; ``last.pt`` adds the resume state under its own keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs.errors import CheckpointError
from catsdogs.io.atomic import atomic_save
from catsdogs.models.factory import create_from_config

CKPT_FORMAT = "format"
"""The checkpoint's format version (:data:`FORMAT_VERSION`); one without it was written before 0.2."""
FORMAT_VERSION = 2
"""Bumped whenever what a checkpoint holds changes meaning. 2: the WordNet "what it shows" detector, resume
state in ``progress`` only. Another version is refused in one line that says how to re-create the run."""
CKPT_MODEL_STATE = "model_state"
CKPT_MODEL_CONFIG = "model_config"
"""``create_model`` arguments: name, num_classes, size and the architecture settings."""
CKPT_CLASSES = "classes"
CKPT_NORM = "normalization"
"""Input mean and std in 0..255 pixel units."""
CKPT_IMAGE = "image"
"""Image size and resize policy the model was trained on; inputs are decoded the same way."""
CKPT_TRAIN_CONFIG = "train_config"
CKPT_EPOCH = "epoch"
CKPT_METRICS = "metrics"
CKPT_OOD = "ood"
"""The out-of-distribution detector (:class:`catsdogs.models.ood.Detector` state: method, tensors,
threshold, accept rate); fitted on train, thresholded on val."""
CKPT_TEMPERATURE = "temperature"
"""Temperature scaling fitted on validation logits (float; 1.0 = unchanged)."""
CKPT_INFERENCE = "inference"
CKPT_ENGINE = "engine"
"""The ``--backend`` engine that computed a frozen-backbone run's training features (int8 only when it
passed the guard), so the checkpoint says what its head was fitted on."""
"""The run's inference settings, used by evaluate, predict and serve unless a flag overrides them:
``{"tta": bool, "reject": bool, "calibrate": bool}``."""
REQUIRED_KEYS: tuple[str, ...] = (CKPT_MODEL_STATE, CKPT_MODEL_CONFIG, CKPT_CLASSES, CKPT_NORM, CKPT_IMAGE)
"""Keys without which a checkpoint cannot rebuild and feed its model."""


def build_checkpoint(*, model_state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any],
                     classes: Sequence[str], mean: Sequence[float], std: Sequence[float], size: int,
                     resize: str, train_config: Mapping[str, Any], epoch: int,
                     metrics: Mapping[str, float], ood: Mapping[str, Any] | None = None,
                     temperature: float | None = None, inference: Mapping[str, bool] | None = None
                     ) -> dict[str, Any]:
    """Return the checkpoint dict every run writes (``best.pt``; ``last.pt`` adds resume state).

    ``ood``, ``temperature`` and ``inference`` are added once fitted (see :func:`confidence_entries`).
    """
    state = {
        CKPT_FORMAT: FORMAT_VERSION,
        CKPT_MODEL_STATE: dict(model_state),
        CKPT_MODEL_CONFIG: dict(model_config),
        CKPT_CLASSES: list(classes),
        CKPT_NORM: {"mean": list(mean), "std": list(std)},
        CKPT_IMAGE: {"size": int(size), "resize": resize},
        CKPT_TRAIN_CONFIG: dict(train_config),
        CKPT_EPOCH: int(epoch),
        CKPT_METRICS: dict(metrics),
    }
    state.update(confidence_entries(ood, temperature, inference))
    return state


def confidence_entries(ood: Mapping[str, Any] | None, temperature: float | None,
                       inference: Mapping[str, bool] | None) -> dict[str, Any]:
    """Return the detector, temperature and inference-settings keys (only those given)."""
    entries: dict[str, Any] = {}
    if ood is not None:
        entries[CKPT_OOD] = dict(ood)
    if temperature is not None:
        entries[CKPT_TEMPERATURE] = float(temperature)
    if inference is not None:
        entries[CKPT_INFERENCE] = {k: bool(v) for k, v in inference.items()}
    return entries


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename)."""
    atomic_save(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``); bad files raise CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a catsdogs checkpoint; re-create the run "
                              f"with 'catsdogs train'")
    found = state.get(CKPT_FORMAT)
    if found != FORMAT_VERSION:
        made = "by catsdogs before 0.2" if found is None else f"in format {found!r}"
        raise CheckpointError(f"checkpoint {str(path)!r} was written {made}; this catsdogs reads format "
                              f"{FORMAT_VERSION}: re-create the run with 'catsdogs train' or 'catsdogs run' "
                              f"and --overwrite")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; retrain it")
    return state


def build_from_checkpoint(state: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes, with its weights loaded strictly, in eval mode."""
    return create_from_config(state[CKPT_MODEL_CONFIG], state[CKPT_MODEL_STATE]).eval()
