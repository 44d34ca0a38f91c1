"""Names and layouts shared by every stage, defined once.

The shard layout (``<split>/X_part_<i>.npy`` + ``y_part_<i>.npy``) and the manifest fields are a
contract between preprocess (writer), data (reader), evaluate and serve; change them only together
with ``SCHEMA_VERSION``.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
"""Bumped whenever the shard layout or the manifest fields change incompatibly."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split names, in the order fractions are carved out (test first, then val, rest train)."""

MANIFEST_NAME = "manifest.json"
FILES_CSV_NAME = "files.csv"
CONFIG_NAME = "config.json"
X_PATTERN = "X_part_{index:05d}.npy"
Y_PATTERN = "y_part_{index:05d}.npy"
PARQUET_PATTERN = "part_{index:05d}.parquet"

PIXEL_DTYPE = "uint8"
"""Pixels are stored as uint8 (4x smaller than float32); normalisation happens in the loader."""

LABEL_DTYPE = "int64"
LAYOUT = "NHWC"
"""Shard X arrays are ``(n, H, W, 3)``; the loader transposes to NCHW for torch."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""File suffixes (compared lower-case) taken as candidate images."""

IGNORED_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
"""OS clutter that is ignored (and counted) without trying to decode it."""

FILES_CSV_COLUMNS: tuple[str, ...] = ("path", "split", "shard", "row", "label")

LABELS_AUTO = "auto"
LABELS_FOLDER = "folder"
LABELS_NAME = "name"
LABELS_FROM: tuple[str, ...] = (LABELS_AUTO, LABELS_FOLDER, LABELS_NAME)
"""Where a file's class comes from (``--labels-from``): auto, its class folder, or its name. Here, not in
preprocess/listing.py which reads them: the config takes the choices, and serve must not reach preprocess/."""


RESIZE_POLICIES: tuple[str, ...] = ("stretch", "crop", "pad")
"""How a photo becomes a square: squeeze it whole, cut its centre square, or letterbox it on black."""
DEFAULT_MAX_PIXELS = 89_478_485
"""Images with more pixels are refused as decompression bombs (Pillow's own default limit)."""
SHARD_FORMATS: tuple[str, ...] = ("npy", "parquet", "jpeg", "png")
"""Shard formats: NumPy ``X_part``/``y_part`` pairs, or a Parquet table (pixels, label, split) per shard
whose pixels are raw uint8 (``parquet``), or each image encoded as JPEG or PNG (compact, for clusters)."""
ENCODED_FORMATS: tuple[str, ...] = ("jpeg", "png")
"""The Parquet shard formats that store each image encoded (decoded as the shard is read)."""
ENCODING_KEY = b"catsdogs.encoding"
"""Parquet shard metadata key naming how ``pixels`` is stored: ``raw`` (uint8 HWC), ``jpeg`` or ``png``."""
