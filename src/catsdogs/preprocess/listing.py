"""File discovery for ``catsdogs preprocess``: classes, image candidates and ignored files (driver).

Local folders are walked with ``os.walk``; s3a:// and hdfs:// inputs are listed through
:mod:`catsdogs.io.storage` with the same rules, so both give the same listing for the same tree.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from catsdogs import schema
from catsdogs.errors import InputError
from catsdogs.io import storage

# Reasons a file is ignored (not a candidate); they end up in the manifest's "ignored" section.
IGNORED_HIDDEN = "hidden"
IGNORED_OS_FILE = "os_file"
IGNORED_EXTENSION = "not_image_extension"
IGNORED_OUTSIDE = "outside_class_folder"
IGNORED_BAD_NAME = "name_not_utf8"

UNMATCHED_EXAMPLES = 20
"""Paths of ``--exclude`` that match no input file, quoted in the manifest (the rest are counted)."""


@dataclass(frozen=True)
class Candidate:
    """One file that looks like an image: its path relative to the input root and its label."""

    path: str
    label: int


@dataclass(frozen=True)
class Ignored:
    """One file (or hidden folder) skipped without decoding, and why."""

    path: str
    reason: str


@dataclass
class Listing:
    """The result of scanning an input folder: classes, image candidates and ignored entries."""

    root: Path | str
    """The input folder, resolved (a local path, or a remote URI for s3a:// / hdfs:// input)."""
    classes: list[str]
    candidates: list[Candidate]
    ignored: list[Ignored] = field(default_factory=list)

    def ignored_summary(self) -> dict[str, object]:
        """Return the manifest's ``ignored`` section: count, count per reason, sorted paths."""
        by_reason = Counter(i.reason for i in self.ignored)
        return {"count": len(self.ignored), "by_reason": dict(sorted(by_reason.items())),
                "paths": sorted(i.path for i in self.ignored)}


def _printable(rel: str) -> str:
    r"""Return ``rel`` safe for JSON/CSV: undecodable bytes (surrogate escapes) as ``\xNN``."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _classify_name(name: str) -> str | None:
    """Return an ignore reason for a file name, or None when it is an image candidate."""
    if name.lower() in schema.IGNORED_NAMES:
        return IGNORED_OS_FILE
    if name.startswith("."):
        return IGNORED_HIDDEN
    if Path(name).suffix.lower() not in schema.IMAGE_EXTENSIONS:
        return IGNORED_EXTENSION
    return None


def _walk_class(root: Path, class_dir: Path, label: int, candidates: list[Candidate],
                ignored: list[Ignored]) -> None:
    """Collect candidates under one class folder recursively (symlinked folders followed once)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: do not descend again
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):  # hidden folder (.git, .thumbnails): counted once, not entered
                ignored.append(Ignored(_printable((here / d).relative_to(root).as_posix()), IGNORED_HIDDEN))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = (here / name).relative_to(root).as_posix()
            # Bytes that are not UTF-8 (in the name or a parent folder) cannot go into files.csv/JSON.
            reason = IGNORED_BAD_NAME if _printable(rel) != rel else _classify_name(name)
            if reason is None:
                # Broken symlinks stay candidates: the task skips them with reason "broken_link".
                candidates.append(Candidate(rel, label))
            else:
                ignored.append(Ignored(_printable(rel), reason))


def _require_classes(classes: list[str], where: str) -> None:
    """Raise :class:`InputError` unless there are at least two class folders."""
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise InputError(f"{where} needs at least two class subfolders (e.g. Cat/ and Dog/), "
                         f"found {found} (fix --input)")


def _no_images(class_dir: str) -> InputError:
    """Return the error for a class folder without any image candidate."""
    return InputError(f"class folder {class_dir!r} has no image files "
                      f"({', '.join(sorted(schema.IMAGE_EXTENSIONS))}) (fix --input)")


def scan_input(input_dir: str | Path) -> Listing:
    """List classes (sorted subfolder names) and image candidates under ``input_dir``.

    Raises :class:`InputError` (naming ``--input``) for a missing input, a file, fewer than two
    class folders or a class without any image candidate.
    """
    root = Path(input_dir).expanduser()
    if not str(input_dir):
        raise InputError("no input folder given; set --input to a folder with one subfolder per class")
    if not root.exists():
        raise InputError(f"input folder {str(root)!r} does not exist (fix --input)")
    if not root.is_dir():
        raise InputError(f"input {str(root)!r} is a file, not a folder of class subfolders (fix --input)")
    root = root.resolve()
    ignored: list[Ignored] = []
    classes: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            ignored.append(Ignored(_printable(entry.name), IGNORED_HIDDEN))
        elif _printable(entry.name) != entry.name:
            ignored.append(Ignored(_printable(entry.name), IGNORED_BAD_NAME))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            ignored.append(Ignored(_printable(entry.name), IGNORED_OUTSIDE))
    _require_classes(classes, f"input folder {str(root)!r}")
    candidates: list[Candidate] = []
    for label, name in enumerate(classes):
        before = len(candidates)
        _walk_class(root, root / name, label, candidates, ignored)
        if len(candidates) == before:
            raise _no_images(str(root / name))
    return Listing(root=root, classes=classes, candidates=candidates, ignored=ignored)


