"""``catsdogs download``: the archive into ``OUTPUT/PetImages``, verified, once.

Steps: resolve the source (flags, environment, official default; :mod:`~catsdogs.download.source`),
fetch it resumably into ``OUTPUT/PetImages-<sha>.zip`` and verify its size and sha256
(:mod:`~catsdogs.download.fetch`), unpack it safely into a staged folder
(:mod:`~catsdogs.download.extract`), record the download in ``OUTPUT/download.json`` and rename the
staged folder to ``OUTPUT/PetImages``. The images are complete exactly when both exist and the record
names this source's sha256; a second call then fetches nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from catsdogs.config import DownloadConfig, save_config
from catsdogs.download.extract import unpack
from catsdogs.download.fetch import fetch
from catsdogs.download.source import DATA_DIR, MARKER_NAME, Source, resolve_source
from catsdogs.errors import ConfigError, OutputExistsError


def _recorded_sha256(output: Path) -> str | None:
    """Return the sha256 recorded in ``OUTPUT/download.json``, or None when there is no valid record."""
    try:
        record = json.loads((output / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    digest = record.get("sha256") if isinstance(record, dict) else None
    return digest if isinstance(digest, str) else None


def is_complete(output: Path, source: Source) -> bool:
    """Return True when ``OUTPUT/PetImages`` holds this source's verified archive.

    Raises :class:`OutputExistsError` when ``OUTPUT/PetImages`` exists but came from elsewhere (no
    record: unpacked by hand; another sha256: another archive): it is never overwritten.
    """
    data = output / DATA_DIR
    recorded = _recorded_sha256(output)
    if data.is_dir() and not data.is_symlink() and recorded == source.sha256:
        return True
    if data.exists() or data.is_symlink():
        if recorded is None:
            raise OutputExistsError(f"{str(data)!r} exists but was not written by catsdogs download (no "
                                    f"{MARKER_NAME}); use it as it is (catsdogs run --data {data}), or "
                                    f"delete it to download again, or choose another --output")
        raise OutputExistsError(f"{str(data)!r} holds another archive (sha256 {recorded}, not "
                                f"{source.sha256}); delete it or choose another --output")
    return False


def main(cfg: DownloadConfig) -> int:
    """CLI entry point of ``catsdogs download``; returns the exit code."""
    source = resolve_source(cfg.url, cfg.sha256, cfg.archive_bytes)
    output = Path(cfg.output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a file; give a folder (default: data)")
    data = output / DATA_DIR
    if is_complete(output, source):
        print(f"{data} is complete (archive sha256 {source.sha256}, verified when it was downloaded); "
              f"nothing to fetch", flush=True)
        return 0
    output.mkdir(parents=True, exist_ok=True)
    archive = output / source.archive_name
    print(f"download: {source.url} -> {archive}", flush=True)
    fetch(source, archive, progress=True)
    unpacked = unpack(archive, output, cfg.max_unpacked_bytes, progress=True)
    marker = output / MARKER_NAME
    try:
        # The record goes first: a kill before the rename leaves a record without PetImages, which
        # is_complete reads as "not done"; PetImages without a record would be taken for hand-made.
        save_config(dataclasses.replace(cfg, output=str(output), url=source.url, sha256=source.sha256,
                                        archive_bytes=archive.stat().st_size), marker)
        unpacked.target.publish()
    except BaseException:
        unpacked.target.abort()
        marker.unlink(missing_ok=True)
        raise
    if not cfg.keep_archive:
        archive.unlink()
    print(f"done: {data} ({unpacked.files:,} files, {unpacked.bytes / 1e6:,.1f} MB unpacked); next: "
          f"catsdogs run --data {data} --output runs/NAME (or make run)", flush=True)
    return 0
