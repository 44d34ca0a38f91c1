"""Streamed, resumable, verified HTTP download of one archive (standard library only).

Bytes go to ``ARCHIVE.part``; a dropped connection or a killed process resumes with an HTTP Range
request where the part file ends. A server that ignores Range (answers 200) restarts the file from
byte 0, and so does one whose 206 starts elsewhere. Only a file whose size and sha256 match is renamed
to ``ARCHIVE``; a mismatching one is deleted.
"""

from __future__ import annotations

import errno
import http.client
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from tqdm import tqdm

from catsdogs import __version__
from catsdogs.download.source import ENV_URL, Source
from catsdogs.errors import ChecksumError, DiskFullError, DownloadError
from catsdogs.io.checksum import sha256_file
from catsdogs.progress import progress_bar

CHUNK_BYTES = 1 << 20
"""Read and write size (1 MiB): few system calls per second at any line speed, little memory."""
TIMEOUT_S = 60.0
"""Seconds without a byte before a connection counts as dropped (then resumed)."""
ATTEMPTS = 5
"""Connections tried per call; each resumes where the last one stopped. After that the command
fails and running it again resumes from the part file."""
RETRY_WAIT_S = 2.0
"""Pause before reconnecting after a drop, in seconds (doubled each time): rides out a brief outage."""
PART_SUFFIX = ".part"
"""Suffix of the file being downloaded."""
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Dropped(Exception):
    """The connection ended before the whole body arrived; the part file keeps what did."""


class _RangeRefused(Exception):
    """HTTP 416: the server has no bytes from the requested offset on."""


def _host(url: str) -> str:
    return urlparse(url).netloc


def _disk_full(path: Path, need: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"disk full: writing {path.name} needs {need:,} more bytes in {str(path.parent)!r}, "
                         f"{free:,} are free (free space or choose another --output)")