def scan_remote(uri: str) -> Listing:
    """List classes and image candidates under a remote ``uri`` (s3a://, hdfs://), like :func:`scan_input`.

    Object stores have no folders of their own: a class is the first component of a file's key.
    Hidden folders are recorded once each, as :func:`scan_input` does; there are no symlinks.
    """
    if storage.file_type(uri, "--input") == "file":
        raise InputError(f"input {uri!r} is a file, not a folder of class subfolders (fix --input)")
    files = storage.list_files(uri, "--input")
    if not files:
        raise InputError(f"input {uri!r} holds no files (fix --input)")
    root = uri.rstrip("/")
    ignored: list[Ignored] = []
    hidden_dirs: set[str] = set()
    by_class: dict[str, list[str]] = {}
    for rel, _size in files:
        parts = rel.split("/")
        hidden = next((i for i, p in enumerate(parts[:-1]) if p.startswith(".")), None)
        if hidden is not None:  # a file inside a hidden folder: count the folder once, not its files
            hidden_dirs.add("/".join(parts[:hidden + 1]))
        elif len(parts) == 1:
            ignored.append(Ignored(rel, IGNORED_HIDDEN if rel.startswith(".") else IGNORED_OUTSIDE))
        else:
            by_class.setdefault(parts[0], []).append(rel)
    ignored.extend(Ignored(d, IGNORED_HIDDEN) for d in sorted(hidden_dirs))
    classes = sorted(by_class)
    _require_classes(classes, f"input {uri!r}")
    candidates: list[Candidate] = []
    for label, name in enumerate(classes):
        before = len(candidates)
        for rel in by_class[name]:
            reason = _classify_name(rel.rsplit("/", 1)[1])
            if reason is None:
                candidates.append(Candidate(rel, label))
            else:
                ignored.append(Ignored(rel, reason))
        if len(candidates) == before:
            raise _no_images(f"{root}/{name}")
    return Listing(root=root, classes=classes, candidates=candidates, ignored=ignored)


EXCLUDE_PATH_COLUMN = "path"
"""Column of an exclusion CSV (such as ``catsdogs audit``'s issues.csv) that names the files."""


def read_exclusions(path: str) -> list[str]:
    """Read ``--exclude``: a CSV with a ``path`` column, else one path per line (``#`` comments allowed).

    Returns the paths in file order without duplicates. A missing or unreadable file is an InputError.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--exclude {path!r} cannot be read ({exc.__class__.__name__}); give a file of "
                         "paths or an audit issues.csv") from None
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), []) if lines else []
    if EXCLUDE_PATH_COLUMN in header:
        paths = [rec[EXCLUDE_PATH_COLUMN] for rec in csv.DictReader(lines) if rec.get(EXCLUDE_PATH_COLUMN)]
    else:
        paths = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    return list(dict.fromkeys(p.strip() for p in paths))


def apply_exclusions(listing: Listing, paths: list[str]) -> tuple[Listing, dict[str, object]]:
    """Drop candidates named in ``paths`` (relative to the input, or absolute paths inside it).

    Returns the reduced listing and the manifest's ``excluded`` section: the dropped paths, and how many
    listed paths matched no candidate (a stale list is reported, not silently ignored).
    """
    root = str(listing.root).rstrip("/")
    wanted = set()
    for p in paths:
        rel = p[len(root) + 1:] if p.startswith(f"{root}/") else p
        wanted.add(rel.removeprefix("./"))
    kept = [c for c in listing.candidates if c.path not in wanted]
    dropped = sorted(c.path for c in listing.candidates if c.path in wanted)
    unmatched = sorted(wanted - set(dropped))
    section: dict[str, object] = {"count": len(dropped), "paths": dropped, "unmatched": len(unmatched),
                                  "unmatched_examples": unmatched[:UNMATCHED_EXAMPLES]}
    reduced = Listing(root=listing.root, classes=listing.classes, candidates=kept, ignored=listing.ignored)
    return reduced, section
