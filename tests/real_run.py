"""A small run trained on real photos, for the tests that deploy a model (container, fresh install).

Shards are written straight from the development copy of the data (no Spark: a few hundred photos
decoded with the pipeline's own loader), and ``catsdogs train`` fits a frozen EfficientNet-Lite0 head
on them: ImageNet features tell these cats from dogs well enough that a held-out photo gets its label.
"""

from __future__ import annotations

from pathlib import Path

from catsdogs.models.transforms import load_image
from catsdogs.shards.manifest import Manifest, save_manifest
from catsdogs.shards.writer import ShardWriter

CLASSES = ("Cat", "Dog")
SIZE = 160
"""Pixels: below Lite0's 224 to keep the feature pass short, still well within what its features handle."""
PER_CLASS = {"train": 80, "val": 30, "test": 10}
"""Photos per class and split: the first files by number; the held-out photos come after them."""


def photo_files(real_data: Path, cls: str) -> list[Path]:
    """The class's JPEGs sorted by their number (the same order on every machine)."""
    files = [p for p in (real_data / cls).glob("*.jpg") if p.stem.isdigit()]
    return sorted(files, key=lambda p: int(p.stem))


def held_out_photo(real_data: Path, cls: str, k: int = 0) -> Path:
    """A photo of ``cls`` that the run never saw (after those of every split)."""
    return photo_files(real_data, cls)[sum(PER_CLASS.values()) + 50 + k]


def make_real_shards(real_data: Path, root: Path) -> Manifest:
    """Write train/val/test shards of the first photos of each class, decoded like preprocess does."""
    infos = []
    counts: dict[str, dict[str, int]] = {}
    offset = 0
    for split, n in PER_CLASS.items():
        counts[split] = {}
        with ShardWriter(root, split, 0, SIZE, len(CLASSES), "npy") as w:
            for label, cls in enumerate(CLASSES):
                kept = 0
                for path in photo_files(real_data, cls)[offset:offset + n]:
                    try:
                        w.add(load_image(path.read_bytes(), SIZE), label, f"{cls}/{path.name}")
                        kept += 1
                    except Exception:  # noqa: BLE001, S112 - a broken file of the real data: skipped
                        continue
                counts[split][cls] = kept
        infos.append(w.info)
        offset += n
    manifest = Manifest(classes=list(CLASSES), size=SIZE, resize="stretch", mean=[124.0, 116.0, 104.0],
                        std=[58.0, 57.0, 57.0], shards=infos, counts=counts, format="npy",
                        stats={"kept": sum(sum(c.values()) for c in counts.values()), "skipped": 0})
    save_manifest(manifest, root)
    return manifest


def train_real_run(real_data: Path, tmp: Path) -> Path:
    """Shards from real photos, then ``catsdogs train`` (frozen Lite0 head on OpenVINO fp32 features, whose
    graph stays in RUN/engine/ for a read-only deployment); the run."""
    from catsdogs.cli import main as cli_main

    make_real_shards(real_data, tmp / "shards")
    run = tmp / "run"
    code = cli_main(["train", "--data", str(tmp / "shards"), "--output", str(run), "--model", "effnet_lite0",
                     "--freeze", "backbone", "--backend", "openvino", "--batch-size", "32"])
    assert code == 0
    return run
