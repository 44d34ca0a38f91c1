"""``catsdogs predict``: classify image files, folders and glob patterns with a trained run.

Files are decoded in a small thread pool (Pillow releases the GIL while decoding) a few batches
ahead of the model, so decoding and the forward pass overlap. An undecodable file becomes a row
with an ``error`` reason instead of stopping the run.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from catsdogs import schema
from catsdogs.config import PredictConfig, check_required, need, save_config
from catsdogs.errors import ConfigError, ImageDecodeError, InputError
from catsdogs.infer.explain import explain_files
from catsdogs.infer.load import load_predictor
from catsdogs.infer.prediction import Prediction
from catsdogs.infer.predictor import Predictor, format_looks_like
from catsdogs.io import storage
from catsdogs.io.atomic import atomic_open
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS
from catsdogs.progress import progress_bar
from catsdogs.runtime import cores

if TYPE_CHECKING:
    import pyarrow as pa

CSV_COLUMNS: tuple[str, ...] = ("path", "label", "probability", "error", "ood_score", "looks_like")
"""``label`` is ``unknown`` for an image the run's detector rejects (``probability`` is still that of
the most likely class); ``ood_score`` is the detector's score (higher = less like the training photos,
empty without a detector); ``looks_like`` names the ImageNet concepts the image looks like: for an
unknown image what it shows instead (``badger 41 %, lesser panda 12 %``), for a class a strong concept no
class owns (``hamster 61 %``, usually empty); empty for runs trained without ImageNet weights."""
OUTPUT_FORMATS: tuple[str, ...] = (".csv", ".json", ".parquet")
"""``--output`` types: CSV (:data:`CSV_COLUMNS`), JSON (every field), Parquet (CSV's columns, typed)."""
_GLOB_CHARS = frozenset("*?[")
# Decode threads: 2-4 keep a 2-core box busy while the model runs; more only adds contention.
_MAX_DECODE_WORKERS = 4
# Batches decoded ahead of the model: bounds memory to ~(depth + 1) * batch_size images.
_PREFETCH_BATCHES = 2


def is_candidate(path: Path) -> bool:
    """Return True for a file a folder walk should classify (same rules as preprocess)."""
    name = path.name
    return (not name.startswith(".") and name.lower() not in schema.IGNORED_NAMES
            and path.suffix.lower() in schema.IMAGE_EXTENSIONS)


def walk_folder(folder: Path) -> Iterator[Path]:
    """Yield candidate image files under ``folder`` recursively, sorted, skipping hidden folders."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_candidate(path):
                yield path


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Expand files, folders and glob patterns (quoted or not) into a de-duplicated file list.

    An explicitly named file is always kept (a non-image becomes an error row); a missing path or a
    pattern matching nothing raises :class:`InputError`.
    """
    if not patterns:
        raise InputError("no input given; pass image files, folders or glob patterns as PATHS")
    found: list[Path] = []
    for text in patterns:
        if storage.is_remote(text):
            raise InputError(f"{text!r}: s3a:// and hdfs:// inputs are read by Spark tasks; add --master "
                             f"(local[*] runs them on this machine)")
        path = Path(text).expanduser()
        if path.is_dir():
            found.extend(walk_folder(path))
        elif path.is_file() or path.is_symlink():
            found.append(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise InputError(f"pattern {text!r} matches no files (fix PATHS)")
            for match in map(Path, matches):
                if match.is_dir():
                    found.extend(walk_folder(match))
                elif is_candidate(match):
                    found.append(match)
        else:
            raise InputError(f"path {text!r} does not exist (fix PATHS)")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InputError(f"no image files found in {', '.join(map(repr, patterns))} "
                         f"(extensions: {', '.join(sorted(schema.IMAGE_EXTENSIONS))})")
    return unique


@dataclass(frozen=True)
class NamedImage:
    """One image that is not a plain local file: named encoded bytes, or a URI a Spark task reads.

    The bytes come from the Python API's in-memory images or a Parquet table's column.
    """

    name: str
    """What its output row's ``path`` says."""
    uri: str = ""
    """Where to read it (a local path or an s3a:// / hdfs:// URI); unused when ``content`` is given."""
    content: bytes | None = None


Item = Path | NamedImage
"""One input: a local file, or a :class:`NamedImage` (named bytes, or a URI on ``predict --master``)."""


def name_of(item: Item) -> str:
    """The name a row carries: the file's path as given, or the NamedImage's name."""
    return str(item) if isinstance(item, Path) else item.name


def read_item(item: Item) -> bytes | str:
    """The encoded bytes of one input, or why it cannot be read (as preprocess's skipped list names it)."""
    if isinstance(item, NamedImage):
        if item.content is not None:
            return item.content
        if storage.is_remote(item.uri):
            try:
                return storage.read_bytes(item.uri)
            except OSError:
                return "unreadable"
        item = Path(item.uri)
    try:
        return item.read_bytes()
    except OSError:
        # Same reasons as preprocess's skipped list, so both stages name a bad file alike.
        return "broken_link" if item.is_symlink() and not item.exists() else "unreadable"


def _decode(predictor: Predictor, item: Item, max_pixels: int) -> np.ndarray | str:
    """Read and decode one input; return the image array or the failure reason."""
    data = read_item(item)
    if isinstance(data, str):
        return data
    try:
        return predictor.decode(data, max_pixels)
    except ImageDecodeError as exc:
        return exc.reason


def _batched(items: Sequence[Item], n: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


def predict_files(predictor: Predictor, files: Sequence[Item], batch_size: int = 64, tta: bool | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2, progress: bool = True
                  ) -> list[Prediction]:
    """Classify ``files`` (or in-memory images) in batches, decoding ahead in ``workers`` threads.

    One :class:`Prediction` per input, in order; ``tta`` None follows the predictor's (the run's) setting.
    Also the work of each Spark task of ``predict --master`` (:mod:`catsdogs.cluster.predict`), on
    :class:`NamedImage` items.
    """
    rows: list[Prediction] = []
    classes = tuple(predictor.classes)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool, \
            progress_bar(total=len(files), unit="img", file=sys.stderr, disable=not progress,
                 desc="predict") as bar:
        chunks = _batched(files, batch_size)
        pending: deque[tuple[Sequence[Item], list[Future[np.ndarray | str]]]] = deque()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append((chunk, [pool.submit(_decode, predictor, p, max_pixels) for p in chunk]))

        for _ in range(_PREFETCH_BATCHES + 1):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            submit_next()
            decoded = [f.result() for f in futures]
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            answers = predictor.answer(np.stack([decoded[i] for i in good]), tta=tta) if good else None
            chunk_rows = [Prediction(path=name_of(p), error="" if isinstance(d, np.ndarray) else d,
                                     classes=classes) for p, d in zip(chunk, decoded, strict=True)]
            for k, i in enumerate(good):
                assert answers is not None  # nosec B101 # type narrowing of an invariant, not input checking
                chunk_rows[i].answer = answers[k]
            rows.extend(chunk_rows)
            bar.update(len(chunk))
    return rows


def write_csv(rows: Iterable[Prediction], fh: IO[str]) -> None:
    """Write rows as CSV with the columns of :data:`CSV_COLUMNS`."""
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        v = csv_values(r)
        p, s = v["probability"], v["ood_score"]
        v["probability"], v["ood_score"] = "" if p is None else f"{p:.6f}", "" if s is None else f"{s:.6g}"
        w.writerow([v[k] for k in CSV_COLUMNS])


def csv_values(r: Prediction) -> dict[str, str | float | None]:
    """One row's :data:`CSV_COLUMNS`, typed (None where empty): what CSV formats and Parquet stores."""
    return {"path": r.path, "label": r.label, "probability": r.probability, "error": r.error,
            "ood_score": r.ood_score, "looks_like": format_looks_like(r.looks_like)}


def write_parquet(rows: Sequence[Prediction], fh: IO[bytes]) -> None:
    """Write rows as Parquet: the columns of :data:`CSV_COLUMNS`, typed (probabilities as doubles)."""
    import pyarrow as pa  # lazy: only Parquet output needs it (~0.75 s at import)
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([csv_values(r) for r in rows], schema=parquet_schema()), fh)


def parquet_schema() -> pa.Schema:
    """The Parquet output's schema: :data:`CSV_COLUMNS`, probabilities as doubles, the rest strings."""
    import pyarrow as pa

    return pa.schema([(k, pa.float64() if k in ("probability", "ood_score") else pa.string())
                      for k in CSV_COLUMNS])


def write_json(rows: Iterable[Prediction], fh: IO[str]) -> None:
    """Write rows as a JSON list (with per-class probabilities for decoded images)."""
    write_json_records((r.to_dict() for r in rows), fh)


def write_json_records(records: Iterable[dict[str, object]], fh: IO[str]) -> None:
    """Write records as ``json.dump(list(records), fh, indent=1)`` does, one record in memory at a time."""
    fh.write("[")
    first = True
    for record in records:
        fh.write(("\n " if first else ",\n ") + json.dumps(record, indent=1).replace("\n", "\n "))
        first = False
    fh.write("]\n" if first else "\n]\n")


def write_rows(rows: Sequence[Prediction], output: str | None) -> None:
    """Write rows to ``output`` (format from its extension) or CSV to stdout.

    Atomically: a local file appears under its name only once complete (temporary file + rename), an
    s3a:// or hdfs:// one is uploaded under a temporary name and then moved (S3: one copy, which
    creates the object whole).
    """
    if not output:
        buf = io.StringIO()
        write_csv(rows, buf)
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
        return
    suffix = Path(output).suffix.lower()
    if storage.is_remote(output):
        with tempfile.TemporaryDirectory(prefix="catsdogs-predict-") as tmp:
            local = Path(tmp) / f"rows{suffix}"
            write_rows(rows, str(local))
            storage.publish(local, output)
        return
    if suffix == ".parquet":
        with atomic_open(output, "wb") as fh:
            write_parquet(rows, fh)
        return
    writer = write_json if suffix == ".json" else write_csv
    with atomic_open(output, "w") as fh:
        writer(rows, fh)


def check_output(output: str | None) -> None:
    """Reject an --output whose extension is not .csv, .json or .parquet before any work is done."""
    if output and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {output!r} must end in {', '.join(OUTPUT_FORMATS)}")
    if output and not storage.is_remote(output) and Path(output).is_dir():
        raise ConfigError(f"--output {output!r} is a folder; give a {', '.join(OUTPUT_FORMATS)} file name")


def summary(rows: Sequence[Prediction], seconds: float) -> str:
    """Return the one-line summary: counts of images, errors and labels, and throughput."""
    return summary_line(*tally(rows), seconds)


def tally(rows: Sequence[Prediction]) -> tuple[int, int, Counter[str]]:
    """Images, errors and answers per label: what the summary counts (a Spark task returns just these)."""
    return len(rows), sum(1 for r in rows if r.error), Counter(r.label for r in rows if r.label)


def summary_line(images: int, errors: int, labels: Mapping[str, int], seconds: float) -> str:
    """The summary from counts (what ``predict --master``'s tasks return instead of rows)."""
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items()))
    rate = images / seconds if seconds > 0 else float("inf")
    return (f"{images} images, {errors} errors" + (f" ({shown})" if shown else "")
            + f" in {seconds:.1f} s ({rate:.0f} images/s)")


