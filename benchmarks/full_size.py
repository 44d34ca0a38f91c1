"""Full-size photos: what ``make run`` costs on the real download (about 25,000 photos), estimated.

The development copy's photos are 180 px; the download's are full size (about 500 x 375). Only the
decode in preprocess depends on a photo's size: every later stage reads the 260 px shards. So:

1. ``catsdogs preprocess --size 260`` on ``--photos`` full-size photos, made from ``pets-other``'s 185
   Oxford-IIIT photos (full size) by mirroring and re-encoding them at varied JPEG qualities (distinct
   files of the same size class): its decode-and-resize rate, Spark start excluded;
2. the default preset's train and evaluate seconds per photo, read from ``make_run``'s fragment
   (docs/benchmarks/make_run.md: the same stages on 18,000 photos);
3. the estimate: setup + Spark start + 25,000 / rate + 25,000 x (train + evaluate seconds per photo).

Usage (about 2 minutes on 2 cores, after ``benchmarks.make_run``)::

    .venv/bin/python -m benchmarks.full_size [--photos 2000]
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import DOCS_DIR, REAL_DATA, heavy_lock, machine, write_fragment

PETS_OTHER = REAL_DATA.parent / "pets-other"
DOWNLOAD_PHOTOS = 25_000
"""Photos in Microsoft's PetImages download (12,500 per class, a few of them broken)."""
DEV_PHOTOS = 18_000
"""Photos in the development copy that make_run's fragment timed."""
SUMMARY = re.compile(r"wall time ([\d.]+) s \(([\d,]+) images/s; Spark start ([\d.]+) s\)")
STAGE = re.compile(r"\| (setup[^|]*|train|evaluate) \| (\d+) \|")


def make_photos(folder: Path, n: int) -> tuple[float, float]:
    """``n`` full-size JPEGs under folder/Cat and folder/Dog; return their mean megapixels and KB."""
    from PIL import Image, ImageOps

    sources = sorted(PETS_OTHER.rglob("*.jpg"))
    pixels = kb = 0.0
    for i in range(n):
        src = sources[i % len(sources)]
        img = Image.open(src).convert("RGB")
        if (i // len(sources)) % 2:
            img = ImageOps.mirror(img)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75 + (i // len(sources)) % 20)
        out = folder / src.parent.name / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(buf.getvalue())
        pixels += img.width * img.height / 1e6
        kb += len(buf.getvalue()) / 1024
    return pixels / n, kb / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=2000)
    args = parser.parse_args(argv)
    make_run = DOCS_DIR / "make_run.md"
    if not PETS_OTHER.is_dir() or not make_run.is_file():
        print(f"needs {PETS_OTHER} and {make_run} (python -m benchmarks.make_run); skipping", file=sys.stderr)
        return 0
    stages = {m.group(1).split(" ")[0]: float(m.group(2)) for m in STAGE.finditer(make_run.read_text())}
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-bench-full-") as tmp:
        mp, kb = make_photos(Path(tmp) / "photos", args.photos)
        cmd = [sys.executable, "-m", "catsdogs.cli", "preprocess", "--input", str(Path(tmp) / "photos"),
               "--output", str(Path(tmp) / "shards"), "--size", "260"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = SUMMARY.search(proc.stdout + proc.stderr)
    if found is None:
        raise SystemExit(f"no preprocess summary in:\n{proc.stderr[-2000:]}")
    wall, spark_start = float(found.group(1)), float(found.group(3))
    rate = args.photos / (wall - spark_start)
    per_photo = (stages["train"] + stages["evaluate"]) / DEV_PHOTOS
    estimate = stages["setup"] + spark_start + DOWNLOAD_PHOTOS / rate + DOWNLOAD_PHOTOS * per_photo
    lines = [
        "## Full-size photos: `make run` on the real download, estimated",
        "",
        f"`.venv/bin/python -m benchmarks.full_size --photos {args.photos}` ({machine()}); {args.photos:,} "
        f"full-size JPEGs made from the 185 Oxford-IIIT photos of `pets-other` ({mp:.2f} MP and {kb:.0f} KB "
        "each on average), and the stage seconds of [make_run](make_run.md).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| preprocess of full-size photos at 260 px (decode, check, resize, write), Spark start excluded "
        f"| {rate:.0f} photos/s |",
        f"| train + evaluate per photo (make_run: {stages['train']:.0f} s + {stages['evaluate']:.0f} s for "
        f"{DEV_PHOTOS:,}) | {1000 * per_photo:.1f} ms |",
        f"| **`make run` on {DOWNLOAD_PHOTOS:,} full-size photos (estimate)** "
        f"| **{estimate / 60:.1f} min** |",
    ]
    print("\n".join(lines))
    write_fragment("full_size", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
