"""``catsdogs preprocess``: decode, verify, resize and split an image folder into shards with Spark.

Design (from measurements on 2 cores): the driver lists the files and plans the split and the shards
(:mod:`catsdogs.listing`); Spark runs ONE TASK PER SHARD (a parallelized list of shard plans, one
per partition). Each task reads its files in a Python worker, decodes them with
:func:`catsdogs.transforms.load_image`, writes the shard itself with
:class:`catsdogs.shards.ShardWriter` and returns only small metadata rows. Pixels never go through
the JVM or Arrow, so big images cannot exhaust Arrow buffers and no shuffle is needed. The same
tasks can run as DataFrame ``mapInArrow`` (``run_job(api="dataframe")``), which measured ~5 s
slower to start on a cold session.
Everything is written into a temporary sibling of ``--output`` and published only when complete
(:mod:`catsdogs.outputs`); input and output may be local or on S3/HDFS (:mod:`catsdogs.storage`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs import schema, storage
from catsdogs.config import PreprocessConfig, save_config, to_dict
from catsdogs.errors import (
    ConfigError,
    ImageDecodeError,
    InputError,
    TooManySkippedError,
)
from catsdogs.listing import Listing, ShardPlan, assign_splits, plan_shards, scan_input, scan_remote
from catsdogs.manifest import Manifest, ShardInfo, save_manifest
from catsdogs.outputs import open_output
from catsdogs.shards import ShardWriter
from catsdogs.transforms import load_image

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

KIND_IMAGE = "image"
KIND_SHARD = "shard"
# Schema of the rows a task returns. Spark checks mapInArrow output types strictly, so the Arrow
# schema below must match this DDL exactly (int = int32).
RESULT_DDL = ("kind string, split string, shard int, row int, path string, label int, "
              "reason string, detail string")
PLAN_DDL = "split string, shard int, paths array<string>, labels array<int>"
PlanRow = tuple[str, int, list[str], list[int]]
"""One shard plan as shipped to a task: split, shard index, relative paths, labels."""


@dataclass(frozen=True)
class TaskSettings:
    """What every shard task needs; pickled once into the Spark closure. Paths are absolute."""

    input_root: str
    output_root: str
    size: int
    resize: str
    max_pixels: int
    num_classes: int
    format: str = "npy"
    """Shard format written by the task: npy or parquet (see :mod:`catsdogs.shards`)."""
    read_threads: int = 1
    """Concurrent reads for remote input (``--read-threads``); local input uses one."""


def _result_schema() -> pa.Schema:
    """Return the Arrow schema matching :data:`RESULT_DDL`."""
    import pyarrow as pa

    return pa.schema([("kind", pa.string()), ("split", pa.string()), ("shard", pa.int32()),
                      ("row", pa.int32()), ("path", pa.string()), ("label", pa.int32()),
                      ("reason", pa.string()), ("detail", pa.string())])


def read_file(root: str, rel: str) -> bytes:
    """Read one input file whole; raise :class:`ImageDecodeError` ``broken_link`` or ``unreadable``.

    ``root`` is a local folder or a remote URI (read through :mod:`catsdogs.storage`).
    """
    if storage.is_remote(root):
        uri = storage.join(root, rel)
        try:
            return storage.read_bytes(uri)
        except OSError as exc:  # pyarrow has already retried transient S3 errors
            raise ImageDecodeError("unreadable", str(exc).splitlines()[0]) from None
    path = os.path.join(root, rel)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        if os.path.islink(path) and not os.path.exists(path):
            raise ImageDecodeError("broken_link", f"symlink to missing {os.readlink(path)!r}") from None
        raise ImageDecodeError("unreadable", exc.strerror or str(exc)) from None


@contextmanager
def _shard_root(output_root: str) -> Iterator[str]:
    """Yield the folder a task writes its shard into: the output itself, or a local scratch folder.

    For remote output the shard's files are uploaded on a clean exit; the scratch folder is deleted.
    """
    if not storage.is_remote(output_root):
        yield output_root
        return
    with tempfile.TemporaryDirectory(prefix="catsdogs-shard-") as scratch:
        yield scratch
        storage.upload_tree(scratch, output_root)


def _read_ahead(settings: TaskSettings, paths: list[str]
                ) -> Iterator[tuple[bytes | ImageDecodeError, float]]:
    """Yield each file's bytes (or its read error) in order, with the seconds spent waiting for it.

    Files are streamed, never all held at once: a shard of 1,500 camera photos would be gigabytes.
    Remote input is read ahead by ``read_threads`` threads (each read waits on a network round
    trip; pyarrow releases the GIL meanwhile), at most ``2 x read_threads`` files in memory.
    """
    def read(rel: str) -> bytes | ImageDecodeError:
        try:
            return read_file(settings.input_root, rel)
        except ImageDecodeError as exc:
            return exc

    if not (storage.is_remote(settings.input_root) and settings.read_threads > 1):
        for rel in paths:
            t = time.perf_counter()
            blob = read(rel)
            yield blob, time.perf_counter() - t
        return
    pending = iter(paths)
    with ThreadPoolExecutor(settings.read_threads, thread_name_prefix="catsdogs-read") as pool:
        window = deque(pool.submit(read, rel) for rel in islice(pending, 2 * settings.read_threads))
        while window:
            t = time.perf_counter()
            blob = window.popleft().result()
            waited = time.perf_counter() - t
            for rel in islice(pending, 1):
                window.append(pool.submit(read, rel))
            yield blob, waited


def process_shard(settings: TaskSettings, split: str, index: int, paths: list[str],
                  labels: list[int]) -> dict[str, list[Any]]:
    """Decode one shard's files and write the shard; return metadata rows as column lists.

    Runs inside a Spark Python worker (and directly in tests). One row per image (row index in the
    shard, or -1 with a reason when skipped) plus one ``shard`` row whose ``detail`` is JSON with
    the shard's files, checksums and, for train shards, per-channel pixel sums for normalisation.
    """
    cols: dict[str, list[Any]] = {k: [] for k in ("kind", "split", "shard", "row", "path", "label",
                                                  "reason", "detail")}

    def emit(kind: str, row: int, path: str, label: int, reason: str, detail: str) -> None:
        for key, value in zip(cols, (kind, split, index, row, path, label, reason, detail), strict=True):
            cols[key].append(value)

    started = time.time()  # wall clock, comparable with the driver's for the job timeline
    t0 = time.perf_counter()
    read_s = 0.0  # time spent waiting for file bytes, reported apart from decoding
    kept: list[np.ndarray] = []  # references to the decoded train images, for the pixel statistics
    with _shard_root(settings.output_root) as root, \
            ShardWriter(root, split, index, settings.size, settings.num_classes, settings.format) as writer:
        for rel, label, (blob, waited) in zip(paths, labels, _read_ahead(settings, paths), strict=True):
            read_s += waited
            try:
                if isinstance(blob, ImageDecodeError):
                    raise blob
                arr = load_image(blob, settings.size, settings.resize, settings.max_pixels)
            except ImageDecodeError as exc:
                emit(KIND_IMAGE, -1, rel, int(label), exc.reason, exc.detail[:500])
                continue
            row = writer.add(arr, int(label), rel)
            if split == "train":
                kept.append(arr)
            emit(KIND_IMAGE, row, rel, int(label), "", "")
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    psum, psq = pixel_sums(kept)
    t4 = time.perf_counter()
    assert writer.info is not None  # set by a clean exit of the with-block
    seconds = {"read": read_s, "decode": t2 - t0 - read_s, "write": t3 - t2, "stats": t4 - t3}
    detail = {"info": asdict(writer.info), "pixel_sum": psum.tolist(), "pixel_sumsq": psq.tolist(),
              "seconds": seconds, "pid": os.getpid(), "span": [started, time.time()]}
    emit(KIND_SHARD, -1, "", -1, "", json.dumps(detail))
    return cols


def pixel_sums(images: list[np.ndarray], chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Return exact per-channel sums of pixel values and of their squares (int64, 0..255 units).

    256-bin histograms per channel give both sums at once, ~7x cheaper than squaring each image in
    int64 (which measured as 30% of the decode time); chunks of 64 images keep the temporaries in
    cache (16 vs 29 us per 64x64 image for one big stack).
    """
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        x = np.stack(images[start:start + chunk]).reshape(-1, 3)
        for c in range(3):
            counts[c] += np.bincount(x[:, c], minlength=256)
    values = np.arange(256, dtype=np.int64)
    return counts @ values, counts @ (values * values)


