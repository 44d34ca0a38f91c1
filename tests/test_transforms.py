"""Decoding every odd kind of file the preprocess job meets, and refusing the broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catsdogs.errors import ImageDecodeError
from catsdogs.models.transforms import load_image
from tests.fixtures import encode

EXPECTED_REASONS = {
    "Dog/empty.jpg": "empty_file",
    "Dog/truncated.jpg": "corrupt",
    "Dog/page.jpg": "not_an_image",
    "Dog/random.jpg": "not_an_image",
    "Dog/bomb.png": "decompression_bomb",
}


@pytest.mark.parametrize("policy", ["stretch", "crop", "pad"])
def test_every_good_file_decodes(image_tree: tuple[Path, dict[str, list[str]]], policy: str) -> None:
    root, info = image_tree
    assert len(info["good"]) > 30
    for rel in info["good"]:
        arr = load_image((root / rel).read_bytes(), 40, policy)
        assert arr.shape == (40, 40, 3), rel
        assert arr.dtype == np.uint8, rel
        assert arr.std() > 5, f"{rel} decoded to a flat image"


def test_every_bad_file_raises_with_reason(image_tree: tuple[Path, dict[str, list[str]]]) -> None:
    root, info = image_tree
    seen = set()
    for rel in info["bad"]:
        if rel.endswith("broken_link.jpg"):
            continue  # cannot be read at all: covered by tests/test_preprocess.py
        with pytest.raises(ImageDecodeError) as err:
            load_image((root / rel).read_bytes(), 32)
        assert err.value.reason == EXPECTED_REASONS[rel], rel
        seen.add(rel)
    assert seen == set(EXPECTED_REASONS)


def test_max_pixels_is_enforced() -> None:
    data = encode(Image.new("RGB", (100, 100), (10, 20, 30)), "PNG")
    assert load_image(data, 16, max_pixels=10_000).shape == (16, 16, 3)
    with pytest.raises(ImageDecodeError) as err:
        load_image(data, 16, max_pixels=9_999)
    assert err.value.reason == "decompression_bomb"


def _red_left_blue_right(width: int = 96, height: int = 48) -> Image.Image:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide; displayed rotated 90 degrees clockwise, i.e. tall
    data = encode(_red_left_blue_right(), "JPEG", quality=95, exif=exif.tobytes())
    # Rotating clockwise moves the left (red) half to the top and the right (blue) half to the bottom.
    arr = load_image(data, 32, "stretch").astype(int)
    assert arr[:8, :, 0].mean() > 200 and arr[:8, :, 2].mean() < 60
    assert arr[-8:, :, 2].mean() > 200 and arr[-8:, :, 0].mean() < 60
    # Letterboxed, the tall picture gets black bars left and right, not top and bottom.
    padded = load_image(data, 32, "pad").astype(int)
    assert padded[:, :6].max() < 30 and padded[:, -6:].max() < 30
    assert padded[:2, 12:20].mean() > 60


def test_without_exif_the_image_stays_wide() -> None:
    padded = load_image(encode(_red_left_blue_right(), "PNG"), 32, "pad").astype(int)
    assert padded[:6].max() < 30 and padded[-6:].max() < 30  # bars top and bottom
    cropped = load_image(encode(_red_left_blue_right(), "PNG"), 32, "crop").astype(int)
    assert cropped[:, :12, 0].mean() > 200 and cropped[:, -12:, 2].mean() > 200


def test_cmyk_is_converted_to_rgb() -> None:
    data = encode(Image.new("RGB", (40, 40), (200, 30, 30)).convert("CMYK"), "JPEG", quality=95)
    arr = load_image(data, 16).astype(int)
    assert np.abs(arr.mean(axis=(0, 1)) - (200, 30, 30)).max() < 25


def test_16bit_grayscale_is_scaled_to_8bit() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    arr = load_image(encode(Image.fromarray(ramp), "PNG"), 64)
    assert arr[..., 0].min() <= 5 and arr[..., 0].max() >= 250  # full range, not all 255 or 0
    assert np.array_equal(arr[..., 0], arr[..., 1])


def test_rgba_transparency_becomes_white_and_palette_keeps_colours() -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (0, 0, 255, 255)  # opaque blue left, fully transparent right
    arr = load_image(encode(Image.fromarray(rgba), "PNG"), 32).astype(int)
    assert arr[:, :12, 2].min() > 200 and arr[:, :12, 0].max() < 40
    assert arr[:, -12:].min() > 240
    pal = _red_left_blue_right(32, 32).convert("P")
    arr = load_image(encode(pal, "PNG"), 32).astype(int)
    assert arr[:, :12, 0].min() > 200 and arr[:, -12:, 2].min() > 200
