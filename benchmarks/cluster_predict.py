"""Cluster predict benchmark: local ``catsdogs predict`` against ``--master local[2]``, at two photo counts.

Both run the whole command (interpreter, model load, JVM start and SparkSession for the Spark one), so
the larger count shows how Spark's fixed cost is amortised. The Spark run's tasks write the output's
parts and the driver merges them (no row is collected). Photos are the development copy's, cycled under
distinct names when a count asks for more photos than it holds (the cost per photo is the same).
Labels must agree row for row. Usage (about 10 minutes on 2 cores with the default run)::

    .venv/bin/python -m benchmarks.cluster_predict [--run runs/effnet_lite12_frozen] [--photos 2000 20000]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import DEFAULT_RUN, REAL_DATA, heavy_lock, machine, write_fragment

MASTER = "local[2]"
"""The Spark master compared with local predict: this machine's 2 cores."""


def link_photos(folder: Path, n: int) -> None:
    """``n`` photos under ``folder/Cat`` and ``folder/Dog`` as symlinks, cycling the real ones if needed."""
    for cls in ("Cat", "Dog"):
        files = sorted((REAL_DATA / cls).glob("*.jpg"), key=lambda p: int(p.stem))
        (folder / cls).mkdir(parents=True)
        for i in range(n // 2):
            os.symlink(files[i % len(files)], folder / cls / f"{i:06d}.jpg")


def timed(cmd: list[str]) -> float:
    """Wall seconds of one command; its output is shown only when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def labels(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as fh:
        return [(r["path"], r["label"]) for r in csv.DictReader(fh)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="the trained run (make run writes it)")
    parser.add_argument("--photos", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args(argv)
    if not REAL_DATA.is_dir() or not (args.run / "best.pt").is_file():
        print(f"needs the real data at {REAL_DATA} and a run at {args.run} (make run); skipping",
              file=sys.stderr)
        return 0
    rows = []
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-bench-predict-") as tmp:
        for n in args.photos:
            folder = Path(tmp) / str(n)
            link_photos(folder, n)
            base = [sys.executable, "-m", "catsdogs.cli", "predict", str(folder), "--run", str(args.run)]
            local, spark = Path(tmp) / f"local-{n}.csv", Path(tmp) / f"spark-{n}.csv"
            t_local = timed([*base, "--output", str(local)])
            t_spark = timed([*base, "--output", str(spark), "--master", MASTER])
            assert labels(local) == labels(spark), "local and Spark predict disagree"
            rows.append((n, t_local, t_spark))
            print(f"{n} photos: local {t_local:.1f} s, {MASTER} {t_spark:.1f} s", flush=True)
    lines = [
        "## Cluster predict: local against Spark local[2]",
        "",
        f"`.venv/bin/python -m benchmarks.cluster_predict --run {args.run.name} --photos "
        f"{' '.join(map(str, args.photos))}` ({machine()}); the run `runs/{args.run.name}`, development-copy "
        "photos (180 px JPEG), the whole command timed.",
        "",
        f"| photos | local predict s | `--master {MASTER}` s | Spark vs local |",
        "|---|---|---|---|",
        *(f"| {n:,} | {a:.1f} | {b:.1f} | {100 * (b / a - 1):+.1f} % |" for n, a, b in rows),
    ]
    print("\n".join(lines))
    write_fragment("cluster_predict", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
