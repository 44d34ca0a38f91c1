"""Fuzz the one decode path shared by preprocess, predict and serve (catsdogs.transforms.load_image).

Contract under test: for ANY bytes, ``load_image`` returns a uint8 ``(size, size, 3)`` array or raises
``ImageDecodeError`` with a known reason; it never raises anything else, never hangs, and never
allocates memory for a declared size above ``max_pixels``.

Examples are derandomized (same inputs on every run, so CI is stable); set CATSDOGS_FUZZ_EXAMPLES
to run more, random ones (e.g. ``CATSDOGS_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``).
"""

from __future__ import annotations

import faulthandler
import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from catsdogs.errors import ImageDecodeError
from catsdogs.models.transforms import RESIZE_POLICIES, load_image

KNOWN_REASONS = {"empty_file", "not_an_image", "corrupt", "decompression_bomb"}
"""Reasons load_image may give; preprocess's skipped list and the API's error JSON use the same tags."""

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Modes each format can store, so every generated base image is a real, valid file of that format.
MODES = {
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "L", "P", "RGBA", "LA", "1", "I;16"),
    "GIF": ("P", "L", "1"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("RGB", "L", "P", "1"),
    "TIFF": ("RGB", "L", "P", "RGBA", "CMYK", "1", "I;16"),
}
MAGICS = (b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*",
          b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"P6\n")
"""Format signatures prepended to random bytes so the fuzzer gets past format detection."""