def make_task(settings: TaskSettings) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Return the ``mapInArrow`` function: each input row is a shard plan, each output batch its rows."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        out_schema = _result_schema()
        for batch in batches:
            for plan in batch.to_pylist():
                cols = process_shard(settings, plan["split"], plan["shard"], plan["paths"], plan["labels"])
                yield pa.RecordBatch.from_pydict(cols, schema=out_schema)

    return run


class _Progress:
    """A tqdm bar on stderr fed by polling Spark's status tracker from a thread.

    Spark reports finished tasks, and each task is one shard, so images done = completed tasks x
    mean shard rows (exact at the end).
    """

    def __init__(self, sc: SparkContext, group: str, total: int, tasks: int) -> None:
        from tqdm import tqdm

        self._sc = sc
        self._group = group
        self._per_task = total / max(tasks, 1)
        self._tasks = tasks
        self._stop = threading.Event()
        self.bar = tqdm(total=total, unit="img", desc="preprocess", file=sys.stderr, mininterval=0.5,
                        dynamic_ncols=True, smoothing=0.1)
        self._thread = threading.Thread(target=self._poll, name="preprocess-progress", daemon=True)

    def _completed_tasks(self) -> int:
        tracker = self._sc.statusTracker()
        done = 0
        for job_id in tracker.getJobIdsForGroup(self._group):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else []:
                stage = tracker.getStageInfo(stage_id)
                done += stage.numCompletedTasks if stage else 0
        return min(done, self._tasks)

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            try:
                n = round(self._completed_tasks() * self._per_task)
            except Exception:  # noqa: BLE001 - the tracker may vanish while Spark stops
                continue
            if n > self.bar.n:
                self.bar.update(min(n, self.bar.total) - self.bar.n)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _rdd_task(settings: TaskSettings) -> Callable[[PlanRow], dict[str, list[Any]]]:
    """Return the RDD ``map`` function: one shard plan in, that shard's metadata columns out."""

    def run(plan: PlanRow) -> dict[str, list[Any]]:
        return process_shard(settings, *plan)

    return run


