"""Benchmark: ``catsdogs preprocess`` (Spark, one task per shard) vs a plain multiprocessing.Pool(2).

Both decode the same files with the same :func:`catsdogs.models.transforms.load_image` (64x64, stretch).
The pool only decodes; Spark also writes the shards, files.csv and the manifest. Peak RSS is the sum
over the whole process tree (driver + JVM + Python workers), sampled every 0.1 s.

Run: ``.venv/bin/python -m benchmarks.preprocess [--repeats N] [--data DIR]`` (takes the heavy lock).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from benchmarks._common import REAL_DATA, PeakRSS, Timer, heavy_lock, machine, write_fragment

SIZE = 64
COMMAND = ".venv/bin/python -m benchmarks.preprocess"


def _decode(path: str) -> int:
    from catsdogs.models.transforms import load_image

    with open(path, "rb") as fh:
        return load_image(fh.read(), SIZE, "stretch").shape[0]


def bench_pool(paths: list[str], processes: int = 2) -> dict[str, float]:
    """Decode every file with Pool(processes); return seconds, images/s and peak RSS (MiB)."""
    with PeakRSS() as rss, Timer() as t, Pool(processes) as pool:
        done = sum(1 for _ in pool.imap_unordered(_decode, paths, chunksize=64))
    workers = sum(v for k, v in rss.cpu_by_kind.items() if k != "driver")
    return {"seconds": t.seconds, "images_per_s": done / t.seconds, "peak_rss_mib": rss.peak_mib,
            "cpu_s": workers}


def _run_tree(cmd: list[str]) -> tuple[float, PeakRSS, str]:
    """Run ``cmd``; return (wall seconds, its process tree's RSS/CPU sampler, stdout)."""
    with Timer() as t:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with PeakRSS(proc.pid) as rss:
            out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return t.seconds, rss, out


def bench_spark_cli(data: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """Run ``catsdogs preprocess`` in a fresh process (so SparkSession start-up is included)."""
    cmd = [sys.executable, "-m", "catsdogs.cli", "preprocess", "--input", str(data), "--output", str(out),
           "--size", str(SIZE), "--overwrite", *extra]
    wall, rss, _ = _run_tree(cmd)
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    return {"process_wall_s": wall, "peak_rss_mib": rss.peak_mib, "cpu_s": rss.cpu_by_kind, **stats}


def bench_spark_inner(data: Path, out: Path, jobs: int) -> dict[str, Any]:
    """Run ``jobs`` preprocess jobs in one fresh session; return the last job's stats.

    With ``jobs=2`` the second job finds the JVM and the Python workers warm.
    """
    wall, rss, stdout = _run_tree([sys.executable, "-m", "benchmarks.preprocess", "--inner",
                                   str(data), str(out), str(jobs)])
    return {"process_wall_s": wall, "peak_rss_mib": rss.peak_mib, "cpu_s": rss.cpu_by_kind,
            **json.loads(stdout.strip().splitlines()[-1])}


def _inner(data: str, out: str, jobs: str) -> None:
    from catsdogs.config import PreprocessConfig
    from catsdogs.preprocess.command import preprocess
    from catsdogs.spark import get_spark

    t0 = time.perf_counter()
    spark = get_spark("local[*]", "catsdogs-bench")
    start = time.perf_counter() - t0
    stats: dict[str, Any] = {}
    for _ in range(int(jobs)):
        cfg = PreprocessConfig(input=data, output=out, size=SIZE, overwrite=True)
        stats = preprocess(cfg, spark=spark, progress=False).stats
    spark.stop()
    # preprocess() was handed the session, so its wall_time_s already excludes the start-up.
    stats["session_start_s"] = start
    print(json.dumps(stats))


def _excl(r: dict[str, Any]) -> float:
    """Seconds of a Spark run excluding SparkSession start-up (listing, job, files.csv, manifest)."""
    return float(r["wall_time_s"] - r["spark_start_s"])


def _row(name: str, n: int, seconds: float, rss: float | None, note: str = "") -> str:
    rss_txt = "" if rss is None else f"{rss:,.0f}"
    return f"| {name} | {seconds:.2f} | {n / seconds:,.0f} | {rss_txt} | {note} |"


def _cpu(r: dict[str, Any]) -> str:
    kinds = {k: v for k, v in r["cpu_s"].items() if v >= 0.05}
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items()))


