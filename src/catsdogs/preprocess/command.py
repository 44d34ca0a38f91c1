"""``catsdogs preprocess``: decode, verify, resize and split an image folder into shards with Spark.

Design (from measurements on 2 cores): the driver lists the files and plans the split and the shards
(:mod:`~catsdogs.preprocess.listing`, :mod:`~catsdogs.preprocess.plan`); Spark runs one task per
shard (:mod:`~catsdogs.preprocess.job`, :mod:`~catsdogs.preprocess.task`) and returns only small
metadata rows, which this module assembles into ``files.csv`` and the manifest. Everything is
written into a temporary sibling of ``--output`` and published only when complete
(:mod:`catsdogs.io.outputs`); input and output may be local or on S3/HDFS (:mod:`catsdogs.io.storage`).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs import schema
from catsdogs.config import PreprocessConfig, check_required, need, save_config, to_dict
from catsdogs.errors import ConfigError, InputError, TooManySkippedError
from catsdogs.io import storage
from catsdogs.io.atomic import atomic_write_text
from catsdogs.io.outputs import open_output
from catsdogs.preprocess.job import run_shard_tasks
from catsdogs.preprocess.listing import (
    LABELS_NAME,
    Listing,
    apply_exclusions,
    read_exclusions,
    scan_input,
    scan_remote,
)
from catsdogs.preprocess.plan import assign_splits, plan_shards
from catsdogs.preprocess.task import KIND_SHARD, TaskSettings
from catsdogs.shards.manifest import Manifest, ShardInfo, save_manifest
from catsdogs.spark import get_spark

if TYPE_CHECKING:
    from pyspark.sql import SparkSession




def _resolve_output(cfg: PreprocessConfig, input_root: Path | str) -> str:
    """Validate ``--output`` (a path or remote URI, not nested with ``--input``); return it resolved."""
    output = need(cfg, "output")
    if storage.is_remote(output) or storage.is_remote(str(input_root)):
        out, root = output.rstrip("/"), str(input_root).rstrip("/")
        if out == root or out.startswith(f"{root}/") or root.startswith(f"{out}/"):
            raise ConfigError(f"--output {out!r} and --input {root!r} are nested; a shards folder "
                              "inside the input would be read as a class next time (choose another --output)")
        return out if storage.is_remote(out) else str(Path(out).expanduser().resolve())
    if "://" in output:
        raise ConfigError(f"--output {output!r}: use a path, file://, s3a:// or hdfs:// URI")
    out_path = Path(output).expanduser().resolve()
    assert isinstance(input_root, Path)  # nosec B101 # type narrowing: local input is a Path
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
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(schema.FILES_CSV_COLUMNS)
    w.writerows(files)
    atomic_write_text(path, buf.getvalue())


def _summary(m: Manifest, out: str, skipped: list[dict[str, str]]) -> str:
    """Return the summary printed at the end: what went in, the splits, what was left out, the cost."""
    st = m.stats
    parts = []
    for split in schema.SPLITS:
        per = ", ".join(f"{c} {n:,}" for c, n in m.counts[split].items())
        parts.append(f"{split} {sum(m.counts[split].values()):,} ({per})")
    reasons = Counter(s["reason"] for s in skipped)
    skip_txt = f"{len(skipped):,}" + (f" ({', '.join(f'{r} {c}' for r, c in sorted(reasons.items()))})"
                                      if reasons else "")
    excl = ""
    if m.excluded:
        unmatched = m.excluded["unmatched"]
        excl = (f" Excluded {m.excluded['count']:,} files listed in {m.excluded['file']!r}"
                + (f" ({unmatched:,} listed paths matched no input file)" if unmatched else "") + ".")
    labels = " (classes from file names)" if st.get("labels_from") == LABELS_NAME else ""
    # One fact per line: a log reader (make run > log) scans lines, and one paragraph ran to 389 characters.
    return "\n".join([
        f"Preprocessed {st['kept']:,} of {st['candidates']:,} images{labels} into {out!r} "
        f"({len(m.shards)} shards, {m.size}x{m.size} {m.resize}).",
        f"  splits: {'; '.join(parts)}.",
        f"  skipped {skip_txt}; ignored {st['ignored']:,} non-image files.{excl}",
        f"  wall time {st['wall_time_s']:.1f} s ({st['images_per_s']:,.0f} images/s; "
        f"Spark start {st['spark_start_s']:.1f} s); mean {m.mean}, std {m.std} (pixel units)."])


def preprocess(cfg: PreprocessConfig, spark: SparkSession | None = None, progress: bool = True
               ) -> Manifest:
    """Run the whole preprocessing; return the manifest written to ``cfg.output``.

    Uses ``spark`` when given (tests reuse one session), else the active session, else starts one
    from ``cfg.master`` and stops it at the end.
    """
    check_required(cfg)
    t0 = time.perf_counter()
    source = need(cfg, "input")
    listing = (scan_remote(source, cfg.labels_from) if storage.is_remote(source)
               else scan_input(source, cfg.labels_from))
    excluded: dict[str, Any] = {}
    if cfg.exclude:
        listing, excluded = apply_exclusions(listing, read_exclusions(cfg.exclude))
        excluded["file"] = cfg.exclude
    target = open_output(_resolve_output(cfg, listing.root), cfg.overwrite)
    plans = plan_shards(assign_splits(listing.candidates, len(listing.classes), cfg.val_frac,
                                      cfg.test_frac, cfg.seed), cfg.shard_rows, cfg.seed)
    owned = False
    try:
        t_start = time.perf_counter()
        if spark is None:
            from pyspark.sql import SparkSession  # lazy: pyspark costs ~1 s and is only needed here

            owned = SparkSession.getActiveSession() is None
            spark = get_spark(cfg.master, "catsdogs-preprocess", cfg.spark_conf)
        t_job = time.perf_counter()
        job_epoch = time.time()
        settings = TaskSettings(str(listing.root), target.task_root, cfg.size, cfg.resize,
                                cfg.max_pixels, len(listing.classes), cfg.format, cfg.read_threads)
        rows = run_shard_tasks(spark, plans, settings, progress=progress)
        t_done = time.perf_counter()
        done_epoch = time.time()
        outcome = _assemble(rows, listing, cfg)
        _check_outcome(outcome, listing, cfg)
        m = outcome.manifest
        m.excluded = excluded
        times = {"start": t0, "spark": t_start, "job": t_job, "done": t_done, "job_epoch": job_epoch,
                 "done_epoch": done_epoch}
        m.stats = _stats(listing, outcome, excluded, spark, times)
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


def _stats(listing: Any, outcome: Any, excluded: dict[str, Any], spark: SparkSession, times: dict[str, float]
           ) -> dict[str, Any]:
    """The manifest's ``stats``: counts, and where the wall time went.

    ``times`` holds perf_counter marks ``start``, ``spark``, ``job`` and ``done`` and the wall-clock
    ``job_epoch`` and ``done_epoch``.
    """
    wall = time.perf_counter() - times["start"]
    n = len(listing.candidates)
    job = times["done"] - times["job"]
    return {
        "candidates": n, "kept": len(outcome.files), "skipped": len(outcome.skipped),
        "excluded": int(excluded.get("count", 0)),
        "ignored": len(listing.ignored), "shards": len(outcome.manifest.shards),
        "spark_version": spark.version,
        "master": spark.sparkContext.master, "wall_time_s": round(wall, 3),
        "images_per_s": round(n / wall, 1) if wall else 0.0,
        "spark_start_s": round(times["job"] - times["spark"], 3), "job_s": round(job, 3),
        "job_images_per_s": round(n / job, 1) if job > 0 else 0.0,
        # Where the job's wall time goes: summed in-task time (read/decode/write), the delay
        # until the first task starts (scheduling, Python worker start-up) and the tail after
        # the last task ends (result collection).
        "task_seconds": outcome.task_seconds,
        "first_task_start_s": round(min(s for s, _ in outcome.spans) - times["job_epoch"], 3),
        "after_last_task_s": round(times["done_epoch"] - max(e for _, e in outcome.spans), 3),
        "python_workers": len(outcome.worker_pids),
        "labels_from": listing.labels_from,
    }


def main(cfg: PreprocessConfig) -> int:
    """CLI entry point of ``catsdogs preprocess``; returns the exit code."""
    preprocess(cfg)
    return 0


