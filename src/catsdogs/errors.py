"""Exceptions for user-facing failures.

Anything derived from :class:`CatsdogsError` is a user mistake or bad input: the CLI prints its
message as one line and exits with ``exit_code`` (no traceback unless ``--debug``). Every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class CatsdogsError(Exception):
    """Base class for errors that the user can fix; the message names the value and the fix."""

    exit_code: int = 2


class ConfigError(CatsdogsError):
    """A flag or config-file value is invalid."""


class InputError(CatsdogsError):
    """An input path is missing, empty or laid out wrongly."""


class OutputExistsError(CatsdogsError):
    """The output already exists and ``--overwrite`` was not given."""


class SchemaError(CatsdogsError):
    """Shards or a manifest were written by an incompatible version, or are incomplete."""


class CheckpointError(CatsdogsError):
    """A run folder has no usable checkpoint."""


class TooManySkippedError(CatsdogsError):
    """More images failed to decode than the configured bound allows."""


class DownloadError(CatsdogsError):
    """The archive could not be fetched: no network, an HTTP error, or a connection that kept dropping."""


class ChecksumError(DownloadError):
    """The downloaded archive's size or sha256 is not the expected one (the file is deleted)."""


class ArchiveError(CatsdogsError):
    """The archive is not a zip, or a member is unsafe (escapes the output, a link, too large)."""


class DiskFullError(CatsdogsError):
    """Not enough free disk space for the download or its extraction (ENOSPC)."""


class ImageDecodeError(Exception):
    """One image could not be decoded; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
