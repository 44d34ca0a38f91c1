"""Where the data comes from and what it unpacks to: the official archive, mirrors, names on disk.

The defaults are Microsoft's "Kaggle Cats and Dogs Dataset", checked in two independent public
sources. An internal mirror overrides them with environment variables (``CATSDOGS_DATA_URL``,
``CATSDOGS_DATA_SHA256`` and optionally ``CATSDOGS_DATA_SIZE``) or with ``--url``/``--sha256``; flags
beat the environment, the environment beats the defaults. An archive is always checked against a
sha256, so a URL without one is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from catsdogs.errors import ConfigError

OFFICIAL_URL = ("https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
                "kagglecatsanddogs_5340.zip")
"""Microsoft's download of the "Kaggle Cats and Dogs Dataset" (CDLA-Permissive-2.0)."""
OFFICIAL_BYTES = 824_887_076
"""Size of the official archive in bytes."""
OFFICIAL_SHA256 = "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"
"""sha256 of the official archive."""

ENV_URL = "CATSDOGS_DATA_URL"
"""Environment variable naming a mirror of the archive (needs ENV_SHA256 too)."""
ENV_SHA256 = "CATSDOGS_DATA_SHA256"
"""Environment variable with the mirror archive's sha256."""
ENV_BYTES = "CATSDOGS_DATA_SIZE"
"""Environment variable with the mirror archive's size in bytes (optional; checked before the hash)."""

DATA_DIR = "PetImages"
"""The archive's image folder (``PetImages/Cat``, ``PetImages/Dog``); it appears in OUTPUT only when
complete."""
MARKER_NAME = "download.json"
"""Written into OUTPUT once the archive is verified and unpacked: the resolved download settings,
including the archive's sha256. A later call that finds it (and DATA_DIR) fetches nothing."""
MAX_UNPACKED_BYTES = 4 << 30
"""Default bound on the archive's unpacked size (4 GiB). JPEGs barely compress, so the official
825 MB archive unpacks to about its own size; 4 GiB leaves room for a mirror with more photos and
stops a zip bomb long before it fills a disk."""
URL_SCHEMES = ("http", "https")
"""Schemes the downloader speaks (urllib would also open file: and ftp: URLs; they are not mirrors)."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Source:
    """One archive to fetch: its URL, expected sha256 and expected size (0 when unknown)."""

    url: str
    sha256: str
    size: int

    @property
    def archive_name(self) -> str:
        """The archive's file name in OUTPUT; tied to the hash, so another source never resumes it."""
        return f"{DATA_DIR}-{self.sha256[:16]}.zip"


def _check_sha256(value: str, where: str) -> str:
    """Return ``value`` lower-cased when it is 64 hex digits, else raise naming ``where``."""
    digest = value.strip().lower()
    if not _SHA256_RE.fullmatch(digest):
        raise ConfigError(f"{where} {value!r} is not a sha256 (64 hex digits)")
    return digest


def _check_url(value: str, where: str) -> str:
    """Return ``value`` when it is an http(s) URL with a host, else raise naming ``where``."""
    parsed = urlparse(value)
    if parsed.scheme not in URL_SCHEMES or not parsed.netloc:
        raise ConfigError(f"{where} {value!r} must be an http:// or https:// URL of the zip archive")
    return value


def resolve_source(url: str | None = None, sha256: str | None = None, size: int | None = None,
                   env: dict[str, str] | None = None) -> Source:
    """Return the archive to fetch: ``--url``/``--sha256`` flags, else the environment, else the default.

    A URL always comes with its sha256 (from the same layer). ``size`` not given means: the environment's
    size when the environment names the URL, the official size for the official URL, else unchecked.
    """
    env = dict(os.environ) if env is None else env
    if url or sha256:
        if not (url and sha256):
            missing = "--sha256" if url else "--url"
            raise ConfigError(f"--url and --sha256 go together: give {missing} too (the archive is "
                              f"always verified before it is unpacked)")
        return Source(_check_url(url, "--url"), _check_sha256(sha256, "--sha256"), size or 0)
    env_url, env_sha = env.get(ENV_URL, ""), env.get(ENV_SHA256, "")
    if env_url or env_sha:
        if not (env_url and env_sha):
            missing = ENV_SHA256 if env_url else ENV_URL
            raise ConfigError(f"{ENV_URL} and {ENV_SHA256} go together: set {missing} too, or unset both "
                              f"to download the official archive")
        raw_size = env.get(ENV_BYTES, "").strip()
        if raw_size and not raw_size.isdigit():
            raise ConfigError(f"{ENV_BYTES}={raw_size!r} must be a number of bytes (or unset)")
        return Source(_check_url(env_url, ENV_URL), _check_sha256(env_sha, ENV_SHA256),
                      size or int(raw_size or 0))
    return Source(OFFICIAL_URL, OFFICIAL_SHA256, size or OFFICIAL_BYTES)
