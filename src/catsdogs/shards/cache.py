"""Local, checksum-verified copies of remote shards (``--data s3a://...``) for train and evaluate.

Training reads every shard once per epoch in random order; doing that over the network would tie
each epoch's speed to the store. So remote shards are copied once into a cache folder, each file is
checked against the sha256 the manifest recorded, and the readers memory-map the local copy as for
any local shards. A second run finds the files in place and only re-hashes them (the 221 MB of
64-px shards of the real photos: 6.0 s cold vs 3.8 s warm for a whole one-step ``catsdogs train``,
docs/benchmarks/remote_storage.md).
The manifest is written to the cache last, so an interrupted copy is never taken for complete.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from catsdogs import schema
from catsdogs.errors import SchemaError
from catsdogs.io import storage
from catsdogs.io.atomic import atomic_write_bytes
from catsdogs.io.checksum import sha256_file
from catsdogs.shards.manifest import Manifest, decode_manifest, load_manifest, no_manifest_error

CACHE_ENV = "CATSDOGS_CACHE"
"""Environment variable naming the cache folder when ``--cache-dir`` is not given."""


def default_cache_dir() -> Path:
    """Return ``$CATSDOGS_CACHE``, else ``$XDG_CACHE_HOME/catsdogs``, else ``~/.cache/catsdogs``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "catsdogs"


def cache_folder(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cache folder of one remote shards URI: ``<cache>/shards/<name>-<hash of uri>``."""
    uri = uri.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = uri.rsplit("/", 1)[-1] or "shards"
    return Path(cache_dir or default_cache_dir()).expanduser() / "shards" / f"{name}-{digest}"


def _remote_manifest_bytes(uri: str, flag: str) -> bytes:
    """Read ``uri/manifest.json``; a missing one means no complete shards there."""
    try:
        return storage.read_bytes(storage.join(uri, schema.MANIFEST_NAME))
    except FileNotFoundError:
        raise no_manifest_error(uri, flag) from None
    except OSError as exc:
        raise storage.wrap_error(uri, exc, flag) from None


def _parse(uri: str, raw: bytes) -> Manifest:
    """Parse and version-check a remote manifest (the same checks as a local one)."""
    return decode_manifest(raw, storage.join(uri, schema.MANIFEST_NAME), uri)


def fetch_manifest(data: str, flag: str = "--data") -> Manifest:
    """Return the manifest of local or remote shards without copying any shard."""
    if storage.is_remote(data):
        uri = data.rstrip("/")
        return _parse(uri, _remote_manifest_bytes(uri, flag))
    return load_manifest(data, flag)


def local_shards(data: str, cache_dir: str | Path | None = None, flag: str = "--data", quiet: bool = False
                 ) -> str:
    """Return a local folder holding the shards of ``data``: ``data`` itself unless it is remote.

    Remote shards are fetched into :func:`cache_folder` and verified against the manifest's sha256;
    files already there with the right checksum are kept. Raises SchemaError naming ``flag`` for a
    URI without a manifest or a file whose checksum does not match after download.
    """
    if not storage.is_remote(data):
        return data
    uri = data.rstrip("/")
    raw = _remote_manifest_bytes(uri, flag)
    manifest = _parse(uri, raw)
    local = cache_folder(uri, cache_dir)
    expected: dict[str, str] = {}
    for info in manifest.shards:
        expected[info.x] = info.x_sha256
        expected[info.y] = info.y_sha256
    fetched = sum(_refresh(uri, local, rel, sha) for rel, sha in sorted(expected.items()))
    for rel in (schema.FILES_CSV_NAME, schema.CONFIG_NAME):  # small, for a complete local copy
        if (local / rel).is_file() and not fetched:
            continue  # the cache was complete and verified: these came with it
        try:
            storage.download(storage.join(uri, rel), local / rel)
        except FileNotFoundError:
            pass
    atomic_write_bytes(local / schema.MANIFEST_NAME, raw)
    if not quiet:
        print(f"catsdogs: {uri} -> {local} ({len(expected)} shard files, {fetched / 1e6:,.1f} MB "
              f"fetched, the rest already cached and verified)", file=sys.stderr)
    return str(local)


def partial_copy(data: str, manifest: Manifest, split: str, rows: int = 0,
                 cache_dir: str | Path | None = None, positions: set[int] | None = None) -> str:
    """Copy (verified) only some shards of ``split``; return the local folder (``data`` itself if local).

    The first shards covering ``rows`` rows, or the shards at ``positions`` in the split's list. For a
    driver whose executors read the shards themselves (the forward passes on Spark): it reads just the
    int8 calibration images, or the few images a report shows. The folder is the one
    :func:`local_shards` fills, but no manifest is written into it, so it is never taken for a
    complete copy.
    """
    if not storage.is_remote(data):
        return data
    uri = data.rstrip("/")
    local = cache_folder(uri, cache_dir)
    covered = 0
    for pos, info in enumerate(manifest.split_shards(split)):
        if positions is None and covered >= rows:
            break
        if positions is not None and pos not in positions:
            continue
        covered += info.rows
        for rel, sha in dict(((info.x, info.x_sha256), (info.y, info.y_sha256))).items():
            _refresh(uri, local, rel, sha)
    return str(local)


def fetch_verified(uri: str, rel: str, path: Path, sha: str) -> None:
    """Download the shard file ``rel`` of ``uri`` to ``path``, checked against the manifest's sha256.

    A file that does not match is deleted and refused: it changed while being read, or is damaged.
    """
    got = storage.download(storage.join(uri, rel), path)
    if sha and got != sha:
        path.unlink(missing_ok=True)
        raise SchemaError(f"{uri}/{rel} has sha256 {got[:12]}..., the manifest says {sha[:12]}...: "
                          f"the shards changed while being read, or are damaged; re-run catsdogs preprocess")


def _refresh(uri: str, local: Path, rel: str, sha: str) -> int:
    """Make the cached copy of ``rel`` under ``local`` current; return the bytes fetched (0: it was)."""
    path = local / rel
    if path.is_file() and sha and sha256_file(path) == sha:
        return 0
    (local / schema.MANIFEST_NAME).unlink(missing_ok=True)  # the cached copy is incomplete now
    fetch_verified(uri, rel, path, sha)
    return path.stat().st_size
