"""Unusual images: undersized or extremely elongated originals, and near-blank pixels.

The shards hold resized pixels only, so the original width and height come from the source files'
headers (Pillow reads the header, not the pixels): that works when the input folder recorded in the
shards' ``config.json`` is a readable local folder, and is skipped with a note otherwise. Near-blank
is measured on the stored pixels themselves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from catsdogs import schema
from catsdogs.io import storage
from catsdogs.progress import progress_bar

log = logging.getLogger(__name__)


def input_folder(root: Path) -> Path | None:
    """Return the local input folder the shards were made from, or None when it is not readable here."""
    path = root / schema.CONFIG_NAME
    try:
        source = str(json.loads(path.read_text()).get("input", ""))
    except (OSError, ValueError, AttributeError):
        return None
    if not source or storage.is_remote(source):
        return None
    folder = Path(source)
    return folder if folder.is_dir() else None


def original_sizes(folder: Path, paths: np.ndarray, progress: bool = True) -> np.ndarray:
    """Return ``(n, 2)`` width and height from each file's header; ``(0, 0)`` where unreadable."""
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    named = progress_bar(paths.tolist(), desc="original sizes", unit="img", disable=not progress)
    for i, rel in enumerate(named):
        try:
            with Image.open(folder / rel) as img:
                sizes[i] = img.size
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            continue
    return sizes


def undersized(sizes: np.ndarray, min_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Return indices and scores (``min_side / short side``) of originals shorter than ``min_side``."""
    short = sizes.min(1)
    idx = np.nonzero((short > 0) & (short < min_side))[0]
    return idx, min_side / short[idx]


def elongated(sizes: np.ndarray, max_aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Return indices and aspect ratios (long / short side) of originals above ``max_aspect``."""
    short = sizes.min(1).astype(np.float64)
    ratio = np.divide(sizes.max(1), short, out=np.zeros(len(sizes)), where=short > 0)
    idx = np.nonzero(ratio > max_aspect)[0]
    return idx, ratio[idx]


def near_blank(pixel_std: np.ndarray, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Return indices and scores (``1 - std / min_std``, 1 = one flat colour) of near-blank images."""
    idx = np.nonzero(pixel_std < min_std)[0]
    return idx, 1.0 - pixel_std[idx] / min_std if min_std else np.ones(len(idx))