def _open(source: Source, start: int) -> http.client.HTTPResponse:
    """Send the GET (with ``Range`` from ``start`` when resuming); map failures to one-line errors."""
    headers = {"User-Agent": f"catsdogs/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(source.url, headers=headers)
    try:
        # B310 (file:/ URLs): download.source admits only http:// and https:// URLs.
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # nosec B310
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the part file already holds everything the server has
            raise _RangeRefused from None
        raise DownloadError(f"HTTP {exc.code} {exc.reason} from {source.url} "
                            f"(fix --url or {ENV_URL})") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot reach {_host(source.url)}: {exc.reason} (check the network, or point "
                            f"{ENV_URL} at a reachable mirror)") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise DownloadError(f"cannot reach {_host(source.url)}: {exc!r} (check the network, or point "
                            f"{ENV_URL} at a reachable mirror)") from None


def _body_start(resp: http.client.HTTPResponse, start: int) -> tuple[int, int]:
    """Return (offset where the body starts, total size or 0) of a response to a request from ``start``."""
    if resp.status == 206:
        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if match:
            total = int(match.group(3)) if match.group(3) != "*" else 0
            return int(match.group(1)), total
        return -1, 0  # a 206 we cannot place: restart from 0
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else 0


def _copy(resp: http.client.HTTPResponse, fh: IO[bytes], bar: tqdm, limit: int) -> None:
    """Append the body to ``fh`` until it ends; raise :class:`_Dropped` when the connection breaks."""
    written = fh.tell()
    while True:
        try:
            block = resp.read(CHUNK_BYTES)
        except (http.client.IncompleteRead, TimeoutError, ConnectionError, OSError) as exc:
            raise _Dropped(repr(exc)) from None
        if not block:
            return
        written += len(block)
        if limit and written > limit:
            raise ChecksumError(f"the server sent more than the expected {limit:,} bytes; deleted the "
                                f"download (fix --url/--sha256 or the mirror)")
        fh.write(block)
        bar.update(len(block))


def _attempt(source: Source, part: Path, bar: tqdm) -> None:
    """One connection: resume ``part`` (or restart it) and copy the body; raise _Dropped on a break."""
    have = part.stat().st_size if part.exists() else 0
    if source.size and have > source.size:
        part.unlink()
        have = 0
    if source.size and have == source.size:
        return
    if source.size and shutil.disk_usage(part.parent).free < source.size - have:
        raise _disk_full(part, source.size - have)
    try:
        resp = _open(source, have)
    except _RangeRefused:
        if not source.size:
            return  # the part file already holds the whole body; _verify decides
        part.unlink()
        raise _Dropped(f"the server refused a range from byte {have:,}; restarting from 0") from None
    with resp:
        offset, total = _body_start(resp, have)
        if offset != have:
            if have:
                print(f"download: the server answered {resp.status} instead of bytes {have:,}-; "
                      "restarting from byte 0", file=sys.stderr, flush=True)
            if offset != 0:  # a 206 for a range we did not ask for: ask again from the start
                part.unlink(missing_ok=True)
                raise _Dropped(f"unexpected range from byte {offset}")
            have = 0
        if source.size and total and total != source.size:
            raise ChecksumError(f"the server offers {total:,} bytes, expected {source.size:,}; "
                                f"deleted the download (fix --url/--sha256 or the mirror)")
        expected = source.size or total
        if expected and bar.total != expected:
            bar.total = expected
        bar.n = have
        bar.refresh()
        with open(part, "r+b" if have else "wb") as fh:
            fh.truncate(have)
            fh.seek(have)
            _copy(resp, fh, bar, expected)
    got = part.stat().st_size
    if expected and got < expected:
        raise _Dropped(f"the body ended at byte {got:,}")


def _verify(source: Source, part: Path) -> None:
    """Check the finished part file's size and sha256; delete it and raise when either is wrong."""
    got = part.stat().st_size
    if source.size and got != source.size:
        part.unlink()
        raise ChecksumError(f"downloaded {got:,} bytes, expected {source.size:,}; deleted the download "
                            f"(fix --url/--sha256 or the mirror)")
    digest = sha256_file(part)
    if digest != source.sha256:
        part.unlink()
        raise ChecksumError(f"downloaded archive has sha256 {digest}, expected {source.sha256}; deleted "
                            f"it (fix --sha256 or --url, or the mirror)")


def fetch(source: Source, dest: Path, progress: bool = True) -> Path:
    """Download ``source`` to ``dest`` (through ``dest.part``), verified; return ``dest``.

    An existing ``dest`` is re-verified and reused. Raises :class:`DownloadError` (network, HTTP),
    :class:`ChecksumError` (size or sha256) or :class:`DiskFullError` (ENOSPC), each with one line.
    """
    if dest.is_file():
        try:
            _verify(source, dest)
            return dest
        except ChecksumError:
            pass  # a damaged earlier download (already deleted): fetch it again
    part = dest.with_name(dest.name + PART_SUFFIX)
    wait = RETRY_WAIT_S
    try:
        with progress_bar(total=source.size or None, unit="B", unit_scale=True, unit_divisor=1024,
                          file=sys.stderr, desc="download", disable=not progress, mininterval=0.5,
                          dynamic_ncols=True) as bar:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    _attempt(source, part, bar)
                    break
                except _Dropped as exc:
                    have = part.stat().st_size if part.exists() else 0
                    if attempt == ATTEMPTS:
                        raise DownloadError(f"the connection to {_host(source.url)} dropped {ATTEMPTS} times "
                                            f"(last: {exc}) with {have:,} bytes saved in {str(part)!r}; run "
                                            f"the same command again to resume") from None
                    print(f"download: connection dropped at {have:,} bytes ({exc}); resuming in {wait:g} s",
                          file=sys.stderr, flush=True)
                    time.sleep(wait)
                    wait *= 2
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(part, max(source.size - (part.stat().st_size if part.exists() else 0), 0)) \
                from None
        raise
    _verify(source, part)
    part.replace(dest)
    return dest
