"""Checkpoints that rebuild their model alone, written atomically, loaded with ``weights_only``.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled classes), so it loads
with ``torch.load(weights_only=True)``: opening an untrusted file cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs import schema
from catsdogs.errors import CheckpointError
from catsdogs.fsutil import atomic_save


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename)."""
    atomic_save(path, lambda fh: torch.save(state, fh))


def resolve_checkpoint(run: str | Path, name: str = schema.BEST_CKPT) -> Path:
    """Return the checkpoint file for a run folder (or the file itself); explain what is missing."""
    p = Path(run)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"run {str(p)!r} does not exist (fix --run)")
    for candidate in (p / name, p / schema.LAST_CKPT):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"run folder {str(p)!r} has no {name} or {schema.LAST_CKPT}; train first with "
        f"'catsdogs train --out {p}' or fix --run"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``); bad files raise CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    missing = [k for k in (schema.CKPT_MODEL_STATE, schema.CKPT_MODEL_CONFIG, schema.CKPT_CLASSES,
                           schema.CKPT_NORM, schema.CKPT_IMAGE) if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; retrain it")
    return state


def build_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model described by a checkpoint and load its weights strictly.

    ``pretrained=False`` skips loading ImageNet weights: the checkpoint's own weights replace them.
    """
    from catsdogs.models import build_model

    mc = dict(state[schema.CKPT_MODEL_CONFIG])
    model = build_model(mc.pop("name"), **{**mc, "pretrained": False})
    model.load_state_dict(state[schema.CKPT_MODEL_STATE], strict=True)
    model.eval()
    return model
