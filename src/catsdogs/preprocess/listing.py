"""File discovery for ``catsdogs preprocess``: classes, image candidates and ignored files (driver).

Two layouts are read. Class folders (``PetImages/Cat/*.jpg``, ``PetImages/Dog/*.jpg``): a file's class
is the first folder under the input. Kaggle's competition layout (``train/cat.0.jpg``,
``train/dog.12.jpg``): a file's class is its name up to the first dot. ``--labels-from auto`` picks
names when the input has no subfolder and every image directly in it is named ``<class>.<rest>``;
``folder`` and ``name`` force one. Local folders are walked with ``os.walk``; s3a:// and hdfs://
inputs are listed through :mod:`catsdogs.io.storage` with the same rules, so both give the same
listing for the same tree.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable
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
IGNORED_NO_CLASS = "no_class_in_name"

LABELS_AUTO, LABELS_FOLDER, LABELS_NAME = schema.LABELS_AUTO, schema.LABELS_FOLDER, schema.LABELS_NAME

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
    labels_from: str = LABELS_FOLDER
    """How the classes were read: from class folders or from file names (``auto`` resolved)."""

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


def class_from_name(name: str) -> str | None:
    """Return the class in a Kaggle-style file name (``cat.0.jpg`` -> ``cat``), or None without one.

    The class is the name up to its first dot, and something must stand between it and the
    extension: ``cat.jpg`` has no class prefix.
    """
    stem = name.rsplit(".", 1)[0]
    head, dot, rest = stem.partition(".")
    return head if dot and head and rest else None


def _walk_images(root: Path, start: Path, ignored: list[Ignored]) -> list[str]:
    """Return image candidates under ``start``, recursively, as paths relative to ``root``.

    Symlinked folders are followed once; ignored files and hidden folders go to ``ignored``.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(start, followlinks=True):
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
                found.append(rel)
            else:
                ignored.append(Ignored(_printable(rel), reason))
    return found


def _require_classes(classes: list[str], where: str, by_name: bool = False, flat_images: int = 0) -> None:
    """Raise :class:`InputError` unless there are at least two classes (folders, or name prefixes)."""
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        if by_name:
            raise InputError(f"{where} needs images of at least two classes named <class>.<n>.jpg (e.g. "
                             f"cat.0.jpg and dog.0.jpg), found {found} (fix --input or --labels-from)")
        hint = (f"; its {flat_images} images directly inside are not all named <class>.<n>.jpg (for "
                f"labels in file names use --labels-from name)" if flat_images else "")
        raise InputError(f"{where} needs at least two class subfolders (e.g. Cat/ and Dog/), "
                         f"found {found}{hint} (fix --input)")


def _use_names(labels_from: str, class_dirs: list[str], top_files: Iterable[str]) -> bool:
    """Decide the layout: names when asked, or (auto) no subfolder and every top image is ``<class>.``."""
    if labels_from != LABELS_AUTO:
        return labels_from == LABELS_NAME
    images = [n for n in top_files if _classify_name(n) is None]
    return not class_dirs and bool(images) and all(class_from_name(n) for n in images)


def _by_name(paths: list[str], ignored: list[Ignored], where: str) -> tuple[list[str], list[Candidate]]:
    """Label image paths by their file names' class prefix; an image without one is ignored, counted."""
    named: list[tuple[str, str]] = []
    for rel in paths:
        cls = class_from_name(rel.rsplit("/", 1)[-1])
        if cls is None:
            ignored.append(Ignored(rel, IGNORED_NO_CLASS))
        else:
            named.append((rel, cls))
    classes = sorted({cls for _, cls in named})
    _require_classes(classes, where, by_name=True)
    index = {cls: i for i, cls in enumerate(classes)}
    return classes, [Candidate(rel, index[cls]) for rel, cls in named]


def _no_images(class_dir: str) -> InputError:
    """Return the error for a class folder without any image candidate."""
    return InputError(f"class folder {class_dir!r} has no image files "
                      f"({', '.join(sorted(schema.IMAGE_EXTENSIONS))}) (fix --input)")