def main(cfg: PredictConfig) -> int:
    """Run ``catsdogs predict``: expand inputs, classify them, write rows, print a summary."""
    check_output(cfg.output)
    check_explain(cfg.explain)
    if cfg.parts:
        raise ConfigError("--parts splits the output by Spark task: add --master (e.g. --master 'local[*]'), "
                          "or drop --parts")
    files = expand_paths(cfg.paths)
    check_required(cfg)
    predictor = load_predictor(need(cfg, "run"), cfg, tracking_uri=cfg.tracking_uri)
    workers = min(_MAX_DECODE_WORKERS, cores())
    start = time.perf_counter()
    rows = predict_files(predictor, files, batch_size=cfg.batch_size,
                         max_pixels=cfg.max_pixels, workers=workers)
    write_rows(rows, cfg.output)
    print(summary(rows, time.perf_counter() - start), file=sys.stderr)
    if cfg.explain:
        write_explanations(predictor, files, rows, cfg)
    return 0


def check_explain(folder: str | None) -> None:
    """Reject an --explain that names an existing file before any work is done."""
    if folder and Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"--explain {folder!r} is a file; give a folder for the heatmaps")


def write_explanations(predictor: Predictor, files: Sequence[Path], rows: Sequence[Prediction],
                       cfg: PredictConfig) -> None:
    """Write the --explain folder: a heatmap of the top class of every decoded file, and the config."""
    classes = predictor.classes
    # The top class, also where a row's label says something else (a rejected image is explained too).
    targets = [None if r.probabilities is None
               else classes.index(max(r.probabilities, key=r.probabilities.__getitem__)) for r in rows]
    out = Path(need(cfg, "explain"))
    written = explain_files(predictor, files, targets, out, cfg.max_pixels)
    save_config(cfg, out / schema.CONFIG_NAME)
    print(f"explanations of {len(written)} images in {out}", file=sys.stderr)