PROFILE_NOTES = """\
Profiling notes (one-off measurements on this machine while tuning; the table above re-measures
the main effects every run):

- The delay before the first task of a fresh session is Spark's cold Python path: on a trivial
  first job Spark's PythonRunner log reported boot 0.71 s + init 0.13 s per worker (launching
  the `pyspark.daemon`, forking workers, importing pyspark and unpickling the task), the rest is
  job scheduling in a cold JVM. A second job in the same session starts its first task in < 0.1 s.
- DataFrame `mapInArrow` over `parallelize`d plan rows added ~3 s to that delay (Catalyst
  planning/codegen in a cold JVM, plus an extra Python worker that turns the parallelized rows into
  the DataFrame); the tasks themselves were identical, so preprocess runs the RDD form only.
- The driver JVM's default C2 JIT and G1 GC used ~10 CPU-s per run on 2 cores; C1 only + serial
  GC ~5 CPU-s (see the "JVM defaults" row).
- `spark.python.use.daemon=false` (no fork server, so no worker reuse): 12.7 s vs 6.3 s.
- Per-channel pixel sums via int64 squares cost 0.12 ms per image (30% of the decode); 256-bin
  histograms in chunks of 64 images cost 0.016 ms.
- Per 1,440-image shard, ShardWriter takes ~75 ms (np.stack 5, np.save 3-35, fsync ~10,
  sha256 re-read ~12 ms for X; y is tiny).
- What remains versus the pool: the one-off first-task delay above and the work the pool does not
  do (shard writing with fsync + sha256, normalisation statistics, ~1.4 CPU-s in total)."""

