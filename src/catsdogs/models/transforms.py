"""Image decoding, resizing and normalisation: the one place shared by preprocess, training and serving.

Preprocessing turns any file into a uint8 ``(size, size, 3)`` RGB array with :func:`load_image`;
the loader and the server turn uint8 batches into normalised float tensors with :func:`normalize`.
Using the same functions everywhere is what keeps served predictions equal to evaluated ones.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from catsdogs.errors import ImageDecodeError
from catsdogs.schema import DEFAULT_MAX_PIXELS, RESIZE_POLICIES

if TYPE_CHECKING:
    import torch

DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
"""Formats Pillow may parse (JPEG also yields MPO); anything else is ``not_an_image``. This keeps
Pillow's exotic parsers (EPS shells out to Ghostscript, PSD, FITS, ...) away from untrusted uploads."""
# Resampling filter for the final resize. BILINEAR with Pillow's reducing_gap keeps antialiasing
# while being ~2x cheaper than LANCZOS; JPEG draft decoding already did most of the shrinking.
_RESAMPLE = Image.Resampling.BILINEAR


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open image bytes (header only), rejecting empties, non-images and decompression bombs."""
    if not data:
        raise ImageDecodeError("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between 1x and 2x its own limit; we apply ours explicitly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "unrecognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError("corrupt", str(exc)) from None
    if img.width <= 0 or img.height <= 0:
        raise ImageDecodeError("corrupt", f"invalid size {img.width}x{img.height}")
    if img.width * img.height > max_pixels:
        raise ImageDecodeError(
            "decompression_bomb", f"{img.width}x{img.height} exceeds max_pixels={max_pixels}"
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode (L, P, RGBA, LA, CMYK, I;16, I, F) to RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raw = np.asarray(img)
        lo, hi = float(raw.min()), float(raw.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        if raw.dtype.kind == "u" and raw.dtype.itemsize == 2:
            # 16-bit: a 64 Ki-entry table of the same float64 formula gives identical pixels at
            # 3 B/pixel instead of 11 (a hostile 16-bit PNG near max_pixels is ~1 GB otherwise).
            lut = np.clip((np.arange(65536, dtype=np.float64) - lo) * scale, 0, 255).astype(np.uint8)
            img = Image.fromarray(lut[raw], mode="L")
        else:
            arr = raw.astype(np.float64)
            arr -= lo  # in place: one float64 copy, not three
            arr *= scale
            img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # No needless full-size copies: a hostile RGBA PNG just under max_pixels costs 4 B/pixel each.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        composed = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        del rgba
        return composed.convert("RGB")
    return img.convert("RGB")


def resize_image(img: Image.Image, size: int, policy: str = "stretch") -> Image.Image:
    """Resize an RGB image to ``size x size`` under an aspect ``policy``.

    ``stretch`` keeps the whole photo (the animal is never cut off) at the cost of distortion;
    ``crop`` takes the centre square of the shorter side; ``pad`` letterboxes on black.
    """
    if policy == "stretch":
        return img.resize((size, size), _RESAMPLE, reducing_gap=3.0)
    if policy == "crop":
        return ImageOps.fit(img, (size, size), _RESAMPLE)
    if policy == "pad":
        return ImageOps.pad(img, (size, size), _RESAMPLE, color=(0, 0, 0))
    raise ValueError(f"unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}")


def load_image(
    data: bytes, size: int, policy: str = "stretch", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode image bytes to a uint8 ``(size, size, 3)`` RGB array.

    Applies JPEG draft (DCT-domain) downscaling when shrinking, EXIF orientation, and mode
    conversion. Raises :class:`ImageDecodeError` with a short reason for anything undecodable.
    """
    # Draft decoding lets libjpeg downscale by 1/2, 1/4 or 1/8 while decoding: far less work. Ask
    # for at least 2x the target so the final resize still antialiases; for 'crop' the shorter side
    # must still cover `size`.
    arr = _decode(data, max_pixels, size * 2, lambda img: resize_image(img, size, policy))
    if arr.shape != (size, size, 3):
        raise ImageDecodeError("corrupt", f"unexpected decoded shape {arr.shape}")
    return arr


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> np.ndarray:
    """Decode image bytes to a uint8 ``(height, width, 3)`` RGB array as the photo is seen (EXIF-upright).

    With ``max_side`` the result is shrunk (aspect kept) so neither side exceeds it; otherwise it is
    the original size. Raises :class:`ImageDecodeError` like :func:`load_image`.
    """

    def shrink(img: Image.Image) -> Image.Image:
        if max_side is not None and max(img.size) > max_side:
            img = ImageOps.contain(img, (max_side, max_side), _RESAMPLE)
        return img

    return _decode(data, max_pixels, max_side, shrink)


def _decode(data: bytes, max_pixels: int, draft: int | None,
            finish: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Open, decode (JPEG draft to ``draft`` px when given), upright and RGB-convert, then ``finish``."""
    img = _open(data, max_pixels)
    try:
        if img.format == "JPEG" and draft is not None:
            img.draft("RGB", (draft, draft))
        img.load()
        if hasattr(img, "n_frames") and getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy when upright
        img = finish(_to_rgb(img))
        return np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("decompression_bomb", str(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError) as exc:
        # Truncated data ("image file is truncated"), broken chunks, bad EXIF, ...
        raise ImageDecodeError("corrupt", str(exc) or type(exc).__name__) from None


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Turn a uint8 NHWC batch into a float32 NCHW batch ``(x - mean) / std`` (pixel units 0..255).

    The result is channels_last in memory, which is the fast layout for CPU convolutions.
    """
    import torch  # lazy: Spark executors and the config import this module, torch costs ~1.7 s

    # In NHWC, in place, then viewed as NCHW: channels_last memory is NHWC, so this is the same tensor as
    # ((x - m) / s) in NCHW made channels_last, with one temporary instead of three (1.8x faster at 64
    # images of 260 px).
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    return batch.to(torch.float32, copy=True).sub_(m).div_(s).permute(0, 3, 1, 2)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror an NCHW batch left-right (for flip test-time augmentation)."""
    return x.flip(-1)
