"""Safe, atomic unpacking of the verified zip archive.

Every member is checked before a byte is written: no absolute path, no ``..``, no backslash or drive
letter, no link, no duplicate, and the declared sizes must add up to at most ``--max-unpacked-bytes``
(zipfile never inflates a member past its declared size, and the copy counts the bytes again). The
image folder is unpacked into a temporary sibling (:class:`catsdogs.io.outputs.LocalOutput`) that the
caller renames to ``OUTPUT/PetImages`` only when it is complete; a killed extraction leaves only that
temporary folder, which the next call deletes. Files are created with ``O_EXCL | O_NOFOLLOW``, so
nothing is written through a link.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from catsdogs.download.source import DATA_DIR, MAX_UNPACKED_BYTES
from catsdogs.errors import ArchiveError, DiskFullError
from catsdogs.io.atomic import atomic_open
from catsdogs.io.outputs import LocalOutput
from catsdogs.progress import progress_bar

CHUNK_BYTES = 1 << 20
"""Copy size while inflating members (1 MiB)."""
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class _Member:
    """One archive member that passed the checks, and where it goes relative to OUTPUT."""

    info: zipfile.ZipInfo
    parts: tuple[str, ...]


@dataclass
class Unpacked:
    """A staged extraction: ``target.publish()`` makes ``OUTPUT/PetImages`` appear, ``abort()`` drops it."""

    target: LocalOutput
    files: int
    bytes: int


def _unsafe(name: str, why: str) -> ArchiveError:
    return ArchiveError(f"archive member {name!r} {why}; refused, nothing was unpacked (the archive is "
                        f"not the expected one: fix --url/--sha256)")


def _member_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """Return a member's path components, or raise when it could land outside the output folder."""
    name = info.filename
    if "\\" in name or "\x00" in name:
        raise _unsafe(name, "has a backslash or NUL in its name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise _unsafe(name, "has an absolute path")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if not parts or any(p == ".." for p in parts):
        raise _unsafe(name, "would be written outside the output folder")
    if ":" in parts[0]:
        raise _unsafe(name, "names a drive")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise _unsafe(name, "is a symbolic link")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: DOS-made
        raise _unsafe(name, "is not a regular file or folder")
    return parts


def _plan(zf: zipfile.ZipFile, max_bytes: int) -> tuple[list[_Member], int]:
    """Check every member; return the files to write and their total declared size."""
    members: list[_Member] = []
    seen: set[tuple[str, ...]] = set()
    total = 0
    for info in zf.infolist():
        parts = _member_parts(info)
        if parts in seen:
            raise _unsafe(info.filename, "appears twice")
        seen.add(parts)
        if info.is_dir():
            continue
        if parts == (DATA_DIR,):
            raise _unsafe(info.filename, f"is a file where the {DATA_DIR}/ folder should be")
        total += info.file_size
        if total > max_bytes:
            raise ArchiveError(f"the archive unpacks to more than --max-unpacked-bytes {max_bytes:,} bytes; "
                               f"refused, nothing was unpacked (raise --max-unpacked-bytes if it is right)")
        members.append(_Member(info, parts))
    if not any(m.parts[0] == DATA_DIR and len(m.parts) > 1 for m in members):
        raise ArchiveError(f"the archive holds no {DATA_DIR}/ folder; it is not the Cats and Dogs archive "
                           f"(fix --url/--sha256)")
    return members, total


def _copy(src: IO[bytes], dst: IO[bytes], limit: int, name: str) -> int:
    """Copy at most ``limit`` bytes of a member; return the count (more than declared is refused)."""
    done = 0
    while block := src.read(CHUNK_BYTES):
        done += len(block)
        if done > limit:
            raise _unsafe(name, f"inflates past its declared {limit:,} bytes")
        dst.write(block)
    return done


def _write_member(zf: zipfile.ZipFile, member: _Member, dest: Path) -> int:
    """Write one member to ``dest`` (a new file, never through a link); return its size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, _CREATE_FLAGS, 0o666)
    with os.fdopen(fd, "wb") as dst, zf.open(member.info) as src:
        return _copy(src, dst, member.info.file_size, member.info.filename)


def _write_extra(zf: zipfile.ZipFile, member: _Member, output: Path) -> int:
    """Write a file outside the image folder (licence, readme) atomically, replacing an older copy."""
    dest = output.joinpath(*member.parts)
    for i in range(1, len(member.parts) + 1):
        if output.joinpath(*member.parts[:i]).is_symlink():
            raise ArchiveError(f"{str(output.joinpath(*member.parts[:i]))!r} is a symbolic link; remove it "
                               f"(nothing is written through links)")
    with atomic_open(dest, "wb") as dst, zf.open(member.info) as src:
        return _copy(src, dst, member.info.file_size, member.info.filename)


def unpack(archive: Path, output: Path, max_bytes: int = MAX_UNPACKED_BYTES,
           progress: bool = True) -> Unpacked:
    """Check and unpack ``archive``: ``PetImages/`` into a staged folder, other files into ``output``.

    The caller publishes the staged folder (``Unpacked.target.publish()``) once it has recorded the
    download; on any error here the staged folder is deleted. Raises :class:`ArchiveError` for an
    unsafe or oversized archive and :class:`DiskFullError` when the disk fills up.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{str(archive)!r} is not a readable zip archive ({exc}); delete it and run "
                           f"again (fix --url/--sha256)") from None
    with zf:
        members, total = _plan(zf, max_bytes)
        free = shutil.disk_usage(output).free
        if free < total:
            raise DiskFullError(f"disk full: unpacking needs {total:,} bytes in {str(output)!r}, {free:,} "
                                f"are free (free space or choose another --output)")
        target = LocalOutput(output / DATA_DIR, overwrite=False)
        written = 0
        try:
            with progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="unpack",
                      file=sys.stderr, disable=not progress, mininterval=0.5, dynamic_ncols=True) as bar:
                for member in members:
                    if member.parts[0] == DATA_DIR:
                        size = _write_member(zf, member, target.stage.joinpath(*member.parts[1:]))
                    else:
                        size = _write_extra(zf, member, output)
                    written += size
                    bar.update(size)
        except zipfile.BadZipFile as exc:
            target.abort()
            raise ArchiveError(f"{str(archive)!r} is damaged ({exc}); delete it and run again") from None
        except OSError as exc:
            target.abort()
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full while unpacking into {str(output)!r} after {written:,} of "
                                    f"{total:,} bytes (free space or choose another --output)") from None
            raise
        except BaseException:
            target.abort()
            raise
    return Unpacked(target, len(members), written)
