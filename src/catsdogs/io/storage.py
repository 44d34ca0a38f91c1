"""Remote storage by URI (``s3://``, ``s3a://``, ``hdfs://``) through :mod:`pyarrow.fs`.

Why pyarrow.fs: pyarrow is already a dependency (Parquet shards), and it runs inside the Python
workers that do catsdogs' I/O (pixels never go through Spark's JVM, see :mod:`catsdogs.preprocess.task`).
It speaks S3 with the AWS SDK for C++ and HDFS with libhdfs, the same client Hadoop tools use.
Local paths and ``file://`` URIs never come here: they keep POSIX I/O with atomic renames.

Settings come from the environment every AWS and Hadoop tool reads, so one shell works for
catsdogs, the aws CLI and Spark alike:

* S3: credentials from the AWS default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``~/.aws``, instance roles); ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for S3-compatible
  stores (MinIO, Ceph); ``AWS_REGION``/``AWS_DEFAULT_REGION``.
* HDFS: libhdfs from ``HADOOP_HOME`` (or ``ARROW_LIBHDFS_DIR``), ``JAVA_HOME`` and
  ``CLASSPATH=$(hadoop classpath --glob)`` on every node.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from catsdogs.errors import CatsdogsError
from catsdogs.io.atomic import atomic_open

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# pyarrow.fs is imported inside the functions that use it: it costs ~0.75 s at import (measured
# with pyarrow.parquet), and the config imports this module for SCHEMES on every CLI start.

SCHEMES: dict[str, str] = {"s3": "s3", "s3a": "s3", "s3n": "s3", "hdfs": "hdfs", "viewfs": "hdfs"}
"""URI schemes read and written directly, and the client that serves each (Hadoop's s3a/s3n are S3)."""

ENDPOINT_ENV: tuple[str, ...] = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Environment variables naming an S3-compatible endpoint, first set wins (AWS SDK convention)."""

REGION_ENV: tuple[str, ...] = ("AWS_REGION", "AWS_DEFAULT_REGION")
"""Environment variables naming the S3 region, first set wins."""

FALLBACK_REGION = "us-east-1"
"""Region used with a custom endpoint when none is set: S3-compatible stores ignore it, and without
one the AWS SDK would ask the EC2 metadata service, which does not exist off EC2."""

CHUNK_BYTES = 8 << 20
"""Buffer of one streamed copy between local disk and remote storage (8 MiB)."""


class StorageError(CatsdogsError):
    """Remote storage cannot be reached, or a URI names nothing usable; the message names the URI."""


def scheme_of(path: str) -> str:
    """Return the lower-case URI scheme of ``path`` ('' for a plain path)."""
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str | Path) -> bool:
    """Return True when ``path`` is a URI this module serves (s3, s3a, s3n, hdfs, viewfs)."""
    return isinstance(path, str) and scheme_of(path) in SCHEMES


def join(uri: str, *parts: str) -> str:
    """Join a URI and relative ``/``-separated parts."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


@dataclass(frozen=True)
class Location:
    """A remote URI resolved to a pyarrow file system and the path that file system understands."""

    uri: str
    fs: pafs.FileSystem
    path: str


def _env(names: tuple[str, ...]) -> str:
    """Return the first non-empty environment variable of ``names``, or ''."""
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str, region: str) -> pafs.FileSystem:
    """Return one S3 client per endpoint and region (cached: each client owns a connection pool)."""
    import pyarrow.fs as pafs

    kwargs: dict[str, object] = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        region = region or FALLBACK_REGION
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def _hdfs(host: str, port: int, user: str) -> pafs.FileSystem:
    """Return one HDFS client per namenode; explain a missing libhdfs instead of a JNI error."""
    import pyarrow.fs as pafs

    try:
        return pafs.HadoopFileSystem(host or "default", port, user=user or None)
    except OSError as exc:
        raise StorageError(
            f"cannot open HDFS at {host or 'default'}:{port} ({str(exc).splitlines()[0]}). hdfs:// is "
            f"read with libhdfs from a Hadoop install: on every node set HADOOP_HOME (or "
            f"ARROW_LIBHDFS_DIR to the folder of libhdfs.so), JAVA_HOME, and "
            f"CLASSPATH=$(hadoop classpath --glob); see docs/cluster.md"
        ) from None


def locate(uri: str, flag: str = "") -> Location:
    """Resolve ``uri`` to its file system and path; raise :class:`StorageError` for bad URIs."""
    hint = f" (fix {flag})" if flag else ""
    kind = SCHEMES.get(scheme_of(uri))
    parsed = urlparse(uri)
    if kind == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket: write s3a://BUCKET/prefix{hint}")
        fs = _s3(_env(ENDPOINT_ENV), _env(REGION_ENV))
        return Location(uri, fs, f"{parsed.netloc}{parsed.path}".rstrip("/"))
    if kind == "hdfs":
        fs = _hdfs(parsed.hostname or "", parsed.port or 0, parsed.username or "")
        return Location(uri, fs, parsed.path.rstrip("/") or "/")
    raise StorageError(f"{uri!r} is not a remote URI this catsdogs reads (s3a://, s3://, hdfs://){hint}")


def wrap_error(uri: str, exc: OSError, flag: str) -> StorageError:
    """Turn a pyarrow OSError into a one-line StorageError naming the URI."""
    hint = f" (fix {flag} or the storage settings)" if flag else ""
    return StorageError(f"{uri}: {str(exc).splitlines()[0]}{hint}")


