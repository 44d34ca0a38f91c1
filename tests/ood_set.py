"""An out-of-distribution set built on the fly: images that are neither a cat nor a dog.

Two parts, nothing committed:

* :func:`generated_images`: procedural non-pet images (solid colours, gradients, checkerboards,
  stripes, noise, rendered text, geometric shapes), made from a seed;
* :func:`sample_photos`: the non-pet photos that scikit-image ships inside its wheel (astronaut,
  rocket, coffee, camera, moon, brick, page of text, motorcycles, ...), read with Pillow from the
  installed package (no network; ``chelsea`` is a cat and is left out). Empty when scikit-image is
  not installed.

Used by the tests and by ``benchmarks/ood_rejection.py`` (the real-data figures in docs/models.md).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTO_EXCLUDE = frozenset({"chelsea.png"})
"""skimage sample images that show a cat or a dog (chelsea is a cat)."""
_PHOTO_SUFFIXES = (".png", ".jpg")

Maker = Callable[[np.random.Generator, int], np.ndarray]


def _solid(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    img = np.broadcast_to(a * (1 - t) + b * t, (size, size, 3))
    return np.ascontiguousarray(np.rot90(img, k=int(rng.integers(4)))).astype(np.uint8)


def _checkerboard(rng: np.random.Generator, size: int) -> np.ndarray:
    cell = int(rng.integers(4, max(5, size // 4)))
    yy, xx = np.mgrid[:size, :size] // cell
    mask = ((yy + xx) % 2).astype(bool)
    img = np.empty((size, size, 3), np.uint8)
    img[mask], img[~mask] = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return img


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    period = rng.uniform(4, size / 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:size, :size]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    colour = rng.integers(60, 256, 3)
    return (wave[..., None] * colour).astype(np.uint8)


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth coloured noise: low-resolution noise upscaled (clouds, not texture)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    words = ["invoice", "total", "page", "the quick brown fox", "lorem ipsum", "2026", "catsdogs",
             "meeting notes", "chapter 3", "summary"]
    for y in range(4, size - 8, 12):
        draw.text((4, y), " ".join(rng.choice(words, 3)), fill=(0, 0, 0))
    return np.asarray(img)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(8, size // 2 + 8), y0 + rng.integers(8, size // 2 + 8)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=fill)
        elif shape == 1:
            draw.ellipse((int(x0), int(y0), int(x1), int(y1)), fill=fill)
        else:
            pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
            draw.polygon(pts, fill=fill)
    return np.asarray(img)


MAKERS: dict[str, Maker] = {
    "solid": _solid, "gradient": _gradient, "checkerboard": _checkerboard, "stripes": _stripes,
    "noise": _noise, "blobs": _blobs, "text": _text, "shapes": _shapes,
}
"""Kinds of generated non-pet images."""


def generated_images(per_kind: int = 5, size: int = 128, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Return ``(name, uint8 RGB image)`` pairs: ``per_kind`` images of every kind in :data:`MAKERS`."""
    rng = np.random.default_rng(seed)
    return [(f"{kind}_{i}", make(rng, size)) for kind, make in MAKERS.items() for i in range(per_kind)]


def photo_dir() -> Path | None:
    """The folder of sample images inside the installed scikit-image, or None."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if folder.is_dir() else None


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Return ``(name, uint8 RGB image)`` for every non-pet sample photo shipped with scikit-image."""
    folder = photo_dir()
    if folder is None:
        return []
    photos = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in _PHOTO_SUFFIXES and path.name not in PHOTO_EXCLUDE:
            with Image.open(path) as img:
                photos.append((path.stem, np.asarray(img.convert("RGB"))))
    return photos


def png_bytes(arr: np.ndarray) -> bytes:
    """Encode an RGB array as PNG bytes (lossless, so generated edges stay as made)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