def scan_input(input_dir: str | Path, labels_from: str = LABELS_AUTO) -> Listing:
    """List classes (sorted subfolder names, or name prefixes) and image candidates under ``input_dir``.

    Raises :class:`InputError` (naming ``--input``) for a missing input, a file, fewer than two
    classes or a class folder without any image candidate.
    """
    root = Path(input_dir).expanduser()
    if not str(input_dir):
        raise InputError("no input folder given; set --input to a folder with one subfolder per class")
    if not root.exists():
        raise InputError(f"input folder {str(root)!r} does not exist (fix --input)")
    if not root.is_dir():
        raise InputError(f"input {str(root)!r} is a file, not a folder of class subfolders (fix --input)")
    root = root.resolve()
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    top_files = [e.name for e in entries if not e.is_dir() and _printable(e.name) == e.name]
    where = f"input folder {str(root)!r}"
    if _use_names(labels_from, dirs, top_files):
        ignored: list[Ignored] = []
        classes, candidates = _by_name(_walk_images(root, root, ignored), ignored, where)
        return Listing(root=root, classes=classes, candidates=candidates, ignored=ignored,
                       labels_from=LABELS_NAME)
    ignored = []
    classes: list[str] = []
    for entry in entries:
        if entry.name.startswith("."):
            ignored.append(Ignored(_printable(entry.name), IGNORED_HIDDEN))
        elif _printable(entry.name) != entry.name:
            ignored.append(Ignored(_printable(entry.name), IGNORED_BAD_NAME))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            ignored.append(Ignored(_printable(entry.name), IGNORED_OUTSIDE))
    _require_classes(classes, where, flat_images=sum(_classify_name(n) is None for n in top_files))
    candidates: list[Candidate] = []
    for label, name in enumerate(classes):
        found = _walk_images(root, root / name, ignored)
        if not found:
            raise _no_images(str(root / name))
        candidates.extend(Candidate(rel, label) for rel in found)
    return Listing(root=root, classes=classes, candidates=candidates, ignored=ignored)


def scan_remote(uri: str, labels_from: str = LABELS_AUTO) -> Listing:
    """List classes and image candidates under a remote ``uri`` (s3a://, hdfs://), like :func:`scan_input`.

    Object stores have no folders of their own: a class is the first component of a file's key (or,
    labelled by name, the prefix of its file name). Hidden folders are recorded once each, as
    :func:`scan_input` does; there are no symlinks.
    """
    if storage.file_type(uri, "--input") == "file":
        raise InputError(f"input {uri!r} is a file, not a folder of class subfolders (fix --input)")
    files = storage.list_files(uri, "--input")
    if not files:
        raise InputError(f"input {uri!r} holds no files (fix --input)")
    root = uri.rstrip("/")
    where = f"input {uri!r}"
    ignored: list[Ignored] = []
    hidden_dirs: set[str] = set()
    by_class: dict[str, list[str]] = {}
    top_files: list[str] = []
    for rel, _size in files:
        parts = rel.split("/")
        hidden = next((i for i, p in enumerate(parts[:-1]) if p.startswith(".")), None)
        if hidden is not None:  # a file inside a hidden folder: count the folder once, not its files
            hidden_dirs.add("/".join(parts[:hidden + 1]))
        elif len(parts) == 1:
            top_files.append(rel)
        else:
            by_class.setdefault(parts[0], []).append(rel)
    ignored.extend(Ignored(d, IGNORED_HIDDEN) for d in sorted(hidden_dirs))
    if _use_names(labels_from, sorted(by_class), top_files):
        images: list[str] = []
        for rel in top_files + [r for members in by_class.values() for r in members]:
            reason = _classify_name(rel.rsplit("/", 1)[-1])
            if reason is None:
                images.append(rel)
            else:
                ignored.append(Ignored(rel, reason))
        classes, candidates = _by_name(sorted(images), ignored, where)
        return Listing(root=root, classes=classes, candidates=candidates, ignored=ignored,
                       labels_from=LABELS_NAME)
    ignored.extend(Ignored(rel, IGNORED_HIDDEN if rel.startswith(".") else IGNORED_OUTSIDE)
                   for rel in top_files)
    classes = sorted(by_class)
    _require_classes(classes, where, flat_images=sum(_classify_name(n) is None for n in top_files))
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
