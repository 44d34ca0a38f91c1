"""The pointing test of explanations: does the heatmap fall on the pet, not on the empty half?

Each photo is pasted on one half (alternately left and right) of a grey canvas twice its width; the
canvas goes through the product's own path (decode + resize policy of the run, Grad-CAM of the
predicted class, heatmap mapped back to the canvas). A photo passes when at least 70 % of the
heatmap's mass lies on the photo's half; the issue's target is that 90 % of the photos pass.

Usage: ``.venv/bin/python -m benchmarks.pointing --run RUN [--photos 400] [--seed 0]``: the photos are a
class-balanced random sample of the run's held-out test split (its shards' ``files.csv``), read at full
size from the data folder recorded in the shards' manifest (``--data`` overrides it).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks._common import DEFAULT_RUN, heavy_lock
from catsdogs import schema
from catsdogs.errors import ImageDecodeError
from catsdogs.infer.explain import Explainer, png_bytes, to_original
from catsdogs.infer.predictor import Predictor
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, load_rgb

GREY = 128
"""Canvas colour: mid grey, the least informative background."""
MIN_SHARE = 0.70
"""A photo passes when at least this share of the heatmap's mass lies on its half."""
MIN_PASSING = 0.90
"""The explanations pass when at least this share of the photos pass."""


def paste_on_canvas(photo: np.ndarray, side: str) -> np.ndarray:
    """Return a grey ``H x 2W`` canvas with ``photo`` (``H x W x 3`` uint8) on its ``left``/``right`` half."""
    h, w = photo.shape[:2]
    canvas = np.full((h, 2 * w, 3), GREY, dtype=np.uint8)
    start = 0 if side == "left" else w
    canvas[:, start:start + w] = photo
    return canvas


def share_on_side(heatmap: np.ndarray, side: str) -> float:
    """Share of the heatmap's mass on the ``left`` or ``right`` half (0 for an all-zero map)."""
    half = heatmap.shape[1] // 2
    part = heatmap[:, :half] if side == "left" else heatmap[:, half:]
    total = float(heatmap.sum())
    return float(part.sum()) / total if total > 0 else 0.0


def pointing_shares(explainer: Explainer, photos: Sequence[np.ndarray], progress: bool = False
                    ) -> list[float]:
    """Paste each photo alternately left and right; return the heatmap mass share on its half."""
    predictor = explainer.predictor
    shares: list[float] = []
    for i, photo in enumerate(tqdm(photos, desc="pointing", unit="img", disable=not progress)):
        side = "left" if i % 2 == 0 else "right"
        canvas = paste_on_canvas(photo, side)
        image = predictor.decode(png_bytes(canvas))  # the product's decode and resize policy
        found = explainer.explain_arrays(image[None])[0]
        heat = to_original(found.heatmap, predictor.resize, canvas.shape[0], canvas.shape[1])
        shares.append(share_on_side(heat, side))
    return shares


def held_out_photos(run: Path, data: str, n: int, seed: int) -> list[Path]:
    """A class-balanced random sample of ``n`` photos of the run's test split (under the data folder)."""
    cfg = json.loads((run / schema.CONFIG_NAME).read_text())
    shards = Path(cfg["data"])
    manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
    root = Path(data or manifest["config"]["input"])
    with open(shards / schema.FILES_CSV_NAME, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["path"])
    per = n // len(by_label)
    picked = [p for paths in by_label.values()
              for p in rng.choice(sorted(paths), size=min(per, len(paths)), replace=False)]
    return [root / p for p in sorted(picked)]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the pointing test on a trained run's test photos and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(DEFAULT_RUN), help="trained run folder (default: make run's)")
    ap.add_argument("--data", default="", help="image folder (default: the one recorded in the shards)")
    ap.add_argument("--photos", type=int, default=400, help="test photos to try")
    ap.add_argument("--seed", type=int, default=0, help="seed of the photo sample")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        print(f"skipped: no trained run at {run} (make run, or give --run)")
        return 0
    with heavy_lock():
        start = time.perf_counter()
        predictor = Predictor.from_run(run, backend="torch")
        explainer = Explainer(predictor)
        photos = []
        for path in held_out_photos(run, args.data, args.photos, args.seed):
            try:
                photos.append(load_rgb(path.read_bytes(), DEFAULT_MAX_PIXELS))
            except ImageDecodeError:
                print(f"skipped undecodable {path}", file=sys.stderr)
        shares = np.array(pointing_shares(explainer, photos, progress=True))
        seconds = time.perf_counter() - start
    passing = float((shares >= MIN_SHARE).mean())
    name = predictor.describe().get("name")
    print(f"pointing test of {name} ({run}): {len(shares)} test photos, {passing:.1%} with >= "
          f"{MIN_SHARE:.0%} of the heatmap on the photo's half (target >= {MIN_PASSING:.0%}); median "
          f"share {np.median(shares):.1%}, 10th percentile {np.percentile(shares, 10):.1%}; {seconds:.0f} s")
    return 0 if passing >= MIN_PASSING else 1


if __name__ == "__main__":
    sys.exit(main())