# Spark variants measured once each after the repeated main runs (name, extra CLI flags, note).
VARIANTS: list[tuple[str, list[str], str]] = [
    ("--shard-rows 600", ["--shard-rows", "600"], "more, smaller tasks"),
    ("spark.python.worker.reuse=false", ["--spark-conf", "spark.python.worker.reuse=false"],
     "a new Python worker (imports) per task"),
    ("JVM defaults (G1 GC, C2 JIT)", ["--spark-conf", "spark.driver.extraJavaOptions=-XX:+UseG1GC"],
     "without catsdogs' C1 + serial GC driver flags"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        _inner(*args.inner)
        return 0
    if not args.data.is_dir():
        print(f"data folder {args.data} not found (use --data)", file=sys.stderr)
        return 2
    from catsdogs.preprocess.listing import scan_input

    listing = scan_input(args.data)
    paths = [os.path.join(listing.root, c.path) for c in listing.candidates]
    n = len(paths)
    tmp = Path(tempfile.mkdtemp(prefix="catsdogs-bench-"))
    try:
        with heavy_lock():
            with Timer() as warm:  # page cache warm for everyone: we measure CPU work, not the disk
                for p in paths:
                    with open(p, "rb") as fh:
                        fh.read()
            pool = [bench_pool(paths) for _ in range(args.repeats)]
            spark = [bench_spark_cli(args.data, tmp / "shards", []) for _ in range(args.repeats)]
            warm_runs = [bench_spark_inner(args.data, tmp / "warm", 2) for _ in range(args.repeats)]
            variants = [bench_spark_cli(args.data, tmp / "shards", extra) for _, extra, _ in VARIANTS]
            pool.append(bench_pool(paths))  # again at the end: the machine's load drifts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best_pool = min(pool, key=lambda r: r["seconds"])
    best = min(spark, key=_excl)
    warm_run = min(warm_runs, key=_excl)
    pool_ips = best_pool["images_per_s"]
    ratio = (n / _excl(best)) / pool_ips
    ratio_warm = (n / _excl(warm_run)) / pool_ips
    ratio_whole = (n / best["process_wall_s"]) / pool_ips
    steady = _excl(best) - best["first_task_start_s"]
    ratio_steady = (n / steady) / pool_ips
    for r in spark:
        assert r["kept"] == n and r["skipped"] == 0, f"preprocess lost images: {r}"
    rows = [
        _row("Pool(2): read + load_image only", n, best_pool["seconds"], best_pool["peak_rss_mib"],
             "decode only, no shard writing"),
        _row("**Spark, excluding SparkSession start-up**", n, _excl(best), best["peak_rss_mib"],
             f"listing + job ({best['shards']} tasks) + files.csv + manifest; first task after "
             f"{best['first_task_start_s']:.1f} s"),
        _row("Spark `catsdogs preprocess`, whole process", n, best["process_wall_s"], best["peak_rss_mib"],
             f"interpreter + imports + SparkSession start ({best['spark_start_s']:.1f} s) + the above"),
        _row("Spark, 2nd job in the same session", n, _excl(warm_run), warm_run["peak_rss_mib"],
             f"JVM and Python workers warm; first task after {warm_run['first_task_start_s']:.1f} s"),
    ]
    for (name, _extra, note), r in zip(VARIANTS, variants, strict=True):
        rows.append(_row(f"Spark, {name}", n, _excl(r), r["peak_rss_mib"],
                         f"excl. start-up; {note}; {r['shards']} tasks; start-up {r['spark_start_s']:.1f} s; "
                         f"JVM CPU {r['cpu_s'].get('jvm', 0.0):.1f} s"))
    lines = [
        "## Preprocess: Spark job vs multiprocessing.Pool(2)",
        "",
        f"Command: `{COMMAND}` (holds `/tmp/catsdogs-heavy.lock`; {args.repeats} repeats of the main rows, "
        f"best shown). Data: {n:,} images of {args.data} (180x180 JPEG) to {SIZE}x{SIZE} stretch, page "
        f"cache warm (reading all files took {warm.seconds:.1f} s). Machine: {machine()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Other sessions may share the 2 cores, so absolute numbers "
        "drift between runs; all rows were measured back to back. Peak RSS is the sum over the process "
        "tree (driver + JVM + Python workers), sampled every 0.1 s.",
        "",
        "| Run | Seconds | Images/s | Peak RSS MiB | Note |",
        "|---|---:|---:|---:|---|",
        *rows,
        "",
        f"**Spark excluding start-up / Pool = {ratio:.2f}x** (target >= 0.7x); 2nd job in a warm session "
        f"{ratio_warm:.2f}x; whole process including JVM start {ratio_whole:.2f}x. Without the one-off "
        f"delay before the first task of a fresh session ({best['first_task_start_s']:.1f} s: job scheduling "
        f"in a cold JVM and booting the Python daemon and workers) the cold job runs at {n / steady:,.0f} "
        "img/s = "
        f"{ratio_steady:.2f}x.",
        "",
        PROFILE_NOTES,
        "",
        f"Where the Spark job's time goes (best run): {best['job_s']:.1f} s job wall on 2 cores; the first "
        f"task started {best['first_task_start_s']:.1f} s after submission (job scheduling, Python "
        "daemon + worker start-up); summed in-task seconds "
        + ", ".join(f"{k} {v:.1f}" for k, v in best["task_seconds"].items())
        + f"; results were back {best['after_last_task_s']:.2f} s after the last task ended; "
        f"{best['python_workers']} Python workers, reused across tasks. CPU seconds by process: "
        f"{_cpu(best)}; the pool's workers used {best_pool['cpu_s']:.1f}.",
        "",
        "All runs, in order: pool " + ", ".join(f"{r['images_per_s']:,.0f}" for r in pool)
        + " img/s; Spark excl. start-up " + ", ".join(f"{n / _excl(r):,.0f}" for r in spark)
        + " img/s; Spark whole process " + ", ".join(f"{n / r['process_wall_s']:,.0f}" for r in spark)
        + " img/s; warm 2nd job " + ", ".join(f"{n / _excl(r):,.0f}" for r in warm_runs) + " img/s.",
    ]
    path = write_fragment("preprocess", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