def file_type(uri: str, flag: str = "") -> str:
    """Return 'file', 'dir' or 'missing' for ``uri`` (S3 prefixes holding objects count as dirs)."""
    import pyarrow.fs as pafs

    loc = locate(uri, flag)
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise wrap_error(uri, exc, flag) from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "missing")


def _entries(uri: str, recursive: bool, flag: str) -> tuple[Location, list[pafs.FileInfo]]:
    """List what is under ``uri`` (nothing for a missing folder); errors name the URI and flag."""
    import pyarrow.fs as pafs

    loc = locate(uri, flag)
    try:
        return loc, loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    except FileNotFoundError:
        return loc, []
    except OSError as exc:
        raise wrap_error(uri, exc, flag) from None


def list_files(uri: str, flag: str = "") -> list[tuple[str, int]]:
    """Return every file under ``uri`` recursively as (path relative to ``uri``, size in bytes), sorted."""
    import pyarrow.fs as pafs

    loc, infos = _entries(uri, True, flag)
    base = _norm(loc.path)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        path = _norm(info.path)
        if base and not path.startswith(f"{base}/"):
            raise StorageError(f"{uri}: listing returned {info.path!r}, outside {loc.path!r}")
        out.append((path[len(base) + 1:] if base else path, int(info.size or 0)))
    return sorted(out)


def _norm(path: str) -> str:
    """Return a listed path without scheme, authority or surrounding slashes, for comparison.

    File systems differ in how they name listed entries (S3 ``bucket/key``, HDFS ``/dir/file`` or a
    full ``hdfs://host:port/dir/file``); relative paths are computed on this common form.
    """
    return (urlparse(path).path if "://" in path else path).strip("/")


def list_names(uri: str, flag: str = "") -> list[str]:
    """Return the names directly under ``uri`` (files and folders, one level; cheap on S3)."""
    _, infos = _entries(uri, False, flag)
    return sorted(_norm(i.path).rsplit("/", 1)[-1] for i in infos)


def read_bytes(uri: str) -> bytes:
    """Read a whole remote file (raises OSError, FileNotFoundError included, like ``open``)."""
    loc = locate(uri)
    with loc.fs.open_input_stream(loc.path) as fh:
        return fh.read()


def _make_parent(loc: Location) -> None:
    """Create the parent folder on file systems with real folders (HDFS); S3 keys need none."""
    if SCHEMES.get(scheme_of(loc.uri)) != "s3":
        loc.fs.create_dir(loc.path.rsplit("/", 1)[0] or "/", recursive=True)


def upload(local: str | Path, uri: str) -> None:
    """Stream a local file to ``uri`` in :data:`CHUNK_BYTES` pieces, then check the stored size.

    The size check (one HEAD request) catches a store that kept something else than what was sent,
    e.g. an S3-compatible server that did not decode the SDK's chunked upload encoding.
    """
    loc = locate(uri)
    _make_parent(loc)
    with open(local, "rb") as src, loc.fs.open_output_stream(loc.path) as dst:
        while block := src.read(CHUNK_BYTES):
            dst.write(block)
    sent = os.path.getsize(local)
    stored = loc.fs.get_file_info(loc.path).size
    if stored != sent:
        raise StorageError(f"{uri}: the store kept {stored} bytes of the {sent} sent; check the storage "
                           f"settings (credentials, endpoint) and the store's S3 compatibility")


def upload_tree(local: str | Path, uri: str) -> None:
    """Upload every regular file under the local folder ``local`` to the same path under ``uri``.

    Symlinks are skipped: object stores have none (catsdogs' own scratch folders hold none either).
    """
    for path in sorted(Path(local).rglob("*")):
        if path.is_file() and not path.is_symlink():
            upload(path, join(uri, path.relative_to(local).as_posix()))


def download(uri: str, local: str | Path) -> str:
    """Stream ``uri`` to a local file atomically; return the sha256 of what was written."""
    loc = locate(uri)
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as src, atomic_open(local, "wb") as dst:
        while block := src.read(CHUNK_BYTES):
            h.update(block)
            dst.write(block)
    return h.hexdigest()


def copy(src: str, dst: str) -> None:
    """Copy one remote file to another place on the same store (server-side on S3)."""
    a, b = locate(src), locate(dst)
    _make_parent(b)
    a.fs.copy_file(a.path, b.path)


def delete(uri: str) -> None:
    """Delete one remote file; a missing file is fine."""
    loc = locate(uri)
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass


def delete_tree(uri: str) -> None:
    """Delete a remote folder and everything under it; a missing folder is fine."""
    loc = locate(uri)
    try:
        loc.fs.delete_dir(loc.path)
    except FileNotFoundError:
        pass


def exists(uri: str) -> bool:
    """Return True when ``uri`` names a file or a folder (a prefix holding objects, on S3)."""
    import pyarrow.fs as pafs

    loc = locate(uri)
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def publish(local: str | Path, uri: str) -> None:
    """Put a finished local file at ``uri`` so that no reader ever sees part of it.

    It is uploaded under a hidden temporary name beside ``uri`` and then moved: a rename on HDFS; on
    S3 one server-side copy, which creates the object whole (and the temporary one is deleted).
    """
    parent, _, name = uri.rstrip("/").rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    upload(local, tmp)
    try:
        a, b = locate(tmp), locate(uri)
        a.fs.move(a.path, b.path)
    finally:
        delete(tmp)
