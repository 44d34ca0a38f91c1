"""The shards manifest: what went in, what was skipped and why, and how to read the shards.

Written once by the preprocess driver after every shard is complete; readers refuse shards whose
manifest is missing (an interrupted run) or has another ``schema_version``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from catsdogs import schema
from catsdogs.errors import SchemaError
from catsdogs.io.atomic import atomic_write_text


@dataclass
class ShardInfo:
    """One shard: its files (relative to the shards root), row count and checksums."""

    index: int
    split: str
    rows: int
    x: str
    y: str
    x_sha256: str = ""
    y_sha256: str = ""
    class_counts: list[int] = field(default_factory=list)

    def files(self) -> list[str]:
        """Return the shard's distinct files (npy: X and y; parquet: the one file in both fields)."""
        return list(dict.fromkeys(f for f in (self.x, self.y) if f))


@dataclass
class Manifest:
    """Everything a reader needs to trust and use a shards folder."""

    classes: list[str]
    size: int
    resize: str
    mean: list[float]
    std: list[float]
    shards: list[ShardInfo]
    counts: dict[str, dict[str, int]]
    """Kept images per split per class name."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    """Run facts: candidates, kept, skipped and ignored counts, spark version, wall time."""
    format: str = "npy"
    excluded: dict[str, Any] = field(default_factory=dict)
    """Files left out on purpose (``preprocess --exclude``): count, sorted paths, and how many listed paths
    matched no input file. Apart from ``skipped`` (files that could not be decoded). Written only when
    non-empty, so manifests without exclusions stay readable by catsdogs versions before this field."""
    schema_version: int = schema.SCHEMA_VERSION
    dtype: str = schema.PIXEL_DTYPE
    layout: str = schema.LAYOUT

    def split_shards(self, split: str) -> list[ShardInfo]:
        """Return the shards of one split, in index order."""
        return sorted((s for s in self.shards if s.split == split), key=lambda s: s.index)

    def split_rows(self, split: str) -> int:
        """Return the number of rows in one split."""
        return sum(s.rows for s in self.split_shards(split))

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as a JSON-ready dict (normalisation grouped for readability)."""
        d = asdict(self)
        if not d["excluded"]:
            del d["excluded"]
        d["normalization"] = {"mean": d.pop("mean"), "std": d.pop("std"), "units": "pixel 0..255"}
        d["image"] = {"size": d.pop("size"), "resize": d.pop("resize"), "channels": 3}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """Rebuild a manifest from its JSON dict."""
        d = dict(d)
        norm = d.pop("normalization")
        image = d.pop("image")
        shards = [ShardInfo(**s) for s in d.pop("shards")]
        return cls(mean=list(norm["mean"]), std=list(norm["std"]), size=int(image["size"]),
                   resize=str(image["resize"]), shards=shards, **d)


def save_manifest(manifest: Manifest, root: str | Path) -> Path:
    """Write ``manifest.json`` into ``root`` atomically; return its path."""
    path = Path(root) / schema.MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def load_manifest(root: str | Path, flag: str = "--data") -> Manifest:
    """Read and validate ``root/manifest.json``; explain missing or incompatible shards."""
    root = Path(root)
    path = root / schema.MANIFEST_NAME
    if not root.exists():
        raise SchemaError(f"shards folder {str(root)!r} does not exist (fix {flag})")
    if not path.is_file():
        raise no_manifest_error(str(root), flag)
    return decode_manifest(path.read_bytes(), str(path), str(root))


def no_manifest_error(root: str, flag: str) -> SchemaError:
    """Return the error for shards without a manifest (an interrupted or foreign folder)."""
    return SchemaError(f"{root!r} has no {schema.MANIFEST_NAME}: it is not a complete shards folder; "
                       f"run 'catsdogs preprocess --output {root}' or fix {flag}")


def decode_manifest(raw: bytes, where: str, root: str) -> Manifest:
    """Parse and version-check manifest bytes read from ``where`` (a path or URI) of shards ``root``."""
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{where!r} is not valid JSON ({exc}); re-run catsdogs preprocess") from None
    version = d.get("schema_version") if isinstance(d, dict) else None
    if version != schema.SCHEMA_VERSION:
        raise SchemaError(
            f"{where!r} has schema_version {version!r}, this catsdogs reads "
            f"{schema.SCHEMA_VERSION}; re-run 'catsdogs preprocess --overwrite --output {root}'"
        )
    try:
        return Manifest.from_json(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"{where!r} is malformed ({exc}); re-run catsdogs preprocess") from None
