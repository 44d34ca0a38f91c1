"""Where ``catsdogs preprocess`` writes: a temporary place first, published only when complete.

Two targets with one interface:

* :class:`LocalOutput` (paths, ``file://``): tasks write into a sibling temporary folder that is
  renamed over ``--output`` at the end (atomic on one POSIX file system, NFS included).
* :class:`RemoteOutput` (``s3a://``, ``hdfs://``): tasks upload their shards to a sibling temporary
  prefix; publishing copies it under ``--output`` and writes ``manifest.json`` LAST. S3 has no
  rename, so the manifest is the commit marker: readers refuse a folder without one.

Either way an interrupted run never leaves output that a reader takes for complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

from catsdogs import schema
from catsdogs.errors import ConfigError, OutputExistsError
from catsdogs.io import storage


def check_local_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``--overwrite``; never replace a folder that is not shards."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"output {str(out)!r} already exists (pass --overwrite to replace it, "
                                "or choose another --output)")
    if out.is_dir() and any(out.iterdir()) and not (out / schema.MANIFEST_NAME).is_file():
        raise OutputExistsError(f"output {str(out)!r} is a non-empty folder without {schema.MANIFEST_NAME};"
                                " refusing to replace it even with --overwrite (choose another --output)")


def _is_stale(name: str, out_name: str) -> bool:
    """Return True for ``OUTPUT.tmp-<host>-<pid>-<token>`` of a dead process on this host.

    A SIGKILLed run cannot clean up; its temporary folder may be as big as the output. Folders of
    live processes (a concurrent run) and of other hosts are never stale.
    """
    prefix = f"{out_name}.tmp-"
    if not name.startswith(prefix):
        return False
    parts = name[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit() \
            or int(parts[1]) == os.getpid():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def remove_stale_tmp(out: Path) -> None:
    """Delete temporary folders next to ``out`` left by killed runs on this host (:func:`_is_stale`)."""
    for path in out.parent.glob(f"{out.name}.tmp-*"):
        if _is_stale(path.name, out.name):
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_remote_tmp(out: str) -> None:
    """Delete temporary prefixes next to remote ``out`` left by killed runs on this host."""
    parent, _, name = out.rstrip("/").rpartition("/")
    for entry in storage.list_names(parent):
        if _is_stale(entry, name):
            storage.delete_tree(f"{parent}/{entry}")


def _tmp_name(name: str) -> str:
    """Return the temporary sibling name of output ``name``: host and pid say whose it is."""
    return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class LocalOutput:
    """A local output folder: tasks and the driver write into ``stage``, renamed to ``out`` at the end."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        self.overwrite = overwrite
        check_local_output(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        self.stage = out.with_name(_tmp_name(out.name))
        self.stage.mkdir()
        self.task_root = str(self.stage)
        """Where the Spark tasks write shards (the same folder as ``stage`` here)."""

    def publish(self) -> None:
        """Move the finished folder to ``out``; an old output is removed only afterwards."""
        out = self.out
        check_local_output(out, self.overwrite)
        if out.exists() or out.is_symlink():
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            os.replace(out, old)
            os.replace(self.stage, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(self.stage, out)

    def abort(self) -> None:
        """Delete everything this run wrote."""
        shutil.rmtree(self.stage, ignore_errors=True)

    def __str__(self) -> str:
        return str(self.out)


class RemoteOutput:
    """An output prefix on S3 or HDFS: tasks upload to a temporary prefix, the driver stages locally."""

    def __init__(self, out: str, overwrite: bool) -> None:
        self.out = out.rstrip("/")
        self.overwrite = overwrite
        loc = storage.locate(self.out, "--output")
        if storage.scheme_of(out) in ("s3", "s3a", "s3n") and "/" not in loc.path:
            raise ConfigError(f"--output {out!r} is a whole bucket; name a prefix inside it "
                              f"(e.g. {self.out}/shards) so --overwrite never empties the bucket")
        self._check()
        remove_stale_remote_tmp(self.out)
        parent, _, name = self.out.rpartition("/")
        self.task_root = f"{parent}/{_tmp_name(name)}"
        """The temporary prefix the Spark tasks upload shards into."""
        self.stage = Path(tempfile.mkdtemp(prefix="catsdogs-manifest-"))
        """Local folder for the driver's files (manifest, files.csv, config), uploaded on publish."""

    def _check(self) -> None:
        """Refuse an existing output unless ``--overwrite``; never replace a prefix that is not shards."""
        found = storage.list_files(self.out, "--output")
        if not found:
            return
        if not self.overwrite:
            raise OutputExistsError(f"output {self.out!r} already exists (pass --overwrite to replace "
                                    "it, or choose another --output)")
        if schema.MANIFEST_NAME not in {rel for rel, _ in found}:
            raise OutputExistsError(f"output {self.out!r} holds files but no {schema.MANIFEST_NAME}; "
                                    "refusing to replace it even with --overwrite (choose another --output)")

    def publish(self) -> None:
        """Copy the run under ``out`` with manifest.json last, then drop the temporary prefix.

        An old output loses its manifest first, so at no moment does a reader see a manifest next to
        a mix of old and new shards; if publishing dies half-way, ``out`` has no manifest and every
        reader refuses it until the run is repeated.
        """
        self._check()
        storage.upload_tree(self.stage, self.task_root)
        new = [rel for rel, _ in storage.list_files(self.task_root)]
        if schema.MANIFEST_NAME not in new:
            raise RuntimeError(f"{self.task_root}: {schema.MANIFEST_NAME} was not staged")
        storage.delete(storage.join(self.out, schema.MANIFEST_NAME))
        storage.delete_tree(self.out)
        for rel in [r for r in new if r != schema.MANIFEST_NAME] + [schema.MANIFEST_NAME]:
            storage.copy(storage.join(self.task_root, rel), storage.join(self.out, rel))
        self.abort()

    def abort(self) -> None:
        """Delete the temporary prefix and the local staging folder."""
        try:
            storage.delete_tree(self.task_root)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def __str__(self) -> str:
        return self.out


def open_output(output: str, overwrite: bool) -> LocalOutput | RemoteOutput:
    """Return the output target for ``--output`` (a resolved local path or a remote URI)."""
    if storage.is_remote(output):
        return RemoteOutput(output, overwrite)
    return LocalOutput(Path(output), overwrite)