def _columns_to_rows(cols: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Turn one task's column lists into row dicts."""
    keys = list(cols)
    return [dict(zip(keys, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def run_job(spark: SparkSession, plans: list[ShardPlan], settings: TaskSettings,
            progress: bool = True, api: str = "rdd") -> list[dict[str, Any]]:
    """Run one Spark task per shard plan; return the collected metadata rows as dicts.

    ``api="rdd"`` (default) maps a parallelized list of plans; ``api="dataframe"`` runs the same
    tasks through a plan DataFrame and ``mapInArrow``. Both make one partition per shard and move
    only paths and metadata. The RDD form starts its first task ~5 s sooner on a cold 2-core
    session (no Catalyst planning/codegen, no extra Python worker feeding the DataFrame), see
    docs/benchmarks/preprocess.md; the work inside the tasks is identical.
    """
    if api not in ("rdd", "dataframe"):
        raise ValueError(f"api must be 'rdd' or 'dataframe', got {api!r}")
    sc = spark.sparkContext
    rows = [(p.split, p.index, list(p.paths), list(p.labels)) for p in plans]
    # One element per partition: parallelize slices a list of n items into n partitions of one,
    # so every Spark task is exactly one shard.
    source = sc.parallelize(rows, numSlices=len(rows))
    group = f"catsdogs-preprocess-{secrets.token_hex(4)}"
    sc.setJobGroup(group, f"catsdogs preprocess: {len(plans)} shards", interruptOnCancel=True)
    total = sum(len(p.paths) for p in plans)

    def collect() -> list[dict[str, Any]]:
        if api == "rdd":
            return [row for cols in source.map(_rdd_task(settings)).collect()
                    for row in _columns_to_rows(cols)]
        # Images never travel through Arrow: input rows are shard plans (paths + labels, one per
        # partition) and output rows are small per-image metadata. A small batch size keeps each
        # input Arrow batch small even if a partition ever held several plans.
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        plan_df = spark.createDataFrame(source, schema=PLAN_DDL)
        return plan_df.mapInArrow(make_task(settings), RESULT_DDL).toArrow().to_pylist()

    try:
        if progress:
            with _Progress(sc, group, total, len(plans)):
                return collect()
        return collect()
    except KeyboardInterrupt:
        sc.cancelJobGroup(group)
        raise
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- driver


def _resolve_output(cfg: PreprocessConfig, input_root: Path | str) -> str:
    """Validate ``--output`` (a path or remote URI, not nested with ``--input``); return it resolved."""
    if not cfg.output:
        raise ConfigError("no output folder given (set --output)")
    if storage.is_remote(cfg.output) or storage.is_remote(str(input_root)):
        out, root = cfg.output.rstrip("/"), str(input_root).rstrip("/")
        if out == root or out.startswith(f"{root}/") or root.startswith(f"{out}/"):
            raise ConfigError(f"--output {out!r} and --input {root!r} are nested; a shards folder "
                              "inside the input would be read as a class next time (choose another --output)")
        return out if storage.is_remote(out) else str(Path(out).expanduser().resolve())
    if "://" in cfg.output:
        raise ConfigError(f"--output {cfg.output!r}: use a path, file://, s3a:// or hdfs:// URI")
    out_path = Path(cfg.output).expanduser().resolve()
    assert isinstance(input_root, Path)
    if out_path == input_root or out_path.is_relative_to(input_root):
        raise ConfigError(f"--output {str(out_path)!r} is inside --input {str(input_root)!r}; it would be "
                          "read as a class folder next time (choose another --output)")
    if input_root.is_relative_to(out_path):
        raise ConfigError(f"--output {str(out_path)!r} contains --input {str(input_root)!r} (choose another "
                          "--output)")
    return str(out_path)


@dataclass
class _Outcome:
    """What the driver assembled from the task results."""

    manifest: Manifest
    files: list[tuple[str, str, int, int, int]]
    skipped: list[dict[str, str]]
    task_seconds: dict[str, float]
    spans: list[tuple[float, float]]
    worker_pids: set[int]


def _assemble(rows: list[dict[str, Any]], listing: Listing, cfg: PreprocessConfig) -> _Outcome:
    """Turn task rows into files.csv rows, the skipped list, shard infos and normalisation stats."""
    files: list[tuple[str, str, int, int, int]] = []
    skipped: list[dict[str, str]] = []
    infos: list[ShardInfo] = []
    psum = np.zeros(3, dtype=np.float64)
    psq = np.zeros(3, dtype=np.float64)
    seconds: Counter[str] = Counter()
    spans: list[tuple[float, float]] = []
    pids: set[int] = set()
    for r in rows:
        if r["kind"] == KIND_SHARD:
            detail = json.loads(r["detail"])
            infos.append(ShardInfo(**detail["info"]))
            # Integer sums from the tasks are exact; add them as Python ints, then divide once.
            psum += np.array([int(v) for v in detail["pixel_sum"]], dtype=np.float64)
            psq += np.array([int(v) for v in detail["pixel_sumsq"]], dtype=np.float64)
            seconds.update(detail["seconds"])
            spans.append((float(detail["span"][0]), float(detail["span"][1])))
            pids.add(int(detail["pid"]))
        elif r["row"] >= 0:
            files.append((r["path"], r["split"], r["shard"], r["row"], r["label"]))
        else:
            skipped.append({"path": r["path"], "reason": r["reason"], "detail": r["detail"]})
    order = {s: i for i, s in enumerate(schema.SPLITS)}
    files.sort(key=lambda f: (order[f[1]], f[2], f[3]))
    skipped.sort(key=lambda s: s["path"])
    infos.sort(key=lambda i: (order[i.split], i.index))
    counts = {s: {c: 0 for c in listing.classes} for s in schema.SPLITS}
    for _path, split, _shard, _row, label in files:
        counts[split][listing.classes[label]] += 1
    train_rows = sum(counts["train"].values())
    pixels = train_rows * cfg.size * cfg.size
    mean = psum / pixels if pixels else np.zeros(3)
    std = np.sqrt(np.maximum(psq / pixels - mean**2, 0.0)) if pixels else np.ones(3)
    manifest = Manifest(classes=list(listing.classes), size=cfg.size, resize=cfg.resize,
                        mean=[round(float(m), 4) for m in mean], std=[round(float(s), 4) for s in std],
                        shards=infos, counts=counts, skipped=skipped, ignored=listing.ignored_summary(),
                        config=to_dict(cfg), format=cfg.format)
    return _Outcome(manifest, files, skipped, {k: round(v, 3) for k, v in seconds.items()}, spans, pids)


def _check_outcome(outcome: _Outcome, listing: Listing, cfg: PreprocessConfig) -> None:
    """Fail when too many files were skipped, a class lost every image, or train is empty."""
    n = len(listing.candidates)
    bad = len(outcome.skipped)
    if n and bad / n > cfg.max_skip_frac:
        reasons = Counter(s["reason"] for s in outcome.skipped).most_common()
        raise TooManySkippedError(
            f"{bad} of {n} images ({bad / n:.1%}) could not be decoded "
            f"({', '.join(f'{r}: {c}' for r, c in reasons)}), more than --max-skip-frac "
            f"{cfg.max_skip_frac}; fix the input or raise --max-skip-frac"
        )
    kept = Counter(f[4] for f in outcome.files)
    for label, name in enumerate(listing.classes):
        if not kept[label]:
            raise InputError(f"class {name!r} has no decodable image (fix --input)")
    if not sum(outcome.manifest.counts["train"].values()):
        raise ConfigError("no image left for training; lower --val-frac / --test-frac")


def _write_files_csv(path: Path, files: list[tuple[str, str, int, int, int]]) -> None:
    """Write files.csv (path relative to the input, split, shard, row, label)."""
    from catsdogs.fsutil import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(schema.FILES_CSV_COLUMNS)
    w.writerows(files)
    atomic_write_text(path, buf.getvalue())


def _summary(m: Manifest, out: str, skipped: list[dict[str, str]]) -> str:
    """Return the one-paragraph summary printed at the end."""
    st = m.stats
    parts = []
    for split in schema.SPLITS:
        per = ", ".join(f"{c} {n:,}" for c, n in m.counts[split].items())
        parts.append(f"{split} {sum(m.counts[split].values()):,} ({per})")
    reasons = Counter(s["reason"] for s in skipped)
    skip_txt = f"{len(skipped):,}" + (f" ({', '.join(f'{r} {c}' for r, c in sorted(reasons.items()))})"
                                      if reasons else "")
    return (f"Preprocessed {st['kept']:,} of {st['candidates']:,} images into {out!r} "
            f"({len(m.shards)} shards, {m.size}x{m.size} {m.resize}): {'; '.join(parts)}. "
            f"Skipped {skip_txt}; ignored {st['ignored']:,} non-image files. "
            f"Wall time {st['wall_time_s']:.1f} s ({st['images_per_s']:,.0f} images/s; "
            f"Spark start {st['spark_start_s']:.1f} s). Mean {m.mean}, std {m.std} (pixel units).")


def preprocess(cfg: PreprocessConfig, spark: SparkSession | None = None, progress: bool = True,
               api: str = "rdd") -> Manifest:
    """Run the whole preprocessing; return the manifest written to ``cfg.output``.

    Uses ``spark`` when given (tests reuse one session), else the active session, else starts one
    from ``cfg.master`` and stops it at the end. ``api`` is passed to :func:`run_job`.
    """
    t0 = time.perf_counter()
    listing = scan_remote(cfg.input) if storage.is_remote(cfg.input) else scan_input(cfg.input)
    target = open_output(_resolve_output(cfg, listing.root), cfg.overwrite)
    plans = plan_shards(assign_splits(listing.candidates, len(listing.classes), cfg.val_frac,
                                      cfg.test_frac, cfg.seed), cfg.shard_rows, cfg.seed)
    owned = False
    try:
        t_start = time.perf_counter()
        if spark is None:
            from pyspark.sql import SparkSession

            from catsdogs.spark import get_spark

            owned = SparkSession.getActiveSession() is None
            spark = get_spark(cfg.master, "catsdogs-preprocess", cfg.spark_conf)
        t_job = time.perf_counter()
        job_epoch = time.time()
        settings = TaskSettings(str(listing.root), target.task_root, cfg.size, cfg.resize,
                                cfg.max_pixels, len(listing.classes), cfg.format, cfg.read_threads)
        rows = run_job(spark, plans, settings, progress=progress, api=api)
        t_done = time.perf_counter()
        done_epoch = time.time()
        outcome = _assemble(rows, listing, cfg)
        _check_outcome(outcome, listing, cfg)
        m = outcome.manifest
        wall = time.perf_counter() - t0
        n = len(listing.candidates)
        m.stats = {
            "candidates": n, "kept": len(outcome.files), "skipped": len(outcome.skipped),
            "ignored": len(listing.ignored), "shards": len(m.shards), "spark_version": spark.version,
            "master": spark.sparkContext.master, "wall_time_s": round(wall, 3),
            "images_per_s": round(n / wall, 1) if wall else 0.0,
            "spark_start_s": round(t_job - t_start, 3), "job_s": round(t_done - t_job, 3),
            "job_images_per_s": round(n / (t_done - t_job), 1) if t_done > t_job else 0.0,
            # Where the job's wall time goes: summed in-task time (read/decode/write), the delay
            # until the first task starts (scheduling, Python worker start-up) and the tail after
            # the last task ends (result collection).
            "task_seconds": outcome.task_seconds, "api": api,
            "first_task_start_s": round(min(s for s, _ in outcome.spans) - job_epoch, 3),
            "after_last_task_s": round(done_epoch - max(e for _, e in outcome.spans), 3),
            "python_workers": len(outcome.worker_pids),
        }
        _write_files_csv(target.stage / schema.FILES_CSV_NAME, outcome.files)
        save_config(cfg, target.stage / schema.CONFIG_NAME)
        save_manifest(m, target.stage)
        target.publish()
    except BaseException:
        target.abort()
        raise
    finally:
        if owned and spark is not None:
            spark.stop()
    if progress:
        print(_summary(m, str(target), outcome.skipped))
    return m


def main(cfg: PreprocessConfig) -> int:
    """CLI entry point of ``catsdogs preprocess``; returns the exit code."""
    preprocess(cfg)
    return 0


