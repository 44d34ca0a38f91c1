"""Generated shards with known faults for the audit tests: label flips and near-duplicate copies.

Each image is a distinct smooth random background (its own "photo") with a class cue: horizontal
stripes for class 0, vertical for class 1, which ImageNet features separate easily. Copies are made
the ways real near-duplicates arise: re-encoded as JPEG, resized down and back up, slightly cropped.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from catsdogs import schema
from catsdogs.shards.manifest import Manifest, save_manifest
from catsdogs.shards.writer import ShardWriter


def photo(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Return a distinct uint8 RGB image of class ``label`` (0: horizontal stripes, 1: vertical).

    A random colour field with random ellipses makes every image its own "photo"; the stripes are the
    class cue.
    """
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=colour)
    yy, xx = np.mgrid[0:size, 0:size]
    period, phase = rng.uniform(size / 8, size / 5), rng.uniform(0, 6.3)
    wave = np.sin(2 * np.pi * (yy if label == 0 else xx) / period + phase)
    out = 0.6 * np.asarray(img, dtype=np.float32) + 0.4 * (127 + 127 * wave)[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def reencode(img: np.ndarray, quality: int = 60) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def resized(img: np.ndarray, factor: float = 0.6) -> np.ndarray:
    size = img.shape[0]
    small = Image.fromarray(img).resize((int(size * factor),) * 2, Image.Resampling.BILINEAR)
    return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR))


def cropped(img: np.ndarray, keep: float = 0.9) -> np.ndarray:
    size = img.shape[0]
    side = int(size * keep)
    off = (size - side) // 2
    box = (off, off, off + side, off + side)
    return np.asarray(Image.fromarray(img).crop(box).resize((size, size), Image.Resampling.BILINEAR))


COPIES = {"jpeg": reencode, "resized": resized, "cropped": cropped}


@dataclass
class Faults:
    """What was injected: flipped paths, copy pairs ``(copy, original, how)``, exact copy pairs."""

    flipped: list[str] = field(default_factory=list)
    copies: list[tuple[str, str, str]] = field(default_factory=list)
    paths: dict[str, list[str]] = field(default_factory=dict)


def make_faulty_shards(root: Path, counts: dict[str, int] | None = None, size: int = 64, flips: int = 6,
                       copies: tuple[tuple[str, str, str], ...] = (
                           ("train", "train", "jpeg"), ("train", "val", "resized"),
                           ("train", "test", "cropped"), ("train", "test", "exact"),
                           ("val", "val", "cropped"), ("train", "train", "resized")),
                       seed: int = 0, extra: tuple[tuple[str, np.ndarray, int, str], ...] = ()) -> Faults:
    """Write shards (npy, one shard per split) plus files.csv with ``flips`` flipped train labels and
    one copy per ``(source split, target split, how)``; return what was injected.

    ``extra`` appends more images as ``(split, uint8 image, label, path)``, e.g. non-pets.
    """
    rng = np.random.default_rng(seed)
    counts = counts or {"train": 160, "val": 40, "test": 40}
    faults = Faults()
    rows: dict[str, list[tuple[np.ndarray, int, str]]] = {}
    for split, n in counts.items():
        rows[split] = [(photo(k % 2, size, rng), k % 2, f"{('Cat', 'Dog')[k % 2]}/{split}_{k}.jpg")
                       for k in range(n)]
    for k in range(flips):  # flip the label of every 7th train image, starting at 3
        img, label, path = rows["train"][3 + 7 * k]
        rows["train"][3 + 7 * k] = (img, 1 - label, path)
        faults.flipped.append(path)
    for j, (src, dst, how) in enumerate(copies):
        img, label, path = rows[src][1 + 5 * j]
        copy = img.copy() if how == "exact" else COPIES[how](img)
        copy_path = f"{path.rsplit('.', 1)[0]}_{how}_copy.jpg"
        rows[dst].append((copy, label, copy_path))
        faults.copies.append((copy_path, path, how))
    for split, img, label, path in extra:
        rows[split].append((img, label, path))
    infos = []
    files = []
    per_split = {}
    for split, items in rows.items():
        with ShardWriter(root, split, 0, size, 2) as w:
            for img, label, path in items:
                r = w.add(img, label)
                files.append((path, split, 0, r, label))
        infos.append(w.info)
        per_split[split] = {c: sum(1 for _, lab, _ in items if lab == k)
                            for k, c in enumerate(("Cat", "Dog"))}
        faults.paths[split] = [p for _, _, p in items]
    save_manifest(Manifest(classes=["Cat", "Dog"], size=size, resize="stretch", mean=[120.0] * 3,
                           std=[60.0] * 3, shards=infos, counts=per_split), root)
    with open(root / schema.FILES_CSV_NAME, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(schema.FILES_CSV_COLUMNS)
        w.writerows(files)
    return faults