EXAMPLES = int(os.environ.get("CATSDOGS_FUZZ_EXAMPLES", "0"))
PER_EXAMPLE_S = 10.0  # generous: a hang is minutes; a slow shared 2-core box is < 1 s per example
FUZZ = settings(
    max_examples=EXAMPLES or 150,
    derandomize=not EXAMPLES,
    deadline=None,  # our own time guard below, which also catches loops in Python code
    database=None,  # write nothing into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class DecodeTimeout(Exception):
    """One example ran longer than PER_EXAMPLE_S."""


@contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Raise DecodeTimeout after ``seconds``; a hang inside C code (where signals wait) is caught by
    faulthandler, which dumps every stack and kills the process after 6x as long."""
    def on_alarm(signum: int, frame: object) -> None:
        raise DecodeTimeout(f"load_image took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 6, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()


def check_decode(data: bytes, size: int, policy: str, max_pixels: int) -> np.ndarray | None:
    """Assert the load_image contract for one input; return the array or None for a clean refusal."""
    with time_guard(PER_EXAMPLE_S), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF/TIFF tags; that is fine
        try:
            out = load_image(data, size, policy, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            assert exc.reason in KNOWN_REASONS, f"unknown reason {exc.reason!r}"
            assert str(exc), "the error must say something"
            return None
    assert isinstance(out, np.ndarray)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8, (out.shape, out.dtype)
    return out


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real, valid file of a random format, mode and size (1..48 px a side)."""
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    return fmt, encode(make_image(mode, w, h, draw(st.integers(0, 2**32 - 1))), fmt)


# One mutation: (kind, position, value); positions are taken modulo the data length.
MUTATION = st.tuples(st.sampled_from(("flip", "truncate", "insert", "delete", "header")),
                     st.integers(0, 1 << 16), st.integers(0, 255))


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    """Apply bit flips, truncations, insertions, deletions and header-byte overwrites."""
    b = bytearray(data)
    for kind, pos, value in ops:
        if not b:
            break
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= 1 << (value % 8)
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([value]) * (1 + value % 16)
        elif kind == "delete":
            del b[i:i + 1 + value % 64]
        else:  # headers hold sizes, offsets and lengths: hit the first 64 bytes with extreme values
            b[pos % min(len(b), 64)] = (0x00, 0xFF, 0x7F, 0x80, value)[value % 5]
    return bytes(b)


def set_declared_size(fmt: str, data: bytes, w: int, h: int) -> bytes:
    """Rewrite the width/height a file declares in its header (the pixel data stays as is)."""
    b = bytearray(data)
    if fmt == "PNG":
        b[16:24] = struct.pack(">II", w, h)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))  # keep the IHDR CRC valid
    elif fmt == "GIF":
        b[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)  # logical screen
        i = b.index(b"\x2c", 13)  # first image descriptor
        b[i + 5:i + 9] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif fmt == "BMP":
        b[18:26] = struct.pack("<ii", w, h)
    elif fmt == "JPEG":
        i = b.index(b"\xff\xc0")  # baseline SOF: length(2) precision(1) height(2) width(2)
        b[i + 5:i + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
    elif fmt == "WEBP":
        i = b.index(b"\x9d\x01\x2a")  # VP8 key-frame start code, then 14-bit width and height
        b[i + 3:i + 7] = struct.pack("<HH", w & 0x3FFF, h & 0x3FFF)
    elif fmt == "TIFF":
        (ifd,) = struct.unpack("<I", b[4:8])
        (n,) = struct.unpack("<H", b[ifd:ifd + 2])
        for k in range(n):
            e = ifd + 2 + 12 * k
            tag, typ = struct.unpack("<HH", b[e:e + 4])
            if tag in (256, 257):  # ImageWidth, ImageLength (SHORT or LONG)
                v = w if tag == 256 else h
                b[e + 8:e + 12] = struct.pack("<HH", v & 0xFFFF, 0) if typ == 3 else struct.pack("<I", v)
    return bytes(b)


SIZES = st.integers(1, 64)
POLICIES = st.sampled_from(RESIZE_POLICIES)
# Small limits make declared-size mutations hit the bomb check; 2 MP keeps each decode fast.
MAX_PIXELS = st.sampled_from((64, 4096, 2_000_000))


@FUZZ
@given(prefix=st.sampled_from(MAGICS), body=st.binary(max_size=2048), size=SIZES, policy=POLICIES,
       max_pixels=MAX_PIXELS)
def test_arbitrary_bytes_decode_or_refuse(prefix: bytes, body: bytes, size: int, policy: str,
                                          max_pixels: int) -> None:
    check_decode(prefix + body, size, policy, max_pixels)


@FUZZ
@given(image=valid_images(), size=SIZES, policy=POLICIES)
def test_valid_images_always_decode(image: tuple[str, bytes], size: int, policy: str) -> None:
    fmt, data = image
    assert check_decode(data, size, policy, 2_000_000) is not None, f"valid {fmt} refused"


@FUZZ
@given(image=valid_images(), ops=st.lists(MUTATION, min_size=1, max_size=8), size=SIZES, policy=POLICIES,
       max_pixels=MAX_PIXELS)
def test_mutated_images_decode_or_refuse(image: tuple[str, bytes], ops: list[tuple[str, int, int]],
                                         size: int, policy: str, max_pixels: int) -> None:
    check_decode(mutate(image[1], ops), size, policy, max_pixels)


DIMS = st.one_of(st.sampled_from((0, 1, 2, 255, 256, 65535, 65536, 2**31 - 1)), st.integers(0, 70000))


@FUZZ
@given(fmt=st.sampled_from(FORMATS), w=DIMS, h=DIMS, size=SIZES, policy=POLICIES)
def test_declared_sizes_decode_or_refuse(fmt: str, w: int, h: int, size: int, policy: str) -> None:
    """A header may claim any width and height: above the limit it is a bomb, otherwise the
    (too short) pixel data must decode or be refused as corrupt."""
    data = set_declared_size(fmt, encode(make_image("RGB", 8, 8, 0), fmt), w, h)
    max_pixels = 2_000_000
    out = check_decode(data, size, policy, max_pixels)
    declared = (w & 0xFFFF if fmt in ("GIF", "JPEG", "TIFF") else w & 0x3FFF if fmt == "WEBP" else w) * (
        h & 0xFFFF if fmt in ("GIF", "JPEG", "TIFF") else h & 0x3FFF if fmt == "WEBP" else h)
    if declared > max_pixels and fmt != "BMP":  # BMP's signed fields may wrap to a small size
        assert out is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_declared_bomb_refused_before_pixels_are_allocated(fmt: str) -> None:
    """Headers claiming 60000x60000 (3.6 gigapixels, ~11 GB as RGB) are refused from the header.

    Runs in a fresh interpreter so ru_maxrss (peak RSS) reflects only these decodes."""
    script = textwrap.dedent(f"""
        import io, resource, sys
        import numpy as np
        from PIL import Image
        sys.path.insert(0, {os.path.dirname(__file__) + "/.."!r})
        from tests.test_fuzz import encode, make_image, set_declared_size
        from catsdogs.errors import ImageDecodeError
        from catsdogs.models.transforms import load_image
        data = set_declared_size({fmt!r}, encode(make_image("RGB", 8, 8, 0), {fmt!r}), 60000, 60000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reasons = set()
        for _ in range(20):
            try:
                load_image(data, 64)
            except ImageDecodeError as exc:
                reasons.add(exc.reason)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(sorted(reasons), (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    reasons, growth_mib = " ".join(out[:-1]), int(out[-1])
    assert reasons == "['decompression_bomb']", reasons
    assert growth_mib < 32, f"peak RSS grew {growth_mib} MiB while refusing a declared bomb"


@pytest.mark.parametrize("kind", ["eps", "bomb_png"])
def test_fixed_hostile_inputs(kind: str) -> None:
    """Known-dangerous inputs: EPS (Pillow would shell out to Ghostscript) and the fixture bomb."""
    from tests.fixtures import bomb_png

    data = {"eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
            "bomb_png": bomb_png()}[kind]
    with pytest.raises(ImageDecodeError) as info:
        load_image(data, 32)
    assert info.value.reason == {"eps": "not_an_image", "bomb_png": "decompression_bomb"}[kind]
